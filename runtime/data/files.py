"""Output identity and atomic publication of prepared directories (datasets and models).

A prepared directory is built in a temporary sibling and renamed into place, so readers
never see a half-written one. Its identity is `tree_digest`: a sha256 over every file's
relative path and content hash, excluding the `meta.json` that records it. meta.json also
records a `manifest` (sizes and mtimes) so later observations need not re-hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

META_FILE = "meta.json"
_CHUNK = 8 * 1024 * 1024


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path, exclude: frozenset[str] = frozenset({META_FILE})) -> str:
    """sha256 over (relative path, file sha256) of every file under `root`, sorted by path."""
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude)
    for path in files:
        rel = path.relative_to(root).as_posix()
        h.update(rel.encode("utf-8") + b"\0" + file_sha256(path).encode("ascii") + b"\n")
    return "sha256:" + h.hexdigest()


def manifest(root: Path, exclude: frozenset[str] = frozenset({META_FILE})) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file: a cheap check that nothing changed
    since a digest was taken (re-hashing a 15 GB model on every refresh would be slow)."""
    root = Path(root)
    out: dict[str, list[int]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in exclude:
            st = path.stat()
            out[rel] = [st.st_size, st.st_mtime_ns]
    return out


def unchanged_since_meta(root: Path, meta: dict[str, object]) -> bool:
    """Whether `root`'s files still match the manifest recorded in its meta.json."""
    return isinstance(meta.get("manifest"), dict) and manifest(root) == meta["manifest"]


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final`.

    On an exception the temporary directory is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{tag}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: str, dst: str) -> str:
    """`shutil.copytree` copy function: a hard link when the filesystem allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
