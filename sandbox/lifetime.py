"""When a server should end by itself (a sidecar must never outlive its use).

Three optional rules, checked every few seconds by the app (`watch`), which then stops the
server the way SIGTERM does (the executor, zygote, forkers and programs go with it):

- `owner_dir`: the directory the server belongs to (a project's state directory). Gone, or
  replaced by another directory at the same path: exit at once.
- `idle_timeout_s`: no request running and none arrived for this long: exit, unless a lease
  is alive.
- `lease_dir`: files whose content is "<pid> <start ticks>" (or just "<pid>"), one per process
  that will need the server (e.g. the apply that launched a training run). A lease holds the
  server up while that very process runs; a dead lease's file is removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sandbox.errors import SandboxSettingsError

CHECK_INTERVAL_S = 2.0
logger = logging.getLogger(__name__)


@dataclass
class Activity:
    """What the executor reports: requests running now, and when the last one came or went."""

    in_flight: int = 0
    last_change: float = field(default_factory=time.monotonic)
    on_change: Callable[[], None] | None = field(default=None, repr=False)  # e.g. publish to the supervisor

    def begin(self) -> None:
        self.in_flight += 1
        self.last_change = time.monotonic()
        if self.on_change is not None:
            self.on_change()

    def end(self) -> None:
        self.in_flight -= 1
        self.last_change = time.monotonic()
        if self.on_change is not None:
            self.on_change()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


class Lifetime:
    def __init__(self, owner_dir: str | None, idle_timeout_s: float | None, lease_dir: str | None) -> None:
        self.owner_dir = owner_dir
        self.owner = _identity(owner_dir) if owner_dir else None
        self.idle_timeout_s = idle_timeout_s
        self.lease_dir = lease_dir
        if owner_dir and self.owner is None:
            raise SandboxSettingsError(f"owner_dir {owner_dir} does not exist", hint="create it, or unset owner_dir")

    @property
    def active(self) -> bool:
        return bool(self.owner_dir or self.idle_timeout_s)

    def reason_to_exit(self, activity: Activity, now: float | None = None) -> str | None:
        """Why the server should stop now, or None."""
        if self.owner_dir and _identity(self.owner_dir) != self.owner:
            return f"its owner directory {self.owner_dir} is gone"
        if self.idle_timeout_s is None or activity.in_flight:
            return None
        idle = (time.monotonic() if now is None else now) - activity.last_change
        if idle < self.idle_timeout_s or self.live_leases():
            return None
        return f"idle for {idle:.0f} s (idle_timeout_s={self.idle_timeout_s:g}) and no live lease"

    def live_leases(self) -> list[str]:
        """Names of the leases whose process still runs (dead ones are removed)."""
        if not self.lease_dir:
            return []
        try:
            names = os.listdir(self.lease_dir)
        except OSError:
            return []
        alive = []
        for name in names:
            path = os.path.join(self.lease_dir, name)
            if lease_alive(path):
                alive.append(name)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        return alive


def lease_alive(path: str) -> bool:
    try:
        with open(path) as f:
            fields = f.read().split()
        pid = int(fields[0])
        ticks = int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return False
    started = start_ticks(pid)
    return started is not None and (ticks is None or started == ticks)


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from its reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in (b"Z", b"X"):  # a zombie holds no lease
        return None
    return int(fields[19])


async def watch(lifetime: Lifetime, activity: Activity, stop: Callable[[], None] | None = None) -> None:
    """Check the rules every CHECK_INTERVAL_S; on the first reason, log it and stop once."""
    while True:
        await asyncio.sleep(CHECK_INTERVAL_S)
        reason = lifetime.reason_to_exit(activity)
        if reason is not None:
            logger.warning("sandbox server stopping: %s", reason)
            (stop or _terminate_self)()
            return


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown: the app's lifespan ends
