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
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from reconciler.errors import StateLockedError, TerminalError
from reconciler.state.base import LockInfo, State, Takeover

STATE_FILE = "state.json"
BACKUP_SUFFIX = ".backup"
LOCK_FILE = "state.lock"
LOCK_INFO_FILE = "state.lock.json"
# `lock_info()` probes with a shared lock for an instant; a racing `lock()` retries past it.
LOCK_ATTEMPTS = 5
LOCK_RETRY_S = 0.05


# --------------------------------------------------------------------------- shared rules
# Every store applies the same write and lock rules; the memory and Modal stores import these.


def check_successor(stored: State | None, new: State, where: str) -> None:
    """Refuse a write that would go backwards or mix two pipelines' states."""
    if stored is None:
        return
    if new.lineage != stored.lineage:
        raise TerminalError(
            f"State lineage mismatch in {where}",
            f"the stored state has lineage {stored.lineage}, the one being written has {new.lineage}: "
            "they belong to different pipelines.",
            "point `state.path` (or `state.key`) at the right store, or remove the old state deliberately",
        )
    if new.serial <= stored.serial:
        raise TerminalError(
            f"Refusing to write state serial {new.serial} over serial {stored.serial} in {where}",
            "another apply wrote a newer state since this one read it.",
            "run `retool plan` again",
        )


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 90 * 60:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def stale_reason(info: LockInfo, *, now: float | None = None, host: str | None = None) -> str | None:
    """Why a held lock is stale (its holder cannot still be running), or None if it may be live.

    Only provable staleness counts: same host and the pid is gone, or a shared store's
    expiry passed. A lock from another host is never judged from here."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if info.expires_at is not None and now > info.expires_at:
        return f"stale lock held by {info.who} expired {format_age(now - info.expires_at)} ago"
    if info.host == host and not pid_alive(info.pid):
        return f"stale lock held by dead pid {info.pid} on {info.host}"
    return None


def locked_error(
    info: LockInfo, where: str, *, now: float | None = None, host: str | None = None, os_lock: bool = False
) -> StateLockedError:
    """The error shown to whoever is refused the lock: holder, command, age; stale ones say so.

    `os_lock`: the kernel says a live process holds it (the local store), so there is
    nothing stale to judge and nothing `retool state unlock` could clear."""
    now = time.time() if now is None else now
    age = format_age(now - info.created_at)
    stale = None if os_lock else stale_reason(info, now=now, host=host)
    detail = f"lock {info.id} in {where}: {info.who} (pid {info.pid}) running `{info.command}`, held for {age}"
    if os_lock:
        err = StateLockedError(
            f"State is locked by {info.who} (pid {info.pid}) running `{info.command}` for {age}",
            detail,
            "wait for it to finish; the lock frees itself when that process exits"
            + (f" (stop it with `kill {info.pid}` on {info.host} if it hangs)" if info.pid else ""),
        )
    elif stale:
        err = StateLockedError(
            f"State is locked by a {stale}",
            detail,
            f"the holder is gone; run `retool state unlock {info.id}`",
        )
    else:
        err = StateLockedError(
            f"State is locked by {info.who} running `{info.command}` for {age}",
            detail,
            f"wait for it to finish; if you are sure it is gone, run `retool state unlock {info.id}`",
        )
    err.lock = info  # type: ignore[attr-defined]  # for callers that want the structured holder
    return err


def parse_state(text: str, where: str) -> State:
    """Read state leniently; a file that is not state at all is a clear error, not a crash."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        return State.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise TerminalError(
            f"State in {where} is not readable",
            str(exc).splitlines()[0],
            f"restore it from {STATE_FILE}{BACKUP_SUFFIX} beside it, or move it away to start afresh",
        ) from exc


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
            raise TerminalError(
                "State is not locked", f"no process holds {self.lock_path}", "nothing to unlock"
            )
        if holder.id != lock_id:
            raise TerminalError(
                f"Lock ID {lock_id} does not match the held lock {holder.id}",
                f"the lock is held by {holder.who} (pid {holder.pid}) running `{holder.command}`",
                f"to clear it, run `retool state unlock {holder.id}`",
            )
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
