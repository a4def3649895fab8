"""A multi-process server: several server processes accept on one listening socket.

One event loop drives a limited number of workers before it becomes the bottleneck
(docs/sandbox-load.md), so a large pool is split into `processes` servers, each a complete
server (`sandbox.app`) with its own share of the workers, its own zygote and its own uid
block. The supervisor binds the port once and hands the socket to every process; an idle
process's event loop accepts the next connection first, so connections spread by load.

Nothing outlives the supervisor: each process has SIGTERM as its parent-death signal (and
its zygote, forkers and programs follow it, as in a single-process server). The supervisor
applies the lifetime rules (`sandbox.lifetime`) to the processes' summed activity, read
from their shared stats, and stops them all when one exits, when a rule says so, or on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from pydantic import BaseModel, ConfigDict

from sandbox.lifetime import Activity, Lifetime
from sandbox.settings import SandboxSettings
from sandbox.shared_stats import SharedStats

CHILD_ENV = "RETOOL_SANDBOX_SERVER_PROCESS"  # the JSON ServerProcess of a child (never on the command line: it holds the token)
CHECK_INTERVAL_S = 0.5
LIFETIME_INTERVAL_S = 2.0
STOP_GRACE_S = 15.0
BACKLOG = 2048
logger = logging.getLogger(__name__)


class ServerProcess(BaseModel):
    """What one process of a multi-process server is told (through CHILD_ENV)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: SandboxSettings  # its own share of the workers; no lifetime rules (the supervisor's)
    listen_fd: int
    stats_fd: int
    index: int
    count: int
    supervisor_pid: int


def shares(workers: int, processes: int) -> list[int]:
    """`workers` split as evenly as possible over `processes` (each at least one)."""
    base, extra = divmod(workers, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def supervise(settings: SandboxSettings, host: str, port: int) -> None:
    """Run `settings.process_count()` server processes on host:port until stopped (blocking)."""
    count = settings.process_count()
    lifetime = Lifetime(settings.owner_dir, settings.idle_timeout_s, settings.lease_dir)
    # One hash seed for all: a program's set order must not depend on which process ran it.
    seed = settings.hash_seed if settings.hash_seed is not None else random.SystemRandom().randint(1, 4294967295)
    child_settings = [
        settings.model_copy(update={
            "workers": n, "processes": 1, "hash_seed": seed, "owner_dir": None, "idle_timeout_s": None, "lease_dir": None,
        })
        for n in shares(settings.pool_size(), count)
    ]
    sock = listen(host, port)
    stats = SharedStats.create(count)
    stopping: list[str] = []  # why the server stops (the first entry counts)
    failed = False

    def on_signal(signum: int, _: FrameType | None) -> None:
        stopping.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: list[subprocess.Popen[bytes]] = []
    try:
        for index, child in enumerate(child_settings):
            spec = ServerProcess(
                settings=child, listen_fd=sock.fileno(), stats_fd=stats.fd, index=index, count=count,
                supervisor_pid=os.getpid(),
            )
            env = {**os.environ, CHILD_ENV: spec.model_dump_json()}
            children.append(subprocess.Popen(
                [sys.executable, "-m", "sandbox.server_process"], env=env, stdin=subprocess.DEVNULL,
                pass_fds=[sock.fileno(), stats.fd],
            ))
        sock.close()  # the children hold it
        last_lifetime_check = time.monotonic()
        while not stopping:
            time.sleep(CHECK_INTERVAL_S)
            exited = [child for child in children if child.poll() is not None]
            if exited and not stopping:
                failed = True
                stopping.append(f"server process {exited[0].pid} exited with status {exited[0].returncode}")
            if lifetime.active and not stopping and time.monotonic() - last_lifetime_check >= LIFETIME_INTERVAL_S:
                last_lifetime_check = time.monotonic()
                total = stats.total()
                activity = Activity(in_flight=int(total["in_flight"]), last_change=total["last_change"] or time.monotonic())
                reason = lifetime.reason_to_exit(activity)
                if reason is not None:
                    stopping.append(reason)
        if not stopping[0].startswith("SIG"):
            logger.warning("sandbox server stopping: %s", stopping[0])
    finally:
        sock.close()
        stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        sys.exit(1)


def stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process (each stops its executor), then SIGKILL what is left after the grace."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
