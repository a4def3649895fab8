"""The server's side of execution: the zygote process, the slot pool and the per-request talk.

Each slot keeps a prepared worker: the zygote was handed one end of a fresh socket pair
(SCM_RIGHTS), forked a supervisor for it, which forked the program process; the supervisor's
pid is held as a pidfd (a kill can never hit a recycled pid). A request only sends the `Job`
and awaits the `Outcome`: both forks happened before it arrived. The slot gets its next worker
in the background after the supervisor reports it clean. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from sandbox.pool import SlotPool
from sandbox.protocol import (
    ChildLimits,
    Cleaned,
    Hello,
    Isolation,
    Job,
    Outcome,
    Prepare,
    SlotSpec,
    ZygoteConfig,
    ZygoteReady,
    encode_frame,
    header_size,
    parse_header,
)
from sandbox.settings import MIB, SandboxSettings
from sandbox.workspace import Workspace, create_workspace

HELLO_TIMEOUT_S = 30.0
GRACE_S = 15.0  # beyond run_timeout: writing files, draining output, fetching files
CLEANUP_TIMEOUT_S = 60.0
ZYGOTE_START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ExecutionRequest:
    """A validated request (paths checked, timeout clamped, memory resolved)."""

    code: str
    stdin: str | None
    files: dict[str, str]
    fetch_files: list[str]
    run_timeout: float
    memory_limit_mb: int


class Counters(BaseModel):
    executions: int = 0  # programs that ran to an end (exit or time limit)
    timeouts: int = 0
    errors: int = 0  # sandbox faults (SandboxError)
    rejected: int = 0  # refused with 503: queue full
    zygote_restarts: int = 0


def program_env() -> dict[str, str]:
    """The whole environment a program sees (plus HOME/TMPDIR/PWD set per execution)."""
    return {
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        # One thread per BLAS and one malloc arena pair: a fork from a single-threaded zygote is
        # safe, and threads stay within the address-space limit.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
        "MPLBACKEND": "Agg",
    }


class ZygoteUnavailable(RuntimeError):
    pass


class ZygoteProcess:
    """Starts the zygote with a clean environment and hands it request sockets."""

    def __init__(self, settings: SandboxSettings, slots: list[SlotSpec]) -> None:
        self._settings = settings
        self._slots = slots
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self.ready: ZygoteReady | None = None

    async def start(self) -> ZygoteReady:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = ZygoteConfig(
            control_fd=child.fileno(), preload=list(self._settings.preload), warmup=self._settings.warmup,
            slots=self._slots,
        )
        env = {**program_env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox.zygote", config.model_dump_json()],
                pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL, cwd="/", start_new_session=True,
            )
        finally:
            child.close()
        parent.setblocking(False)
        self._control = parent
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(parent, 1 << 20), ZYGOTE_START_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError) as exc:
            self.stop()
            raise ZygoteUnavailable(f"the sandbox zygote did not start: {exc!r}") from exc
        if not data:
            code = self._proc.wait()
            self.stop()
            raise ZygoteUnavailable(f"the sandbox zygote exited during start-up with status {code}")
        parse_header(data[: header_size()])
        self.ready = ZygoteReady.model_validate_json(data[header_size() :])
        return self.ready

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._control is not None

    async def dispatch(self, sock: socket.socket) -> None:
        if not self.alive or self._control is None:
            raise ZygoteUnavailable("the sandbox zygote is not running")
        while True:
            try:
                socket.send_fds(self._control, [b"j"], [sock.fileno()])
                return
            except BlockingIOError:
                await asyncio.sleep(0.001)

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None


@dataclass
class Worker:
    """A supervisor forked for one slot, its program process already waiting: ready for a job."""

    slot: SlotSpec
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pidfd: int

    def alive(self) -> bool:
        return not select.select([self.pidfd], [], [], 0)[0]  # a pidfd turns readable when the process exits

    def discard(self) -> None:
        _kill(self.pidfd)
        self.writer.close()


class Executor:
    """Slots, each with a prepared worker; a request takes a slot, uses its worker, and the slot
    is given a fresh worker in the background before it is offered again."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.counters = Counters()
        self.workspace: Workspace | None = None
        self.pool: SlotPool | None = None
        self.zygote: ZygoteProcess | None = None
        self._workers: dict[int, Worker] = {}
        self._restart_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def isolation(self) -> Isolation:
        return self.zygote.ready.isolation if self.zygote and self.zygote.ready else Isolation()

    @property
    def prepared(self) -> int:
        return len(self._workers)

    async def start(self) -> None:
        self.workspace = create_workspace(self.settings)
        self.pool = SlotPool(self.workspace.slots, self.settings.max_queue)
        self.zygote = ZygoteProcess(self.settings, self.workspace.slots)
        await self.zygote.start()
        workers = await asyncio.gather(*(self._prepare(slot) for slot in self.workspace.slots), return_exceptions=True)
        for worker in workers:
            if isinstance(worker, Worker):
                self._workers[worker.slot.index] = worker

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for worker in self._workers.values():
            worker.discard()
        self._workers.clear()
        if self.zygote is not None:
            self.zygote.stop()
        if self.workspace is not None:
            self.workspace.close()

    async def run(self, request: ExecutionRequest) -> Outcome:
        """Execute one program; raises QueueFullError when the queue is full."""
        assert self.pool is not None, "Executor.start() was not awaited"
        slot = await self.pool.acquire()
        worker: Worker | None = None
        handed_off = False
        try:
            worker = self._workers.pop(slot.index, None)
            if worker is None or not worker.alive():
                if worker is not None:
                    worker.discard()
                worker = await self._prepare(slot)
            worker.writer.write(encode_frame(self._job(request)))
            await worker.writer.drain()
            body = await asyncio.wait_for(_read_frame(worker.reader), request.run_timeout + GRACE_S)
            outcome = Outcome.model_validate_json(body)
            task = asyncio.create_task(self._recycle(worker))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            handed_off = True
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValidationError,
                ZygoteUnavailable) as exc:
            outcome = Outcome(kind="error", message=f"sandbox executor failed: {type(exc).__name__}: {exc}")
        finally:
            if not handed_off:
                if worker is not None:
                    worker.discard()
                self.pool.release(slot, dirty=True)
        self._count(outcome)
        return outcome

    async def _prepare(self, slot: SlotSpec) -> Worker:
        assert self.pool is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self._dispatch(child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        try:
            writer.write(encode_frame(Prepare(slot=slot, dirty=self.pool.is_dirty(slot))))
            hello = Hello.model_validate_json(await asyncio.wait_for(_read_frame(reader), HELLO_TIMEOUT_S))
            # The supervisor now waits for its job, so this pid cannot have been recycled.
            return Worker(slot=slot, reader=reader, writer=writer, pidfd=os.pidfd_open(hello.pid))
        except BaseException:
            writer.close()
            raise

    async def _recycle(self, worker: Worker) -> None:
        """Wait for the used worker's clean-up, give the slot a fresh worker, then free the slot."""
        assert self.pool is not None
        clean = False
        try:
            body = await asyncio.wait_for(_read_frame(worker.reader), CLEANUP_TIMEOUT_S)
            clean = Cleaned.model_validate_json(body).ok
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValidationError):
            clean = False
        finally:
            if clean:
                os.close(worker.pidfd)
                worker.writer.close()
            else:
                worker.discard()
            if not clean:
                self.pool.release(worker.slot, dirty=True)
        if not clean:
            return
        self.pool.mark(worker.slot, dirty=False)
        try:
            self._workers[worker.slot.index] = await self._prepare(worker.slot)
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValidationError,
                ZygoteUnavailable):
            pass  # the next request in this slot prepares one itself
        finally:
            self.pool.release(worker.slot, dirty=False)

    async def _dispatch(self, sock: socket.socket) -> None:
        assert self.zygote is not None
        try:
            await self.zygote.dispatch(sock)
            return
        except (ZygoteUnavailable, OSError):
            pass
        async with self._restart_lock:  # one restart for everyone who noticed the death
            if not self.zygote.alive:
                self.zygote.stop()
                self.counters.zygote_restarts += 1
                await self.zygote.start()
        await self.zygote.dispatch(sock)

    def _job(self, request: ExecutionRequest) -> Job:
        s = self.settings
        limits = ChildLimits(
            address_space_bytes=request.memory_limit_mb * MIB,
            stack_bytes=s.stack_mb * MIB,
            cpu_seconds=math.ceil(request.run_timeout) + 1,
            processes=s.max_processes if self.isolation.separate_uid else None,
            file_size_bytes=s.max_file_bytes,
            open_files=s.max_open_files,
        )
        return Job(
            code=request.code, stdin=request.stdin, files=request.files, fetch_files=request.fetch_files,
            run_timeout=request.run_timeout, max_output_bytes=s.max_output_bytes, max_fetch_bytes=s.max_fetch_bytes,
            limits=limits, env=program_env(),
        )

    def _count(self, outcome: Outcome) -> None:
        if outcome.kind == "error":
            self.counters.errors += 1
        else:
            self.counters.executions += 1
            if outcome.kind == "timeout":
                self.counters.timeouts += 1


def _kill(pidfd: int | None) -> None:
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = parse_header(await reader.readexactly(header_size()))
    return await reader.readexactly(size)
