"""Read a dataset source into plain row dicts: `hf:<id>`, `path:<file or dir>`.

(`builtin:` sources are generated, see `runtime.data.builtin`.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconciler.errors import TerminalError
from runtime.data.hub import download_failed, require_hub

FILE_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl", ".json")


def split_source(source: str) -> tuple[str, str]:
    """`"hf:org/name"` -> `("hf", "org/name")`."""
    kind, _, value = source.partition(":")
    return kind, value.strip()


def read_hf(repo_id: str, split: str, revision: str | None, max_rows: int | None) -> list[dict[str, Any]]:
    require_hub("dataset", repo_id)
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split, revision=revision)
    except Exception as exc:  # datasets raises many unrelated types; all mean "not downloadable"
        raise download_failed("dataset", repo_id, exc) from None
    if max_rows is not None and max_rows < len(ds):
        ds = ds.select(range(max_rows))
    return [dict(row) for row in ds]


def resolve_path(value: str, spec_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (Path(spec_dir) / path)


def data_files(path: Path) -> list[Path]:
    """The data files a `path:` source names: the file itself, or a directory's files."""
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise TerminalError(
                f"unsupported dataset file {path}", hint=f"use one of {', '.join(FILE_SUFFIXES)}"
            )
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise TerminalError(f"no data files in {path}", hint=f"expected {', '.join(FILE_SUFFIXES)} files")
        return files
    raise TerminalError(f"dataset path {path} does not exist", hint="paths are relative to the spec file's directory")


def read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TerminalError(f"{path}:{lineno}: invalid JSON line", str(exc)) from None
    if not all(isinstance(r, dict) for r in rows):
        raise TerminalError(f"{path}: every row must be a JSON object")
    return rows


def read_path(value: str, spec_dir: Path, max_rows: int | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in data_files(resolve_path(value, spec_dir)):
        rows.extend(read_file(path))
        if max_rows is not None and len(rows) >= max_rows:
            return rows[:max_rows]
    return rows
