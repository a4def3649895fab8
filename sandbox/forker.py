"""The forker: one per slot, forked from the zygote once, forks that slot's program processes.

    loop:  Prepare ─▶ empty the slot's directory (no program of it is left)
                      fork the program process (it prepares itself and waits for Go)
                      send its pid and the fds the server drives it with
           wait until it exits; kill its process group; reap it
           kill whatever it left behind (we are a child subreaper)
           Exited ─▶

It handles no request data at all - the server talks to the program process directly - so
its memory, which every program process inherits, holds nothing of any other request.
Having one per slot keeps "my children" == "this slot's processes".
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket

from sandbox import linux
from sandbox.child import ChildPlan, run_child
from sandbox.protocol import Exited, Prepare, Prepared, SlotSpec
from sandbox.reaper import kill_leftovers, kill_uid
from sandbox.view import ViewPlan, reset_upper, slot_layout

PIPE_SIZE = 1 << 20


def serve_slot(sock: socket.socket, slot: SlotSpec, mount_ns_fd: int | None, view: ViewPlan | None = None) -> None:
    """Serve one slot until the server closes `sock`. `slot.uid` None: no separate uid."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores SIGCHLD; we wait for ours
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote gone means the server is gone
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    private = view is not None or mount_ns_fd is not None
    cwd = "/tmp" if private else slot.workdir  # the workdir is /tmp in the view and the slot namespace
    upper = slot_layout(slot.scratch)[0]
    while True:
        data = sock.recv(4096)
        if not data:
            return
        if Prepare.model_validate_json(data).dirty and slot.uid is not None:
            kill_uid(slot.uid)  # a program of a lost request may still run as this uid
        # Every process of the last program is gone (reaped above, or killed just now), so no
        # view of this slot is mounted while its upper directory is emptied.
        reset_upper(upper, slot.uid, opaque=view is not None, writable=view.writable if view else None)
        pid, fds = _fork_program(slot, cwd, mount_ns_fd, view, sock)
        try:
            socket.send_fds(sock, [Prepared(pid=pid).encode()], fds)
        finally:
            for fd in fds:
                os.close(fd)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: its ids stay ours
        try:
            os.killpg(pid, signal.SIGKILL)  # the rest of its process group
        except (ProcessLookupError, PermissionError):
            pass
        _, status = os.waitpid(pid, 0)
        leftovers = kill_leftovers(slot.uid)
        sock.send(Exited(status=status, leftovers=leftovers).encode())


def _fork_program(
    slot: SlotSpec, cwd: str, mount_ns_fd: int | None, view: ViewPlan | None, sock: socket.socket
) -> tuple[int, list[int]]:
    """Fork the program process; return its pid and the server's ends of its pipes."""
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    go_r, go_w = os.pipe()
    for fd in (out_r, err_r):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # fewer wake-ups for chatty programs
        except OSError:
            pass
    plan = ChildPlan(
        cwd=cwd, uid=slot.uid, mount_ns_fd=mount_ns_fd, parent_pid=os.getpid(), stdin_fd=stdin_r,
        stdout_fd=out_w, stderr_fd=err_w, status_fd=status_w, go_fd=go_r, detach=(sock,), view=view,
    )
    pid = os.fork()
    if pid == 0:
        run_child(plan)
    for fd in (stdin_r, out_w, err_w, status_w, go_r):
        os.close(fd)
    return pid, [go_w, stdin_w, out_r, err_r, status_r, os.pidfd_open(pid)]
