"""Materialise one spec dataset as `<out_dir>/{train.parquet, meta.json}`."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reconciler.errors import TerminalError
from reconciler.spec import Dataset
from runtime.data.files import META_FILE, manifest, staged_dir, tree_digest, unchanged_since_meta
from runtime.data.formats import RL_FORMATS, SFT_FORMATS, kind_of, map_rows, schema
from runtime.data.sources import read_hf, read_path, split_source

DATA_FILE = "train.parquet"
# More unconvertible rows than this fraction is an error rather than a note.
MAX_SKIPPED_FRACTION = 0.01


class DatasetOutputs(BaseModel):
    """What a prepared dataset records in state (its digest is its output identity)."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="The parquet file verl reads (data.train_files / val_files).")
    digest: str = Field(description="tree_digest of the dataset directory (meta.json excluded).")
    rows: int
    columns: list[str]
    skipped: int = Field(0, description="Source rows that could not be converted (listed in meta.json).")


def prepare(
    name: str, dataset: Dataset, out_dir: Path, spec_dir: Path, sandbox_url: str | None = None
) -> DatasetOutputs:
    """Read, convert and atomically write a dataset; `sandbox_url` serves builtin:tiny_sft's
    code (None: an ephemeral local sandbox is started for the duration)."""
    kind = kind_of(dataset.format)
    source_kind, value = split_source(dataset.source)
    skipped: list[str] = []
    if source_kind == "builtin":
        rows = _builtin_rows(value, dataset, sandbox_url)
    else:
        if source_kind == "hf":
            raw = read_hf(value, dataset.split, dataset.revision, dataset.max_rows)
        elif source_kind == "path":
            raw = read_path(value, Path(spec_dir), dataset.max_rows)
        else:
            raise TerminalError(f"dataset {name}: unknown source {dataset.source!r}")
        rows, skipped = map_rows(dataset.format, raw, default_source=name, lenient_fences=dataset.lenient_fences)
        if len(skipped) > MAX_SKIPPED_FRACTION * max(len(raw), 1):
            raise TerminalError(
                f"dataset {name}: {len(skipped)} of {len(raw)} rows do not fit format {dataset.format}",
                "\n".join(skipped[:5]),
                _format_hint(dataset.format),
            )
    if dataset.max_rows is not None:
        rows = rows[: dataset.max_rows]
    if not rows:
        raise TerminalError(f"dataset {name}: no rows", f"source {dataset.source} gave no usable rows")
    return write_dataset(Path(out_dir), rows, kind, {"name": name, "source": dataset.source, "format": dataset.format}, skipped)


def _builtin_rows(generator: str, dataset: Dataset, sandbox_url: str | None) -> list[dict[str, Any]]:
    from runtime.data import builtin

    if generator not in builtin.GENERATORS:
        raise TerminalError(
            f"unknown builtin dataset generator {generator!r}", hint=f"builtins: {', '.join(builtin.GENERATORS)}"
        )
    options = builtin.parse_options(generator, dict(dataset.options))
    if generator == "tiny_math":
        if dataset.format != "rl":
            raise TerminalError("builtin:tiny_math produces verl RL rows", hint="use `format: rl`")
        return builtin.tiny_math_rows(options)
    if dataset.format not in SFT_FORMATS:
        raise TerminalError("builtin:tiny_sft produces messages+tools rows", hint="use `format: messages`")
    with ExitStack() as stack:
        if sandbox_url is None:
            from runtime.sandbox_process import ephemeral_sandbox

            sandbox_url = stack.enter_context(ephemeral_sandbox())
        return builtin.tiny_sft_rows(options, _sandbox_runner(sandbox_url))


def _sandbox_runner(url: str) -> Any:
    from runtime.sandbox_process import retool_errors
    from sandbox.client import run_code

    def run(code: str) -> str:
        with retool_errors():
            result = run_code(url, code, timeout=10.0)
        outcome = result.run_result
        if result.status.value != "Success" or outcome is None or outcome.status.value != "Finished":
            raise TerminalError(
                "the sandbox failed to run generated code",
                f"code {code!r}: status {result.status.value}, run {outcome.status.value if outcome else None}, "
                f"stderr {(outcome.stderr or '')[-300:] if outcome else ''!r}, message {result.message!r}",
            )
        # What the recipe's tool shows the model: stdout + stderr.
        return (outcome.stdout or "") + (outcome.stderr or "")

    return run


def write_dataset(
    out_dir: Path, rows: list[dict[str, Any]], kind: str, meta: dict[str, Any], skipped: list[str] | None = None
) -> DatasetOutputs:
    """Write rows with the kind's schema as `train.parquet` + `meta.json`, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows, schema=schema(kind))  # type: ignore[arg-type]
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
        raise TerminalError(f"dataset {meta.get('name')}: rows do not fit the {kind} schema", str(exc)) from None
    skipped = skipped or []
    with staged_dir(out_dir) as tmp:
        pq.write_table(table, tmp / DATA_FILE)
        digest = tree_digest(tmp)
        outputs = DatasetOutputs(
            path=str(Path(out_dir) / DATA_FILE), digest=digest, rows=table.num_rows,
            columns=table.column_names, skipped=len(skipped),
        )
        record = {
            **meta, **outputs.model_dump(exclude={"path"}), "skipped_rows": skipped[:100], "manifest": manifest(tmp),
        }
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return outputs


def read_outputs(out_dir: Path) -> DatasetOutputs | None:
    """The outputs of an already prepared dataset dir, or None if absent or altered since."""
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (out_dir / DATA_FILE).is_file() or not unchanged_since_meta(out_dir, meta):
        return None
    return DatasetOutputs(
        path=str(out_dir / DATA_FILE), digest=meta["digest"], rows=meta["rows"],
        columns=meta["columns"], skipped=meta.get("skipped", 0),
    )


def _format_hint(fmt: str) -> str:
    return {
        "retool_sft": "retool_sft rows need `messages` (ReTool-SFT layout) or question/solution text columns",
        "messages": "messages rows need a `messages` list of {role, content, tool_calls} (and optionally `tools`)",
        "dapo_math": "dapo_math rows need `prompt` (user message) and `reward_model.ground_truth`",
        "aime_2024": "aime_2024 rows need Problem/Answer, problem/answer or problem + a \\boxed{} solution",
        "aime_2025": "aime_2025 rows need problem/answer",
        "rl": "rl rows need `prompt` (a list of messages) and `reward_model.ground_truth`",
    }.get(fmt, "")


__all__ = ["DATA_FILE", "DatasetOutputs", "RL_FORMATS", "SFT_FORMATS", "prepare", "read_outputs", "write_dataset"]
