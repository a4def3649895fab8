"""Killing what a program leaves behind, from the process that adopts it (a child subreaper).

A subreaper inherits every orphan among its descendants, so once the program process itself
is reaped, "I still have children" means "the program left something running". With a uid
of its own per slot, one kill(-1, SIGKILL) issued as that uid ends all of it at once: the
kernel holds the task-list lock for the whole pass, so not even a fork bomb can outrun it.
Without separate uids, the orphans are found in /proc and killed until none is left.
"""

from __future__ import annotations

import os
import signal
import time

REAP_TIMEOUT_S = 5.0


def kill_leftovers(uid: int | None) -> bool:
    """Kill and reap every remaining child; True when there were any."""
    if not has_children():
        return False
    if uid is not None:
        kill_uid(uid)
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while time.monotonic() < deadline:
        if uid is None:
            for pid in children_of(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not has_children():
            break
        time.sleep(0.002)
    return True


def has_children() -> bool:
    """Reap exited children; True while some are still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def kill_uid(uid: int) -> None:
    """kill(-1, SIGKILL) as `uid`, from a throwaway child (the caller must stay root)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def children_of(parent: int) -> list[int]:
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(name))
    return children
