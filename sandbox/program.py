"""Drive one prepared program process from the server's event loop.

The forker handed over the program process's pipes and a pidfd. Here: send the Go (code,
limits, environment), feed stdin, read stdout/stderr as they come (capped, never blocking
the program), watch the status line ("started", "done <rc>") and the pidfd, and enforce the
wall-clock deadline. The run ends at the first of: "done" (reported before the process
tears down its address space), the process exiting, the deadline, or a set-up error.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sandbox.output import CappedOutput
from sandbox.protocol import Go, ExecutionOutcome

_WRITE_CHUNK = 1 << 16
_STATUS_LIMIT = 1 << 16
SETUP_TIMEOUT_S = 60.0  # from Go to "started": files written, limits set, uid dropped


class ProgramNotStarted(Exception):
    """The program process failed or vanished before the program began: safe to retry elsewhere."""


class ProgramRefused(Exception):
    """The request itself could not be set up (its files could not be written): not retried."""


@dataclass
class ProgramFds:
    """The server's ends of one program process (from the forker's `Prepared`)."""

    pid: int
    go_w: int
    stdin_w: int
    out_r: int
    err_r: int
    status_r: int
    pidfd: int

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # a pidfd never names a recycled pid
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for fd in (self.go_w, self.stdin_w, self.out_r, self.err_r, self.status_r, self.pidfd):
            if fd != -1:
                os.close(fd)
        self.go_w = self.stdin_w = self.out_r = self.err_r = self.status_r = self.pidfd = -1


async def run_program(
    fds: ProgramFds, go: Go, stdin: str | None, timeout: float, max_output_bytes: int,
    exit_status: Callable[[], Awaitable[int]],
) -> ExecutionOutcome:
    """Run the program; `exit_status` yields the wait status once the forker has reaped it.
    Raises ProgramNotStarted when the program never began (nothing of it ran)."""
    run = _Run(fds, max_output_bytes)
    try:
        return await run.execute(go, (stdin or "").encode("utf-8"), timeout, exit_status)
    finally:
        run.detach()


class _Run:
    def __init__(self, fds: ProgramFds, max_output_bytes: int) -> None:
        self.fds = fds
        self.loop = asyncio.get_running_loop()
        self.devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.streams = {fd: CappedOutput(fd, max_output_bytes, self.devnull) for fd in (fds.out_r, fds.err_r)}
        self.ended: asyncio.Future[str] = self.loop.create_future()
        self.started = False
        self.setup_error = ""
        self.refused = False
        self.begun: asyncio.Future[None] = self.loop.create_future()  # "started" arrived
        self.done_code: int | None = None
        self._status = bytearray()
        self._writers: list[int] = []
        self._readers: list[int] = []

    async def execute(
        self, go: Go, stdin: bytes, timeout: float, exit_status: Callable[[], Awaitable[int]]
    ) -> ExecutionOutcome:
        for fd in self.streams:
            os.set_blocking(fd, False)
            self._read(fd, functools.partial(self._on_output, fd))
        os.set_blocking(self.fds.status_r, False)
        self._read(self.fds.status_r, self._on_status)
        self._read(self.fds.pidfd, lambda: self._end("exited"))
        self._feed(self.fds.go_w, go.encode(), "go_w")
        self._feed(self.fds.stdin_w, stdin, "stdin_w")
        # The run's clock starts when the program does: on a starved machine the set-up (files,
        # limits, uid) may take longer than a short run timeout, and that is not the program's time.
        first: list[asyncio.Future[Any]] = [self.begun, self.ended]
        setup = asyncio.ensure_future(asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED))
        try:
            await asyncio.wait_for(setup, SETUP_TIMEOUT_S)
        except TimeoutError:
            pass  # never started: ProgramNotStarted below
        start = time.monotonic()
        try:
            ended = await asyncio.wait_for(asyncio.shield(self.ended), timeout if self.started else 0)
        except TimeoutError:
            # A busy event loop may run the deadline before an end that came first: that end wins.
            self._on_status()
            ended = self.ended.result() if self.ended.done() else "timeout"
        elapsed = round(time.monotonic() - start, 6)
        if ended == "timeout":
            self.fds.kill()
        self._drain()
        if not self.started:
            self.fds.kill()
            if self.refused:
                raise ProgramRefused(self.setup_error)
            raise ProgramNotStarted(self.setup_error or f"the program process ended before the program began ({ended})")
        stdout, stderr = (self.streams[fd].text() for fd in (self.fds.out_r, self.fds.err_r))
        if ended == "timeout":
            return ExecutionOutcome(kind="timeout", stdout=stdout, stderr=stderr, execution_time=elapsed)
        code = self.done_code if ended == "done" else os.waitstatus_to_exitcode(await exit_status())
        return ExecutionOutcome(kind="finished", return_code=code, stdout=stdout, stderr=stderr, execution_time=elapsed)

    def detach(self) -> None:
        """Stop watching every fd (the caller closes them) and close our own."""
        for fd in self._readers:
            self.loop.remove_reader(fd)
        for fd in self._writers:
            self.loop.remove_writer(fd)
        os.close(self.devnull)

    def _end(self, how: str) -> None:
        if not self.ended.done():
            self.ended.set_result(how)

    def _read(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, callback)
        self._readers.append(fd)

    def _on_output(self, fd: int) -> None:
        stream = self.streams[fd]
        stream.pump()
        if stream.eof:
            self.loop.remove_reader(fd)
            self._readers.remove(fd)

    def _drain(self) -> None:
        """Take what the pipes hold right now; never wait (a daemon may hold them open)."""
        for stream in self.streams.values():
            while not stream.eof and stream.pump():
                pass
        self._on_status()

    def _on_status(self) -> None:
        fd = self.fds.status_r
        try:
            while chunk := os.read(fd, 4096):
                self._status += chunk[: max(0, _STATUS_LIMIT - len(self._status))]
        except BlockingIOError:
            pass
        except OSError:
            return
        *lines, rest = self._status.split(b"\n")
        self._status = bytearray(rest)
        for line in lines:
            self._status_line(line.decode("utf-8", "replace"))

    def _status_line(self, line: str) -> None:
        if not self.started:
            if line == "started":
                self.started = True
                if not self.begun.done():
                    self.begun.set_result(None)
            elif line.startswith(("error ", "refused ")):
                word, _, self.setup_error = line.partition(" ")
                self.refused = word == "refused"
                self._end("error")
        elif line.startswith("done ") and self.done_code is None:
            try:
                self.done_code = int(line.removeprefix("done "))
            except ValueError:
                return
            self._end("done")

    def _feed(self, fd: int, data: bytes, name: str) -> None:
        """Write `data` to a pipe without blocking, then close it (end of file for the reader)."""
        view = memoryview(data)

        def close() -> None:
            if fd in self._writers:
                self.loop.remove_writer(fd)
                self._writers.remove(fd)
            os.close(fd)
            setattr(self.fds, name, -1)

        def write() -> None:
            nonlocal view
            try:
                while view:
                    view = view[os.write(fd, view[:_WRITE_CHUNK]) :]
            except BlockingIOError:
                if fd not in self._writers:
                    self.loop.add_writer(fd, write)
                    self._writers.append(fd)
                return
            except OSError:  # the reader is gone (closed stdin, or died in set-up)
                pass
            close()

        os.set_blocking(fd, False)
        write()
