"""The server's slots on disk: one directory per worker (the upper layer of its programs' views,
whose `tmp` is the working directory) and, when root, one uid each.

Uids come from a block claimed with an flock in one machine-wide directory (UID_LOCK_DIR,
whatever the server's `work_root`), so two sandbox servers on one machine never share a uid -
killing "every process of this uid" can only ever hit the execution it belongs to. (Locks
under each server's own work_root let servers with different work roots claim the same
block and kill each other's programs.) The lock dies with the process, so a crashed server
frees its block.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

from sandbox.protocol import SlotSpec
from sandbox.settings import SandboxSettings
from sandbox.view import slot_layout

UID_BLOCK = 256  # >= the largest pool (SandboxSettings.workers <= 256)
UID_BLOCKS = 4096
UID_LOCK_DIR = "/run/retool-sandbox/uid-blocks"  # root only (uids are claimed only by root)


@dataclass
class Workspace:
    root: str
    slots: list[SlotSpec]
    _lock_fd: int | None = field(default=None, repr=False)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def create_workspace(settings: SandboxSettings) -> Workspace:
    os.makedirs(settings.work_root, mode=0o711, exist_ok=True)
    remove_stale_workspaces(settings.work_root)
    root = tempfile.mkdtemp(prefix=f"server-{os.getpid()}-", dir=settings.work_root)
    os.chmod(root, 0o711)  # slot uids may traverse (not list) it when no private /tmp is available
    uids: list[int | None] = [None] * settings.pool_size()
    lock_fd = None
    if os.geteuid() == 0 and settings.isolate_users:
        block, lock_fd = _claim_uid_block(UID_LOCK_DIR)
        first = settings.uid_base + block * UID_BLOCK
        uids = [first + i for i in range(settings.pool_size())]
    slots = []
    for index, uid in enumerate(uids):
        scratch = os.path.join(root, f"slot-{index}")
        upper, work, mount_point, workdir = slot_layout(scratch)
        # The upper layer's own mode is the view's "/" (0755); its tmp is the slot uid's (0700).
        for path, mode in ((scratch, 0o711), (upper, 0o755), (work, 0o700), (mount_point, 0o755), (workdir, 0o700)):
            os.mkdir(path, mode)
            os.chmod(path, mode)  # whatever the umask
        if uid is not None:
            os.chown(workdir, uid, uid)
        slots.append(SlotSpec(index=index, scratch=scratch, workdir=workdir, uid=uid))
    return Workspace(root=root, slots=slots, _lock_fd=lock_fd)


def remove_stale_workspaces(work_root: str) -> None:
    """Delete `server-<pid>-*` directories whose server is gone (killed before it could clean up)."""
    for entry in os.scandir(work_root):
        parts = entry.name.split("-")
        if len(parts) < 3 or parts[0] != "server" or not parts[1].isdigit() or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except PermissionError:
            pass  # alive (another user's process)


def _claim_uid_block(lock_dir: str) -> tuple[int, int]:
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    # From a random block on: a server of an older retool (locks under its work_root) takes
    # blocks 0, 1, ..., so this one almost surely takes another.
    start = random.SystemRandom().randrange(UID_BLOCKS)
    for offset in range(UID_BLOCKS):
        block = (start + offset) % UID_BLOCKS
        fd = os.open(os.path.join(lock_dir, f"{block}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return block, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"all {UID_BLOCKS} sandbox uid blocks under {lock_dir} are in use")
