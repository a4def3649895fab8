"""The program's private copy-on-write view of the whole filesystem (when the kernel allows it).

Each program process, while still root and before the request arrives, builds its own view:

    unshare(CLONE_NEWNS)                         a mount namespace of its own, nothing propagates out
    overlay  lower=/  upper=<slot>/upper         every write lands in the slot's upper directory
             work=<slot>/work  on <slot>/root
      /proc      a fresh proc, hidepid=invisible (only the program's own processes)
      /dev, /sys the host's, bound read-only in spirit (only root may write there)
      /tmp       an opaque directory of the upper layer (the host's /tmp is not visible); also
                 bound at /var/tmp, /dev/shm, /dev/mqueue and /run/lock
      interpreter directories under a directory other users cannot enter (pyenv in /root)
                 are exposed alone on an empty tmpfs; those on other filesystems are bound in
    pivot_root into it, the host's tree detached

So a program may write any absolute path its uid may: /tmp, and new entries in root's plain
top-level directories (/mnt, /opt, /srv, /home, /data, ...: the upper layer holds copies of
them owned by the slot's uid). System directories (/etc, /usr, ...) and root-only files stay as
the host has them (read-only, unreadable), as for any unprivileged user; nothing outside the
slot changes. (An idmapped lower layer would make every root-owned file the program's own and
so writable, but also make root-only files such as /etc/shadow readable: not done.) The
namespace, and with it the overlay, disappears with the program's last process; the forker then
empties the upper directory before it forks the next program process (the overlay is never
mounted while its upper directory is changed from outside). The whole set-up costs about a
millisecond and happens before the request arrives, off the latency path.

The server reads `fetch_files` from the upper directory (only what the program wrote is there).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from sandbox import linux

OPAQUE_XATTR = "trusted.overlay.opaque"
# Writable places a program could use to leave files for someone else: all of them are its /tmp.
TMP_ALIASES = ("/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock")
# Paths `files`/`fetch_files` may not name: kernel filesystems, never part of the upper layer.
KERNEL_TREES = ("/proc", "/sys", "/dev")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ViewPlan:
    """How to build a slot's view; computed once by the zygote, inherited through fork."""

    upper: str  # host path; the upper layer (its `tmp` is the program's /tmp)
    work: str  # overlayfs work directory (same filesystem as upper)
    root: str  # the mount point of the merged view
    exposed: dict[str, list[str]] = field(default_factory=dict)  # blocking dir -> interpreter paths under it
    bound: list[str] = field(default_factory=list)  # interpreter paths on other filesystems than /
    hidden: list[str] = field(default_factory=list)  # host dirs covered by an empty tmpfs (the work root)
    writable: dict[str, int] = field(default_factory=dict)  # top-level dir name -> mode: the slot uid's in the view


def slot_layout(scratch: str) -> tuple[str, str, str, str]:
    """(upper, work, root, workdir) inside a slot's scratch directory."""
    upper = os.path.join(scratch, "upper")
    return upper, os.path.join(scratch, "work"), os.path.join(scratch, "root"), os.path.join(upper, "tmp")


def enter_view(plan: ViewPlan) -> bool:
    """Build the view in a new mount namespace and make it this process's root (needs root).
    True when its /proc hides other users' processes."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    root = plan.root
    flags = linux.MS_NOSUID | linux.MS_NODEV  # no device node or setuid bit of the root fs works in it
    linux.mount("overlay", root, "overlay", flags, f"lowerdir=/,upperdir={plan.upper},workdir={plan.work}")
    proc_hidden = _mount_proc(root + "/proc")
    for tree in ("/dev", "/sys"):
        linux.mount(tree, root + tree, None, linux.MS_BIND | linux.MS_REC)
    for path in plan.bound:
        if os.path.isdir(root + path):
            linux.mount(path, root + path, None, linux.MS_BIND | linux.MS_REC)
    for blocker, paths in plan.exposed.items():
        _expose(root, blocker, paths)
    for path in plan.hidden:
        if os.path.isdir(root + path):
            linux.mount("tmpfs", root + path, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=755,size=16k")
    for alias in TMP_ALIASES:
        target = root + alias
        if os.path.isdir(target) and not os.path.islink(target):
            linux.mount(root + "/tmp", target, None, linux.MS_BIND)
    os.chdir(root)
    linux.pivot_root(".", ".")  # stack the view over the old root, then detach the old one
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")
    return proc_hidden


def _mount_proc(target: str) -> bool:
    flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    for options in ("hidepid=invisible", "hidepid=2", None):
        try:
            linux.mount("proc", target, "proc", flags, options)
            return options is not None
        except OSError:
            if options is None:
                raise
    return False


def _expose(root: str, blocker: str, paths: list[str]) -> None:
    """Cover `blocker` in the view with an empty tmpfs; bind back only `paths` (from the view)."""
    sources = {path: os.open(root + path, os.O_PATH | os.O_DIRECTORY) for path in paths}
    try:
        linux.mount("tmpfs", root + blocker, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=755,size=64k")
        for path, fd in sources.items():
            os.makedirs(root + path, mode=0o755, exist_ok=True)
            linux.mount(f"/proc/self/fd/{fd}", root + path, None, linux.MS_BIND | linux.MS_REC)
    finally:
        for fd in sources.values():
            os.close(fd)


# Top-level directories that stay as the host has them (system files, kernel trees, homes of root).
SYSTEM_DIRS = frozenset({
    "proc", "sys", "dev", "tmp", "root", "boot", "etc", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
    "var", "run", "lost+found", "snap",
})


def writable_top_dirs(hidden: list[str], exposed: list[str]) -> dict[str, int]:
    """Root's plain top-level directories (/mnt, /opt, /srv, /home, /data, ...) that programs may
    add entries to in their view, as on a machine of their own: name -> mode."""
    skip = {p.strip("/").split("/")[0] for p in [*hidden, *exposed]}
    found = {}
    for entry in os.scandir("/"):
        if entry.name in SYSTEM_DIRS or entry.name in skip or not entry.is_dir(follow_symlinks=False):
            continue
        info = entry.stat(follow_symlinks=False)
        if info.st_uid == 0 and info.st_dev == os.stat("/").st_dev:
            found[entry.name] = info.st_mode & 0o7777
    return found


def reset_upper(upper: str, owner: int | None, *, opaque: bool, writable: dict[str, int] | None = None) -> None:
    """Empty the upper layer but for `tmp`, empty `tmp`, give it to `owner` (0700), mark it opaque;
    then give `writable` top-level directories to `owner` (their host contents stay visible).

    Called by the forker while no view of this slot exists (its last process is gone). Never
    follows a symlink: entries are removed by name relative to directory fds.
    """
    upper_fd = os.open(upper, _DIR_FLAGS)
    try:
        for entry in os.scandir(upper_fd):
            if entry.name != "tmp" or not entry.is_dir(follow_symlinks=False):
                _remove(upper_fd, entry)
        try:
            os.mkdir("tmp", 0o700, dir_fd=upper_fd)
        except FileExistsError:
            pass
        tmp_fd = os.open("tmp", _DIR_FLAGS, dir_fd=upper_fd)
        try:
            for entry in os.scandir(tmp_fd):
                _remove(tmp_fd, entry)
            if owner is not None:
                os.fchown(tmp_fd, owner, owner)
            os.fchmod(tmp_fd, 0o700)
            if opaque:  # the host's /tmp stays invisible beneath it
                os.setxattr(tmp_fd, OPAQUE_XATTR, b"y")
        finally:
            os.close(tmp_fd)
        for name, mode in (writable or {}).items():
            os.mkdir(name, mode, dir_fd=upper_fd)  # a merged directory takes its upper's owner and mode
            if owner is not None:
                os.chown(name, owner, owner, dir_fd=upper_fd, follow_symlinks=False)
            os.chmod(name, mode, dir_fd=upper_fd, follow_symlinks=False)
    finally:
        os.close(upper_fd)


def _remove(dir_fd: int, entry: os.DirEntry[str]) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.name, dir_fd=dir_fd)
    else:
        os.unlink(entry.name, dir_fd=dir_fd)


def upper_path(parts: tuple[str, ...]) -> tuple[str, ...]:
    """Where an absolute path of the view (as components) lives in the upper layer."""
    for alias in TMP_ALIASES:
        alias_parts = tuple(alias.strip("/").split("/"))
        if parts[: len(alias_parts)] == alias_parts:
            return ("tmp", *parts[len(alias_parts) :])
    return parts


def in_kernel_tree(parts: tuple[str, ...]) -> bool:
    """True for /proc, /sys and /dev paths (but /dev/shm and /dev/mqueue, which are /tmp)."""
    if upper_path(parts)[:1] == ("tmp",):
        return False
    return any(parts[:1] == (tree.strip("/"),) for tree in KERNEL_TREES)
