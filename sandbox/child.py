"""The program process: lock itself down, wait for the program, run it as `python main.py` would.

It is forked by the slot's forker before any request arrives (a fork of a process with numpy and
sympy loaded costs milliseconds; paying it between requests keeps it off the latency path):

1. prepare (root, request-independent): own session, its private view of the filesystem
   (`sandbox.view`; or the slot's mount namespace where overlays are refused), cwd, stdio
   pipes, every other fd closed, signals reset, PRNGs reseeded; then block on the go pipe;
2. on `Go`: write the request's files (still root, inside the view), resource limits, drop to
   the slot's uid, no_new_privs, clean environment, address-space limit last; write "started";
3. run the program, finalise like CPython (threads, atexit, __del__, flush), write "done <rc>"
   *before* exiting, because tearing down a big address space takes milliseconds.

The code is also written to main.py in the working directory (as SandboxFusion writes its
file) and compiled from its UTF-8 bytes, so encoding cookies, a BOM and line endings mean what
they mean to `python main.py`, and an uncaught exception goes to CPython's own printer, which
reads the source lines from that file: tracebacks are byte-identical to a plain run.

Lines on the status fd (fd 3): "error <why>" (never started: a sandbox fault), "refused <why>"
(the request's files could not be written), "started", "done <rc>". The program could write there too; the worst it can do is end its own run early.
"""

from __future__ import annotations

import atexit
import builtins
import fcntl
import gc
import os
import resource
import signal
import socket
import sys
import traceback
import types
from dataclasses import dataclass
from typing import NoReturn

from sandbox import linux, workdir
from sandbox.protocol import ChildLimits, Go
from sandbox.view import ViewPlan, enter_view

SETUP_FAILED_EXIT = 125
STATUS_FD = 3
GO_FD = 4
_MAX_FD = 2**31 - 1


@dataclass(frozen=True)
class ChildPlan:
    """What the program process knows before any request; inherited through fork."""

    cwd: str
    uid: int | None
    mount_ns_fd: int | None
    parent_pid: int  # the forker; if it dies first, so must we
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int
    status_fd: int
    go_fd: int
    # Socket objects of the parent processes: detached (not closed) here, so their finalisers can
    # never close an fd number that the program has reused for its own files.
    detach: tuple[socket.socket, ...] = ()
    view: ViewPlan | None = None  # build a private view of the filesystem (instead of mount_ns_fd)


class FilesRefused(Exception):
    """The request's files could not be written (e.g. a path through a symlink): nothing ran."""


def run_child(plan: ChildPlan) -> NoReturn:
    try:
        _prepare(plan)
        spare = _spare_depth()  # before the request: from the depth _run_program runs the code at
        go = Go.model_validate_json(_read_all(GO_FD))
        os.close(GO_FD)
        _write_files(plan, go)
        _lock_down(plan, go)
        os.write(STATUS_FD, b"started\n")
    except BaseException as exc:  # report anything, then never run the program
        fd = STATUS_FD if _is_open(STATUS_FD) else plan.status_fd
        word = "refused" if isinstance(exc, FilesRefused) else "error"
        try:
            os.write(fd, f"{word} {type(exc).__name__}: {exc}".replace("\n", " ").encode()[:4000] + b"\n")
        finally:
            os._exit(SETUP_FAILED_EXIT)
    status = _run_program(go.code, go.filename, spare)
    try:
        os.write(STATUS_FD, f"done {status}\n".encode())
    except OSError:
        pass  # the program closed fd 3: the server learns the status from the exit instead
    if status == -signal.SIGINT:  # like CPython after an uncaught KeyboardInterrupt: die by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(plan: ChildPlan) -> None:
    os.setsid()  # own session and process group: killpg reaches every process that stays in it
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if plan.view is not None:
        enter_view(plan.view)  # a private copy-on-write view of the whole filesystem
    elif plan.mount_ns_fd is not None:
        linux.setns(plan.mount_ns_fd, linux.CLONE_NEWNS)  # the slot's private /tmp and /proc
    os.chdir(plan.cwd)
    sources = (plan.stdin_fd, plan.stdout_fd, plan.stderr_fd, plan.status_fd, plan.go_fd)
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in sources]  # out of the way of targets 0..4
    for target, copy in enumerate(copies):
        os.dup2(copy, target)
    for sock in plan.detach:
        sock.detach()
    os.closerange(GO_FD + 1, _MAX_FD)  # sockets, namespace fds, the forker's pipe ends
    _reset_signals()
    _reseed()
    _fresh_stdio()


def _write_files(plan: ChildPlan, go: Go) -> None:
    try:
        workdir.write_files(plan.cwd, go.files, plan.uid)
        workdir.write_source(plan.cwd, os.path.basename(go.filename), go.code, plan.uid)
    except (OSError, ValueError) as exc:
        raise FilesRefused(f"could not write the request's files: {exc}") from exc


def _lock_down(plan: ChildPlan, go: Go) -> None:
    _apply_limits(go.limits)
    if plan.uid is not None:
        os.setgroups([])
        os.setresgid(plan.uid, plan.uid, plan.uid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot raise privileges again
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # again: changing uid clears it
    if os.getppid() != plan.parent_pid:
        raise RuntimeError("the forker exited before the program started")
    os.umask(0o077)
    os.environ.clear()
    os.environ.update(go.env)
    if go.limits.address_space_bytes is not None:  # last: everything above may allocate
        resource.setrlimit(resource.RLIMIT_AS, (go.limits.address_space_bytes,) * 2)


def _reset_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # what CPython itself sets at start-up
        signal.signal(sig, signal.SIG_IGN)


def _apply_limits(limits: ChildLimits) -> None:
    def lower(kind: int, value: int, hard: int | None = None) -> None:
        _, current_hard = resource.getrlimit(kind)
        wanted_hard = value if hard is None else hard
        if current_hard != resource.RLIM_INFINITY:
            wanted_hard = min(wanted_hard, current_hard)
        resource.setrlimit(kind, (min(value, wanted_hard), wanted_hard))

    lower(resource.RLIMIT_CORE, 0)
    # glibc sizes thread stacks from RLIMIT_STACK: keeping it small (not equal to the memory
    # limit, as SandboxFusion does) is what lets numpy/OpenBLAS threads start under RLIMIT_AS.
    lower(resource.RLIMIT_STACK, limits.stack_bytes)
    lower(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)  # soft: SIGXCPU, hard: SIGKILL
    lower(resource.RLIMIT_FSIZE, limits.file_size_bytes)
    lower(resource.RLIMIT_NOFILE, limits.open_files)
    if limits.processes is not None:
        lower(resource.RLIMIT_NPROC, limits.processes)


def _reseed() -> None:
    """Forked children share the zygote's PRNG state; give each execution fresh entropy."""
    random_module = sys.modules.get("random")
    if random_module is not None:
        random_module.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _fresh_stdio() -> None:
    # The program's sys.__stdout__ & co. must be its own descriptors too (typeshed marks them Final).
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="surrogateescape", closefd=False)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = open(  # type: ignore[misc]
        2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1
    )


def _run_program(code: str, filename: str, spare: int) -> int:
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=filename, __builtins__=builtins, __cached__=None)
    sys.modules["__main__"] = main
    sys.argv = [filename]
    sys.path[0] = os.path.dirname(filename)
    # `python main.py` runs the module with one frame on the stack; ours sits on the runner's
    # frames: raise the limit by their number, so a RecursionError comes at the same depth.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + (limit - 2 - spare))
    status = 0
    try:
        exec(compile(code.encode("utf-8"), filename, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as exc:
        status = _exit_status(exc)
    except BaseException as exc:
        _report(exc)
        status = -signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1
    return _shutdown(main, status)


def _spare_depth() -> int:
    """How many nested calls a module run the way _run_program runs it could make (call from
    the same depth as _run_program); `python main.py` allows the recursion limit minus two."""

    def down(depth: int) -> int:
        try:
            return down(depth + 1)
        except RecursionError:
            return depth

    return int(eval("down(0)", {"down": down}))  # eval: the same C call + frame as exec


def _report(exc: BaseException) -> None:
    """Print the traceback as `python main.py` would: without this runner's frame, through
    CPython's own printer (sys.excepthook), which reads the source from main.py."""
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    exc = exc.with_traceback(tb)
    sys.excepthook(type(exc), exc, tb)


def _exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _shutdown(main: types.ModuleType, status: int) -> int:
    """The parts of interpreter finalisation a program can observe: threads, atexit, __del__, flush."""
    threading = sys.modules.get("threading")
    try:
        if threading is not None:
            threading._shutdown()  # join non-daemon threads, like Py_Finalize
        atexit._run_exitfuncs()
        main.__dict__.clear()  # drops the program's objects: unclosed files flush in __del__
        gc.collect()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            status = status or 120  # CPython's exit status when flushing stdout fails
    return status
