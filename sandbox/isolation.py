"""Isolation the zygote sets up once, and probes, before it serves any request.

- Network: the zygote moves itself into a new, empty network namespace (loopback down), so
  every execution forked from it has no network at all. Needs root; otherwise it tries an
  unprivileged user namespace; if both are refused, `Isolation.network` stays False.
- A private copy-on-write view of the whole filesystem per execution (`sandbox.view`): probed
  once here (a throwaway child builds one and writes into it); when the kernel refuses
  overlays, the per-slot namespaces below are the fallback.
- Per-slot mount namespaces (the fallback): /tmp, /var/tmp, /dev/shm (and /run/lock) are the slot's
  own working directory and /proc is a fresh instance with `hidepid=invisible`, so a program
  sees only its own processes and no other request's temporary files. Built once per slot by
  a helper process; the zygote keeps an fd to each and children join with setns (~0.1 ms,
  where building one per request would cost several ms).
- The interpreter stays readable: when Python lives under a directory other users cannot
  enter (e.g. pyenv in /root, mode 0700), that directory is covered in the slot namespace by
  an empty tmpfs holding bind mounts of just the interpreter's directories - the rest of it
  (the server user's home, credentials) stays invisible.
- Separate uids: probed by trying the switch in a throwaway child.
Each step that the kernel or container refuses is recorded in `Isolation.notes`.
"""

from __future__ import annotations

import os
import site
import stat
import sys
from collections import defaultdict

from sandbox import linux, view
from sandbox.protocol import Isolation, SlotSpec

_SHARED_WRITABLE_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue", "/tmp")


def isolate_network(isolation: Isolation) -> None:
    try:
        linux.unshare(linux.CLONE_NEWNET)
        isolation.network = True
        return
    except OSError as exc:
        first_error = exc
    uid, gid = os.getuid(), os.getgid()
    try:
        linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNET)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        isolation.network = True
        isolation.notes.append("network namespace created inside an unprivileged user namespace")
    except OSError as exc:
        isolation.notes.append(f"network isolation unavailable ({first_error}; {exc}): executions can reach the network")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def can_switch_uid(uid: int) -> bool:
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def interpreter_paths() -> list[str]:
    """Directories a program needs to read to import modules (the outermost ones)."""
    candidates = {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages()}
    candidates.update(p for p in sys.path if p not in ("", "/"))
    real = sorted({os.path.realpath(p) for p in candidates if os.path.isdir(p)})
    outermost: list[str] = []
    for path in real:
        if not any(path == top or path.startswith(top + os.sep) for top in outermost):
            outermost.append(path)
    return outermost


def blocking_directory(path: str) -> str | None:
    """The first directory on the way to `path` (itself included) that other users cannot enter."""
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def unreachable_interpreter_paths() -> dict[str, list[str]]:
    """Blocking directory -> the interpreter paths under it."""
    blocked: dict[str, list[str]] = defaultdict(list)
    for path in interpreter_paths():
        blocker = blocking_directory(path)
        if blocker is not None:
            blocked[blocker].append(path)
    return dict(blocked)


def build_slot_namespaces(slots: list[SlotSpec], isolation: Isolation) -> dict[int, int]:
    """Mount namespace fd per slot index; empty when the kernel refuses (all or nothing)."""
    namespaces: dict[int, int] = {}
    proc_hidden = True
    blocked = unreachable_interpreter_paths()
    for slot in slots:
        try:
            fd, hidden = _slot_namespace(slot.workdir, blocked)
        except OSError as exc:
            for fd in namespaces.values():
                os.close(fd)
            isolation.notes.append(f"private /tmp unavailable ({exc}): executions share the host's /tmp")
            return {}
        namespaces[slot.index] = fd
        proc_hidden = proc_hidden and hidden
    isolation.private_tmp = bool(namespaces)
    isolation.proc_hidden = bool(namespaces) and proc_hidden
    if namespaces and not proc_hidden:
        isolation.notes.append("could not mount a private /proc: other processes stay visible (not their environment)")
    return namespaces


def _slot_namespace(workdir: str, blocked: dict[str, list[str]]) -> tuple[int, bool]:
    """Build the namespace in a helper child, open it from here, then let the helper exit."""
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(release_w)
        try:
            hidden = _populate_namespace(workdir, blocked)
            os.write(report_w, b"ok 1" if hidden else b"ok 0")
        except BaseException as exc:
            os.write(report_w, f"error {exc}".encode()[:4000])
        os.read(release_r, 1)  # stay alive until the parent holds the namespace
        os._exit(0)
    os.close(report_w)
    os.close(release_r)
    try:
        report = os.read(report_r, 4096).decode()
        if not report.startswith("ok"):
            raise OSError(report.removeprefix("error ") or "namespace helper died")
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC), report.endswith("1")
    finally:
        os.close(release_w)
        os.close(report_r)
        os.waitpid(pid, 0)


def _populate_namespace(workdir: str, blocked: dict[str, list[str]]) -> bool:
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing propagates back to the host
    for blocker, paths in blocked.items():
        _expose(blocker, paths)
    source_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)  # stays valid once /tmp is covered
    source = f"/proc/self/fd/{source_fd}"
    for target in _SHARED_WRITABLE_DIRS:  # every world-writable place a program could leave files in
        if os.path.isdir(target) and not os.path.islink(target):
            linux.mount(source, target, None, linux.MS_BIND)
    os.close(source_fd)
    flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    for options in ("hidepid=invisible", "hidepid=2"):
        try:
            linux.mount("proc", "/proc", "proc", flags, options)
            return True
        except OSError:
            continue
    return False


def _expose(blocker: str, paths: list[str]) -> None:
    """Cover `blocker` with an empty tmpfs and bind back only `paths` (inside this namespace)."""
    if any(path == blocker for path in paths):
        raise OSError(f"{blocker} itself is closed to other users; cannot expose it")
    sources = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in paths}  # opened before covering
    try:
        linux.mount("tmpfs", blocker, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=755,size=64k")
        for path, fd in sources.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            linux.mount(f"/proc/self/fd/{fd}", path, None, linux.MS_BIND | linux.MS_REC)
    finally:
        for fd in sources.values():
            os.close(fd)


def build_views(slots: list[SlotSpec], work_root: str, isolation: Isolation) -> dict[int, view.ViewPlan]:
    """A view plan per slot index, or {} when a probe view cannot be built (all or nothing)."""
    blocked = unreachable_interpreter_paths()
    root_dev = os.stat("/").st_dev
    bound = [p for p in interpreter_paths() if os.stat(p).st_dev != root_dev]
    real_root = os.path.realpath(work_root)
    covered = ("/tmp", *view.TMP_ALIASES)  # all of these are the program's own /tmp in its view
    hidden = [] if any(real_root == c or real_root.startswith(c + "/") for c in covered) else [real_root]
    writable = view.writable_top_dirs(hidden, list(blocked))
    plans = {}
    for slot in slots:
        upper, work, root, _ = view.slot_layout(slot.scratch)
        plans[slot.index] = view.ViewPlan(
            upper=upper, work=work, root=root, exposed=blocked, bound=bound, hidden=hidden, writable=writable
        )
    if not plans:
        return {}
    first = slots[0]
    try:
        proc_hidden = _probe_view(plans[first.index], first.uid)
        view.reset_upper(plans[first.index].upper, first.uid, opaque=True, writable=writable)
    except OSError as exc:
        isolation.notes.append(f"private filesystem view unavailable ({exc}): absolute paths are refused")
        view.reset_upper(plans[first.index].upper, first.uid, opaque=False)
        return {}
    isolation.private_root = isolation.private_tmp = True
    isolation.proc_hidden = proc_hidden
    if not proc_hidden:
        isolation.notes.append("could not mount a private /proc: other processes stay visible (not their environment)")
    return plans


def _probe_view(plan: view.ViewPlan, uid: int | None) -> bool:
    """Build a view in a throwaway child, write into it; True when /proc hides other processes."""
    view.reset_upper(plan.upper, uid, opaque=True, writable=plan.writable)
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        try:
            hidden = view.enter_view(plan)
            if os.listdir("/tmp"):
                raise OSError("the host's /tmp shows through the view")
            with open("/tmp/probe", "w") as f:
                f.write("ok")
            os.write(report_w, b"ok 1" if hidden else b"ok 0")
        except BaseException as exc:
            os.write(report_w, f"error {exc}".encode()[:4000])
        os._exit(0)
    os.close(report_w)
    try:
        report = os.read(report_r, 4096).decode()
    finally:
        os.close(report_r)
        os.waitpid(pid, 0)
    if not report.startswith("ok"):
        raise OSError(report.removeprefix("error ") or "the probe died")
    if not os.path.isfile(os.path.join(plan.upper, "tmp", "probe")):
        raise OSError("a file written in the view did not reach the upper layer")
    return report.endswith("1")
