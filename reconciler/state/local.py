"""The local state store: one JSON file in a directory (default `.retool/`).

Layout of the directory::

    state.json          the current state (schema version, serial, lineage, one record per node)
    state.json.backup   the state before the last write (recover by hand if state.json is damaged)
    state.lock          the file the apply lock is taken on (an OS lock, `flock`); never deleted
    state.lock.json     the holder's LockInfo, for messages; removed on unlock (a leftover one
                        means its holder died)
    .gitignore          `*`: state never lands in git by accident

Writes are atomic (temp file in the same directory, fsync, os.replace, fsync of the
directory), so a crash leaves either the old or the new state, never half of one.

The lock is the kernel's: `flock(LOCK_EX)` on `state.lock`, held by an open descriptor for
the life of the process that took it (kept in `_HELD`, so any handle on the same directory
in that process can release it). A holder that dies in any way (kill -9, OOM, a closed
laptop) releases it with its descriptors, so the next apply takes it and says "previous
apply (pid N) died; continuing". The lock file is never unlinked: deleting a locked file
lets two processes lock two different inodes under one name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from reconciler.errors import TerminalError
from reconciler.state.base import (
    BACKUP_SUFFIX,
    STATE_FILE,
    LockInfo,
    State,
    Takeover,
    check_successor,
    lock_mismatch_error,
    locked_error,
    not_locked_error,
    parse_state,
)

LOCK_FILE = "state.lock"
LOCK_INFO_FILE = "state.lock.json"
# `lock_info()` probes with a shared lock for an instant; a racing `lock()` retries past it.
LOCK_ATTEMPTS = 5
LOCK_RETRY_S = 0.05


# --------------------------------------------------------------------------- the store


class LocalStore:
    """State in a local directory. Safe against crashes (atomic writes) and against two
    applies at once (an OS lock that dies with its holder)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE
        self.backup_path = self.directory / (STATE_FILE + BACKUP_SUFFIX)
        self.lock_path = self.directory / LOCK_FILE
        self.info_path = self.directory / LOCK_INFO_FILE
        self.heartbeat_s: float | None = None  # the kernel keeps the lock; nothing expires
        self.taken_over: Takeover | None = None

    def describe(self) -> str:
        return f"local state {self.path}"

    # ----------------------------------------------------------------- read / write

    def read(self) -> State | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return parse_state(text, str(self.path))

    def write(self, state: State) -> None:
        self._ensure_dir()
        try:
            old_text: str | None = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            old_text = None
        stored = parse_state(old_text, str(self.path)) if old_text is not None else None
        check_successor(stored, state, str(self.path))
        if old_text is not None:
            self._atomic_write(self.backup_path, old_text)
        self._atomic_write(self.path, state.model_dump_json(indent=2) + "\n")

    def _atomic_write(self, target: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        # Makes the rename itself durable; not every filesystem lets a directory be opened.
        try:
            dfd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)

    def _ensure_dir(self) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / ".gitignore").write_text("# retool state: never commit it\n*\n", encoding="utf-8")

    # ----------------------------------------------------------------- lock

    def lock(self, info: LockInfo) -> str:
        self._ensure_dir()
        self.taken_over = None
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS):
                raise TerminalError(
                    f"Cannot create the state lock {self.lock_path}", str(exc), "check the directory's permissions"
                ) from exc
            raise
        try:
            self._flock_or_refuse(fd)
        except BaseException:
            os.close(fd)
            raise
        previous = self._recorded()  # a holder that died without unlocking left its info behind
        if previous is not None:
            self.taken_over = Takeover(previous=previous, why="died")
        try:
            self._write_info(info)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        _HELD[self._key()] = _Held(fd=fd, info=info.model_copy())
        return info.id

    def _flock_or_refuse(self, fd: int) -> None:
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if attempt + 1 < LOCK_ATTEMPTS:
                    time.sleep(LOCK_RETRY_S)
        holder = self._recorded() or _unknown_holder("(holder has not written its info yet)", self.lock_path)
        raise locked_error(holder, str(self.lock_path), os_lock=True)

    def unlock(self, lock_id: str) -> None:
        held = _HELD.get(self._key())
        if held is not None and held.info.id == lock_id:
            self.info_path.unlink(missing_ok=True)  # before the lock goes: no window with a foreign info
            self._fsync_dir()
            fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)
            del _HELD[self._key()]
            return
        holder = self.lock_info()
        if holder is None:
            leftover = self._recorded()
            if leftover is not None and leftover.id == lock_id:
                self.info_path.unlink(missing_ok=True)  # a dead holder's note; the lock itself was already free
                return
            raise not_locked_error(f"no process holds {self.lock_path}")
        if holder.id != lock_id:
            raise lock_mismatch_error(lock_id, holder)
        raise TerminalError(
            f"Lock {lock_id} is held by a live process: {holder.who} (pid {holder.pid}) running `{holder.command}`",
            "the local lock is the operating system's: it frees itself when its holder exits, and only then",
            f"wait for it, or stop it (`kill {holder.pid}` on {holder.host})",
        )

    def renew(self, lock_id: str) -> None:
        """Nothing to renew: the kernel holds the lock as long as its holder lives."""

    def lock_info(self) -> LockInfo | None:
        held = _HELD.get(self._key()) if self.directory.exists() else None
        if held is not None:
            return held.info.model_copy()
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._recorded() or _unknown_holder("(holder has not written its info yet)", self.lock_path)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # free; a leftover info file is a dead holder's
        finally:
            os.close(fd)

    def _key(self) -> str:
        return str(self.lock_path.resolve())

    def _write_info(self, info: LockInfo) -> None:
        self._atomic_write(self.info_path, info.model_dump_json(indent=2) + "\n")

    def _recorded(self) -> LockInfo | None:
        """The info the last holder wrote, if it is still there."""
        try:
            text = self.info_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return LockInfo.model_validate_json(text)
        except ValidationError:
            return _unknown_holder("(unreadable lock info)", self.info_path)


@dataclass
class _Held:
    fd: int
    info: LockInfo


# Locks this process holds, by lock file: the descriptor must outlive any one store handle.
_HELD: dict[str, _Held] = {}


def _unknown_holder(command: str, path: Path) -> LockInfo:
    try:
        since = path.stat().st_mtime
    except OSError:
        since = time.time()
    return LockInfo(id="unknown", who="unknown", user="unknown", host="unknown", pid=0, command=command, created_at=since)
