"""One execution, start to finish, in a process forked from the zygote for this request only.

    server ──Prepare──▶ supervisor (root, subreaper) ──fork──▶ program process (waits for Go)
           ◀──Hello───┘
           ──Job─────▶ writes files, sends Go; reads stdout/stderr while the program runs;
           ◀─Outcome──  enforces the deadline; returns fetched files
           ◀─Cleaned──  kills what the program left behind, empties the slot

Being a child subreaper, every process the program starts (daemons included) re-parents to
the supervisor when its parent dies, so "no children left" means "nothing left running".
A crash here costs only this request: the server sees the socket close and reports it.
"""

from __future__ import annotations

import base64
import fcntl
import os
import select
import shutil
import signal
import socket
import time
from collections.abc import Mapping

from sandbox import linux
from sandbox.child import ChildPlan, run_child
from sandbox.output import CappedOutput
from sandbox.paths import read_file, write_file
from sandbox.protocol import Cleaned, Go, Hello, Job, Outcome, Prepare, SlotSpec, recv_body, send_msg

PIPE_SIZE = 1 << 20
REAP_TIMEOUT_S = 5.0
_STDIN_CHUNK = 1 << 16
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def supervise(sock: socket.socket, mount_namespaces: Mapping[int, int], use_uids: bool) -> None:
    """Serve one request on `sock`. Runs in a fresh fork of the zygote and never returns to it."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores SIGCHLD; waiting needs it back
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    prepare = Prepare.model_validate_json(recv_body(sock))
    slot = prepare.slot if use_uids else prepare.slot.model_copy(update={"uid": None})
    if prepare.dirty:  # the last supervisor of this slot died: its program may still be running
        reset_slot(slot, kill=True)
    program = ProgramProcess(slot, mount_namespaces.get(slot.index), sock)
    try:
        send_msg(sock, Hello(pid=os.getpid()))
        job = Job.model_validate_json(recv_body(sock))
        try:
            outcome = run_job(job, slot, program, sock)
        except Exception as exc:  # a fault of the sandbox, not of the program
            outcome = Outcome(kind="error", message=f"sandbox failure: {type(exc).__name__}: {exc}")
        send_msg(sock, outcome)
    finally:
        program.finish(slot.uid)
    send_msg(sock, Cleaned(ok=reset_slot(slot, kill=False)))


def run_job(job: Job, slot: SlotSpec, program: ProgramProcess, sock: socket.socket) -> Outcome:
    root_fd = os.open(slot.workdir, _DIR_FLAGS)
    try:
        for path, content in job.files.items():
            write_file(root_fd, path, base64.b64decode(content), slot.uid)
        outcome = program.run(job, sock)
        owners = {os.getuid() if slot.uid is None else slot.uid}
        budget = job.max_fetch_bytes
        for path in job.fetch_files:
            data = read_file(root_fd, path, budget, owners)
            if data is not None:
                budget -= len(data)
                outcome.files[path] = base64.b64encode(data).decode()
        return outcome
    finally:
        os.close(root_fd)


class ProgramProcess:
    """The forked program process (waiting for its Go) and the supervisor's ends of its pipes."""

    def __init__(self, slot: SlotSpec, mount_ns_fd: int | None, sock: socket.socket) -> None:
        self.cwd = "/tmp" if mount_ns_fd is not None else slot.workdir  # the workdir is /tmp in the slot namespace
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        stdin_r, self.stdin_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        self.status_r, status_w = os.pipe()
        go_r, self.go_w = os.pipe()
        for fd in (self.out_r, self.err_r):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # fewer wake-ups for chatty programs
            except OSError:
                pass
        plan = ChildPlan(
            cwd=self.cwd, uid=slot.uid, mount_ns_fd=mount_ns_fd, supervisor_pid=os.getpid(), stdin_fd=stdin_r,
            stdout_fd=out_w, stderr_fd=err_w, status_fd=status_w, go_fd=go_r, detach=(sock,),
        )
        self.pid = os.fork()
        if self.pid == 0:
            run_child(plan)
        for fd in (stdin_r, out_w, err_w, status_w, go_r):
            os.close(fd)
        self.pidfd = os.pidfd_open(self.pid)
        self.reaped = False
        self.wait_status = 0

    def run(self, job: Job, sock: socket.socket) -> Outcome:
        go = Go(
            code=job.code, filename=os.path.join(self.cwd, "main.py"), limits=job.limits,
            env={**job.env, "HOME": self.cwd, "TMPDIR": self.cwd, "PWD": self.cwd},
        )
        streams = {fd: CappedOutput(fd, job.max_output_bytes, self.devnull) for fd in (self.out_r, self.err_r)}
        watch = _Watch(self, streams, (job.stdin or "").encode("utf-8", "surrogateescape"), sock)
        start = time.monotonic()
        _send_go(self.go_w, go.model_dump_json().encode())
        self.go_w = -1
        ended = watch.wait(start + job.run_timeout)
        elapsed = time.monotonic() - start
        if ended in ("timeout", "server-gone"):
            self.kill()
        elif ended == "exited":
            self.reap()
        watch.drain()
        if watch.setup_error or not watch.started:
            reason = watch.setup_error or f"it died during set-up (status {self.wait_status})"
            return Outcome(kind="error", message=f"sandbox could not start the program: {reason}")
        if ended == "server-gone":
            return Outcome(kind="error", message="the server closed the connection")
        stdout, stderr = streams[self.out_r].text(), streams[self.err_r].text()
        if ended == "timeout":
            return Outcome(kind="timeout", stdout=stdout, stderr=stderr, execution_time=round(elapsed, 6))
        return_code = watch.done_code if ended == "done" else os.waitstatus_to_exitcode(self.wait_status)
        return Outcome(
            kind="finished", return_code=return_code, stdout=stdout, stderr=stderr, execution_time=round(elapsed, 6)
        )

    def kill(self) -> None:
        if self.reaped:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)  # its process group; the unreaped pid keeps the id ours
        except (ProcessLookupError, PermissionError):
            pass
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        if not self.reaped:
            _, self.wait_status = os.waitpid(self.pid, 0)
            self.reaped = True

    def finish(self, uid: int | None) -> None:
        """Kill and reap the program process and everything it left running; close our fds."""
        self.kill()
        self.reap()
        kill_leftovers(uid)
        for fd in (self.pidfd, self.devnull, self.stdin_w, self.out_r, self.err_r, self.status_r, self.go_w):
            if fd != -1:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _send_go(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass  # it died while preparing; its status line says why
    finally:
        os.close(fd)


class _Watch:
    """The poll loop over one running program: its pipes, its status line, its exit, the server."""

    def __init__(
        self, program: ProgramProcess, streams: dict[int, CappedOutput], stdin: bytes, sock: socket.socket
    ) -> None:
        self.program = program
        self.streams = streams
        self._stdin = memoryview(stdin)
        self._stdin_fd = program.stdin_w
        self._status = bytearray()
        self._sock_fd = sock.fileno()
        self.poller = select.poll()
        self.setup_error = ""
        self.started = False
        self.done_code: int | None = None
        for fd in (*streams, program.status_r):
            os.set_blocking(fd, False)
        for fd in (*streams, program.status_r, program.pidfd, self._sock_fd):
            self.poller.register(fd, select.POLLIN)
        os.set_blocking(self._stdin_fd, False)
        self.poller.register(self._stdin_fd, select.POLLOUT)
        if not self._stdin:
            self._close_stdin()  # no stdin: the program reads end-of-file at once

    def wait(self, deadline: float) -> str:
        """Returns "done", "exited", "timeout" or "server-gone"."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            exited = gone = False
            for fd, _ in self.poller.poll(max(1, int(remaining * 1000) + 1)):
                if fd == self.program.pidfd:
                    exited = True
                elif fd == self._sock_fd:
                    gone = True
                else:
                    self._handle(fd)
            if gone:
                return "server-gone"
            if self.done_code is not None:
                return "done"
            if exited:
                return "exited"

    def drain(self) -> None:
        """Take what the pipes hold right now; never wait (daemons may keep them open)."""
        for stream in self.streams.values():
            while not stream.eof and stream.pump():
                pass
        self._read_status()

    def _handle(self, fd: int) -> None:
        stream = self.streams.get(fd)
        if stream is not None:
            stream.pump()
            if stream.eof:
                self.poller.unregister(fd)
        elif fd == self.program.status_r:
            self._read_status()
        elif fd == self._stdin_fd:
            try:
                written = os.write(fd, self._stdin[:_STDIN_CHUNK])
                self._stdin = self._stdin[written:]
            except BlockingIOError:
                return
            except OSError:  # the program closed stdin: it does not want the rest
                self._stdin = self._stdin[:0]
            if not self._stdin:
                self._close_stdin()

    def _read_status(self) -> None:
        try:
            while chunk := os.read(self.program.status_r, 4096):
                self._status += chunk
                if len(self._status) > 1 << 16:  # the program is flooding fd 3: ignore the excess
                    del self._status[: len(self._status) - (1 << 16)]
        except BlockingIOError:
            pass
        *lines, rest = self._status.split(b"\n")
        self._status = bytearray(rest)
        for line in lines:
            self._status_line(line.decode("utf-8", "replace"))

    def _status_line(self, line: str) -> None:
        if not self.started:
            if line == "started":
                self.started = True
            elif line.startswith("error "):
                self.setup_error = line.removeprefix("error ")
        elif line.startswith("done ") and self.done_code is None:
            try:
                self.done_code = int(line.removeprefix("done "))
            except ValueError:
                pass

    def _close_stdin(self) -> None:
        self.poller.unregister(self._stdin_fd)
        os.close(self._stdin_fd)
        self.program.stdin_w = -1


def kill_leftovers(uid: int | None) -> None:
    """Kill and reap every process the program left running (the program itself is reaped)."""
    if not _has_children():
        return
    if uid is not None:
        _kill_uid(uid)
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while time.monotonic() < deadline:
        if uid is None:  # no uid of its own: find the orphans (they are our children) and kill them
            for pid in _children_of(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not _has_children():
            return
        time.sleep(0.002)


def _has_children() -> bool:
    """Reap exited children; True while some are still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _kill_uid(uid: int) -> None:
    """kill(-1, SIGKILL) as the slot's uid: one atomic pass over every process of that uid.

    The kernel holds the task list lock for the whole pass, so a fork bomb cannot outrun it.
    It runs in a throwaway child because the supervisor itself must stay root.
    """
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


def _children_of(parent: int) -> list[int]:
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


def reset_slot(slot: SlotSpec, kill: bool) -> bool:
    """Leave the slot as new: an empty working directory it owns (with `kill`: nothing of its uid running)."""
    try:
        if kill and slot.uid is not None:
            _kill_uid(slot.uid)
        root_fd = os.open(slot.workdir, _DIR_FLAGS)
        try:
            for entry in os.scandir(root_fd):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.name, dir_fd=root_fd)
                else:
                    os.unlink(entry.name, dir_fd=root_fd)
            if slot.uid is not None:
                os.fchown(root_fd, slot.uid, slot.uid)
            os.fchmod(root_fd, 0o700)
        finally:
            os.close(root_fd)
        return True
    except OSError:
        return False
