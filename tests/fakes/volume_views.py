"""Modal's volume rule for fake containers: each container works on its own copy.

On Modal a container sees what another container wrote to a volume only after that
container's `commit()` and its own `reload()`; two commits of one file: the last one wins
(modal 1.6.4 docs, "Volumes"; `commit()` reloads after committing). Here:

- `VolumeStore`: the volume as Modal's servers hold it, a host directory (what the CLI side
  and a test read); every commit and reload holds its lock, so each is atomic;
- `DirVolume`: FakeModal's volume (`{path: bytes}`) kept in a `VolumeStore`, so the CLI
  side and the containers share it;
- `VolumeView`: one container's working copy, another directory, where the real worker
  code reads and writes at its mount path. `commit()` sends the files this container
  changed since it last synced (new or rewritten files, and deletions) to the store,
  file by file, then reloads; `reload()` takes the files others committed since this view
  last synced (and their deletions) from the store. A file this container never touched
  is never sent, so it cannot overwrite what another container committed.

A change is seen by a file's stat signature (inode, size, mtime): every copy here is a
temporary file renamed into place, so a rewritten file always has a new signature. What
Modal does with uncommitted local changes to a file another container committed is not
documented; here a reload overwrites them. Empty directories are not part of a volume.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

Signature = tuple[int, int, int]  # (inode, size, mtime_ns)
TMP_SUFFIX = ".fakevol-tmp"


def _files(root: Path) -> dict[str, Signature]:
    """Every regular file under `root` (relative POSIX path -> signature)."""
    out: dict[str, Signature] = {}
    if not root.is_dir():
        return out
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(TMP_SUFFIX):
                continue
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except FileNotFoundError:  # removed while walking (the trainer rotates files)
                continue
            if path.is_symlink() or not path.is_file():
                continue
            out[path.relative_to(root).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _signature(path: Path) -> Signature:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _copy(src: Path, dest: Path) -> Signature | None:
    """Copy atomically (a reader sees the old file or the new one); None if `src` vanished."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + TMP_SUFFIX)
    try:
        shutil.copyfile(src, tmp)
    except FileNotFoundError:
        return None
    os.replace(tmp, dest)
    return _signature(dest)


def _remove(root: Path, rel: str) -> None:
    """Remove a file and the directories its removal left empty (up to `root`)."""
    path = root / rel
    try:
        path.unlink()
    except FileNotFoundError:
        return
    parent = path.parent
    while parent != root and parent.is_relative_to(root):
        try:
            parent.rmdir()
        except OSError:  # not empty
            return
        parent = parent.parent


class VolumeStore:
    """A volume's committed state: a host directory, with a lock file beside it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.root.with_name(self.root.name + ".fakevol.lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self.lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class VolumeView:
    """One container's view of a volume (`work`: its mount, as the container's code sees it)."""

    def __init__(self, store: VolumeStore, work: Path) -> None:
        self.store, self.work = store, Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.seen: dict[str, Signature] = {}  # store side, as of this view's last sync
        self.local: dict[str, Signature] = {}  # this view's side, as of its last sync

    def reload(self) -> None:
        """Take what other containers committed since this view last synced."""
        with self.store.locked():
            self._reload()

    def commit(self, *, reload: bool = True) -> None:
        """Send this container's changes (last write wins per file), then reload, as modal
        1.6.4's `commit()` does (`reload=False`: the caller reloads, or refuses to)."""
        with self.store.locked():
            for rel, sig in _files(self.work).items():
                if self.local.get(rel) == sig:
                    continue  # unchanged here: never overwrite another container's commit
                stored = _copy(self.work / rel, self.store.root / rel)
                if stored is not None:
                    self.seen[rel], self.local[rel] = stored, sig
            present = _files(self.work)
            for rel in [r for r in self.local if r not in present]:  # deleted here since the last sync
                _remove(self.store.root, rel)
                self.local.pop(rel, None)
                self.seen.pop(rel, None)
            if reload:
                self._reload()

    def _reload(self) -> None:
        committed = _files(self.store.root)
        for rel, sig in committed.items():
            if self.seen.get(rel) == sig:
                continue
            copied = _copy(self.store.root / rel, self.work / rel)
            if copied is not None:
                self.seen[rel], self.local[rel] = sig, copied
        for rel in [r for r in self.seen if r not in committed]:  # deleted by another commit
            _remove(self.work, rel)
            self.seen.pop(rel, None)
            self.local.pop(rel, None)


class DirVolume(MutableMapping[str, bytes]):
    """A FakeModal volume whose committed state is a directory (a `VolumeStore`), so the
    CLI side (FakeModal's listdir/read_file/put_files/remove) and containers working on
    their views share one volume: `{relative path: bytes}`, as FakeModal's in-memory volumes."""

    def __init__(self, root: Path) -> None:
        self.store = VolumeStore(root)

    @property
    def root(self) -> Path:
        return self.store.root

    def _path(self, key: str) -> Path:
        path = self.root / key.strip("/")
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise KeyError(key)
        return path

    def __getitem__(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        return path.read_bytes()

    def __setitem__(self, key: str, value: bytes) -> None:
        path = self._path(key)
        with self.store.locked():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + TMP_SUFFIX)
            tmp.write_bytes(bytes(value))
            os.replace(tmp, path)

    def __delitem__(self, key: str) -> None:
        if not self._path(key).is_file():
            raise KeyError(key)
        with self.store.locked():
            _remove(self.root, key.strip("/"))

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_files(self.root)))

    def __len__(self) -> int:
        return len(_files(self.root))
