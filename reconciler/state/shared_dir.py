"""The shared-directory state store: state and an expiring lease lock in a directory every
machine mounts (the Ray backend's `ray.storage`: NFS, Lustre, a KubeRay shared volume).

Layout (`<storage>/.retool-state/<key>/`)::

    state.json, state.json.backup    as the local store writes them (atomic replace, backup)
    lock                             the holder's LockInfo with its expiry, present while held
    lock#takeover-<id>               who took over the expired lock <id> (one claimant each)

`flock` is not to be trusted on network filesystems (NFSv3 without lockd, some FUSE
mounts), and a dead holder on another node cannot release a kernel lock anyway, so the lock
is the lease of reconciler.state.lease_lock (the Modal store's), on files: put-if-absent is
`link(2)` of a private temporary file (atomic on NFS; a retried link that reports EEXIST
although it worked is recognised by the temporary file's link count), pop is a rename to a
private name (one of two racing renames wins), an update is write-then-rename.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from reconciler.spec import Spec
from reconciler.state.base import State
from reconciler.state.lease_lock import DEFAULT_LOCK_TTL_S, LeasedStore, LeaseLock
from reconciler.state.local import LocalStore

STATE_FOLDER = ".retool-state"


class FileKeys:
    """lease_lock.KeyValue as files in one directory (one file per key)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _private(self, key: str) -> Path:
        return self.directory / f".{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def _write_private(self, key: str, value: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self._private(key)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(value)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def put(self, key: str, value: str, *, if_absent: bool = False) -> bool:
        tmp = self._write_private(key, value)
        try:
            if not if_absent:
                os.replace(tmp, self.directory / key)
                return True
            try:
                os.link(tmp, self.directory / key)
                return True
            except FileExistsError:
                return os.stat(tmp).st_nlink == 2  # NFS: our own retried link
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> str | None:
        try:
            return (self.directory / key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def pop(self, key: str) -> str | None:
        taken = self._private(key)
        try:
            os.rename(self.directory / key, taken)
        except FileNotFoundError:
            return None
        try:
            return taken.read_text(encoding="utf-8")
        finally:
            taken.unlink(missing_ok=True)


class SharedDirStore(LeasedStore, LocalStore):
    """The local store's state files with a lease lock (LeasedStore) instead of `flock`."""

    def __init__(self, directory: str | os.PathLike[str], *, lock_ttl_s: float = DEFAULT_LOCK_TTL_S) -> None:
        super().__init__(directory)
        self.lease = LeaseLock(FileKeys(self.directory), "lock", f"lock file {self.directory / 'lock'}", ttl_s=lock_ttl_s)
        self.heartbeat_s = self.lease.heartbeat_s

    @classmethod
    def from_spec(cls, spec: Spec) -> SharedDirStore:
        assert spec.ray.storage is not None  # the spec refuses `state.store: ray` without it
        return cls(Path(spec.ray.storage).expanduser() / STATE_FOLDER / (spec.state.key or spec.name))

    def describe(self) -> str:
        return f"shared state {self.path}"

    def write(self, state: State) -> None:
        super().write(state)
        self.lease.extend()
