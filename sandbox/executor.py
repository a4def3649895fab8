"""The server's side of execution: the zygote, one forker per slot, and the per-request work.

Each slot keeps a prepared program process: its forker (forked from the zygote once) forked it
ahead of time and handed the server its pipes and pidfd; it has built its private view of the
filesystem meanwhile. A request takes a slot and drives the program directly from the event
loop (`sandbox.program`; the program process writes the request's files itself); the fork was
paid before the request arrived. Afterwards, in the background: the program is killed if still
there, the forker reports it reaped (and any leftovers killed), empties the slot's directory
and prepares the next program process, and only then is the slot free again.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from sandbox import workdir
from sandbox.lifetime import Activity
from sandbox.pool import SlotPool
from sandbox.program import ProgramFds, ProgramNotStarted, ProgramRefused, run_program
from sandbox.protocol import (
    ChildLimits,
    Exited,
    Go,
    Isolation,
    ExecutionOutcome,
    Prepare,
    Prepared,
    SlotSpec,
    SpawnForker,
    ZygoteConfig,
    ZygoteReady,
)
from sandbox.settings import MIB, SandboxSettings
from sandbox.view import slot_layout
from sandbox.workspace import Workspace, create_workspace

PREPARE_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 30.0
ZYGOTE_START_TIMEOUT_S = 180.0
_FAULTS = (OSError, EOFError, asyncio.TimeoutError, ValidationError)


@dataclass(frozen=True)
class ExecutionRequest:
    """A validated request (paths checked, timeout clamped, memory resolved)."""

    code: str
    stdin: str | None
    files: dict[str, str]
    fetch_files: list[str]
    run_timeout: float
    memory_limit_mb: int
    queue_timeout: float = math.inf  # seconds it may wait for a slot (not part of run_timeout)


class Counters(BaseModel):
    executions: int = 0  # programs that ran to an end (exit or time limit)
    timeouts: int = 0
    errors: int = 0  # sandbox faults (SandboxError)
    rejected: int = 0  # refused with 503: queue full
    queue_timeouts: int = 0  # waited their queue bound for a slot and never ran
    zygote_restarts: int = 0
    leftovers_killed: int = 0  # executions that left processes behind (killed)


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
    """Starts the zygote with a clean environment and asks it for forkers."""

    def __init__(self, settings: SandboxSettings, slots: list[SlotSpec]) -> None:
        self._settings = settings
        self._slots = slots
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self.ready: ZygoteReady | None = None

    async def start(self) -> ZygoteReady:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = ZygoteConfig(
            control_fd=child.fileno(), work_root=self._settings.work_root,
            filesystem_view=self._settings.filesystem_view, preload=list(self._settings.preload),
            warmup=self._settings.warmup, slots=self._slots,
        )
        env = {**program_env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        if self._settings.hash_seed is not None:  # programs are forks: they keep the zygote's seed
            env["PYTHONHASHSEED"] = str(self._settings.hash_seed)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sandbox.zygote", config.model_dump_json()],
                pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL, cwd="/", start_new_session=True,
            )
        finally:
            child.close()
        parent.setblocking(False)
        self._control = parent
        try:
            data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(parent, 1 << 20), ZYGOTE_START_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            self.stop()
            raise ZygoteUnavailable(f"the sandbox zygote did not start: {exc!r}") from exc
        if not data:
            code = self._proc.wait()
            self.stop()
            raise ZygoteUnavailable(f"the sandbox zygote exited during start-up with status {code}")
        self.ready = ZygoteReady.model_validate_json(data)
        return self.ready

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._control is not None

    async def spawn_forker(self, slot: int) -> socket.socket:
        """A connected socket to a new forker for `slot`."""
        if not self.alive or self._control is None:
            raise ZygoteUnavailable("the sandbox zygote is not running")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            while True:
                try:
                    socket.send_fds(self._control, [SpawnForker(slot=slot).encode()], [theirs.fileno()])
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None


class SlotRunner:
    """One slot: its forker connection and its prepared program process."""

    def __init__(self, slot: SlotSpec, executor: Executor) -> None:
        self.slot = slot
        self._executor = executor
        self._forker: socket.socket | None = None
        self.program: ProgramFds | None = None
        self._running: tuple[ProgramFds, asyncio.Task[Exited]] | None = None
        # A program of this slot's uid may still run (e.g. left by a server that was killed):
        # the next Prepare has the forker kill everything of that uid first.
        self.dirty = True

    async def ensure_prepared(self) -> None:
        """Make sure a live program process waits in this slot (one retry with a new forker)."""
        if self.program is not None and _alive(self.program.pidfd):
            return
        if self.program is not None:  # killed while waiting (its forker died): start over
            self.fail()
        for attempt in range(2):
            try:
                if self._forker is None:
                    self._forker = await self._executor.spawn_forker(self.slot.index)
                self._forker.send(Prepare(dirty=self.dirty).encode())
                msg, fds = await asyncio.wait_for(_recv_fds(self._forker, 6), PREPARE_TIMEOUT_S)
                if len(fds) != 6:
                    for fd in fds:
                        os.close(fd)
                    raise EOFError("the forker closed its socket")
                self.program = ProgramFds(Prepared.model_validate_json(msg).pid, *fds)
                self.dirty = False  # the forker killed the uid's processes and emptied the slot
                return
            except (*_FAULTS, ZygoteUnavailable):
                self.fail()
                if attempt:
                    raise

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run `request` in the prepared program process (call `settle` before the next one)."""
        program, self.program = self.program, None
        assert program is not None and self._forker is not None
        forker = self._forker
        exited = asyncio.ensure_future(_recv_exited(forker))
        self._running = (program, exited)
        executor = self._executor
        settings, isolation = executor.settings, executor.isolation
        cwd = "/tmp" if isolation.private_tmp else self.slot.workdir
        go = Go(
            code=request.code, filename=os.path.join(cwd, "main.py"), files=request.files,
            limits=executor.limits(request), env={**program_env(), "HOME": cwd, "TMPDIR": cwd, "PWD": cwd},
        )

        async def exit_status() -> int:
            return (await asyncio.wait_for(asyncio.shield(exited), SETTLE_TIMEOUT_S)).status

        outcome = await run_program(program, go, request.stdin, request.run_timeout, settings.max_output_bytes, exit_status)
        if request.fetch_files:
            upper = slot_layout(self.slot.scratch)[0] if isolation.private_root else None
            outcome.files = await asyncio.to_thread(
                workdir.fetch_files, self.slot.workdir, upper, request.fetch_files, self.slot_uid,
                settings.max_fetch_bytes,
            )
        return outcome

    async def settle(self) -> None:
        """After a run: the program gone, its leftovers killed (the forker empties the slot at
        the next Prepare)."""
        assert self._running is not None
        program, exited = self._running
        self._running = None
        program.kill()
        try:
            report = await asyncio.wait_for(exited, SETTLE_TIMEOUT_S)
        finally:
            program.close()
        if report.leftovers:
            self._executor.counters.leftovers_killed += 1

    def fail(self) -> None:
        """Drop the forker and any program; the next use starts a new forker that cleans up."""
        running = self._running
        for program in (self.program, running[0] if running else None):
            if program is not None:
                program.kill()
                program.close()
        if running:
            running[1].cancel()
        self.program = None
        self._running = None
        if self._forker is not None:
            self._forker.close()
            self._forker = None
        self.dirty = True

    @property
    def slot_uid(self) -> int | None:
        return self.slot.uid if self._executor.isolation.separate_uid else None


class Executor:
    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.counters = Counters()
        self.activity = Activity()
        self.workspace: Workspace | None = None
        self.pool: SlotPool | None = None
        self.zygote: ZygoteProcess | None = None
        self.runners: dict[int, SlotRunner] = {}
        self._restart_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def isolation(self) -> Isolation:
        return self.zygote.ready.isolation if self.zygote and self.zygote.ready else Isolation()

    @property
    def prepared(self) -> int:
        return sum(1 for r in self.runners.values() if r.program is not None)

    async def start(self) -> None:
        self.workspace = create_workspace(self.settings)
        self.pool = SlotPool(self.workspace.slots, self.settings.max_queue)
        self.zygote = ZygoteProcess(self.settings, self.workspace.slots)
        await self.zygote.start()
        self.runners = {slot.index: SlotRunner(slot, self) for slot in self.workspace.slots}
        await asyncio.gather(*(r.ensure_prepared() for r in self.runners.values()), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for runner in self.runners.values():
            runner.fail()
        if self.zygote is not None:
            self.zygote.stop()
        if self.workspace is not None:
            self.workspace.close()

    async def run(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Execute one program; raises QueueFullError when the queue is full, QueueTimeoutError when
        no slot came within the request's queue bound (nothing ran either way)."""
        assert self.pool is not None, "Executor.start() was not awaited"
        self.activity.begin()
        try:
            return await self._run(request)
        finally:
            self.activity.end()

    async def _run(self, request: ExecutionRequest) -> ExecutionOutcome:
        assert self.pool is not None
        slot = await self.pool.acquire(request.queue_timeout)
        runner = self.runners[slot.index]
        try:
            try:
                await runner.ensure_prepared()
                outcome = await runner.execute(request)
            except ProgramNotStarted:  # e.g. its forker died with a restarted zygote: nothing ran yet
                runner.fail()
                await runner.ensure_prepared()
                outcome = await runner.execute(request)
        except ProgramRefused as exc:  # the request's files could not be written; the slot is fine
            outcome = ExecutionOutcome(kind="error", message=f"sandbox could not set up the request: {exc}")
            self._recycle_later(runner)
        except (*_FAULTS, ZygoteUnavailable, ProgramNotStarted) as exc:
            runner.fail()
            self.pool.release(slot)
            outcome = ExecutionOutcome(kind="error", message=f"sandbox executor failed: {type(exc).__name__}: {exc}")
        except BaseException:  # cancelled: never leak the slot
            runner.fail()
            self.pool.release(slot)
            raise
        else:
            self._recycle_later(runner)
        self._count(outcome)
        return outcome

    def _recycle_later(self, runner: SlotRunner) -> None:
        task = asyncio.create_task(self._recycle(runner))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _recycle(self, runner: SlotRunner) -> None:
        try:
            await runner.settle()
            await runner.ensure_prepared()  # the slot is offered again with a program waiting
        except (*_FAULTS, ZygoteUnavailable):
            runner.fail()
        finally:
            assert self.pool is not None
            self.pool.release(runner.slot)

    async def spawn_forker(self, slot: int) -> socket.socket:
        assert self.zygote is not None
        if not self.zygote.alive:
            async with self._restart_lock:  # one restart for everyone who noticed the death
                if not self.zygote.alive:
                    self.zygote.stop()
                    self.counters.zygote_restarts += 1
                    await self.zygote.start()
        return await self.zygote.spawn_forker(slot)

    def limits(self, request: ExecutionRequest) -> ChildLimits:
        s = self.settings
        return ChildLimits(
            address_space_bytes=request.memory_limit_mb * MIB,
            stack_bytes=s.stack_mb * MIB,
            cpu_seconds=math.ceil(request.run_timeout) + 1,
            processes=s.max_processes if self.isolation.separate_uid else None,
            file_size_bytes=s.max_file_bytes,
            open_files=s.max_open_files,
        )

    def _count(self, outcome: ExecutionOutcome) -> None:
        if outcome.kind == "error":
            self.counters.errors += 1
        else:
            self.counters.executions += 1
            if outcome.kind == "timeout":
                self.counters.timeouts += 1


def _alive(pidfd: int) -> bool:
    return not select.select([pidfd], [], [], 0)[0]  # a pidfd turns readable when its process exits


async def _recv_fds(sock: socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    """One SEQPACKET message and its fds, without blocking the loop."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, maxfds)
            if not msg and not fds:
                raise EOFError("the forker closed its socket")
            return msg, fds
        except BlockingIOError:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock, _resolve, readable)
            try:
                await readable
            finally:
                loop.remove_reader(sock)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _recv_exited(sock: socket.socket) -> Exited:
    msg, fds = await _recv_fds(sock, 1)
    for fd in fds:
        os.close(fd)
    return Exited.model_validate_json(msg)
