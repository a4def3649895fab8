"""A real sandbox server on loopback for tests (ours and other components'):

    with local_server(workers=2) as server:
        run_code(server.url, "print(1)")

Runs `python -m sandbox.server` in a subprocess on a free port, configured through
`RETOOL_SANDBOX_*` variables, waits until /health says "ok" (every server process of a
multi-process server up, not only the first to answer /v1/ping), and stops it (and with it the zygote and
every execution) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from sandbox.client import wait_ready
from sandbox.settings import ENV_PREFIX


@dataclass(frozen=True)
class LocalServer:
    url: str
    port: int
    pid: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_server(*, extra_env: dict[str, str] | None = None, ready_timeout: float = 120.0, **settings: Any) -> Iterator[LocalServer]:
    """Start a server; `settings` are SandboxSettings fields (lists as Python lists)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for name, value in settings.items():
        env[ENV_PREFIX + name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
    env.update(extra_env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.server", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            deadline = time.monotonic() + ready_timeout
            wait_ready(url, timeout=ready_timeout)
            _wait_all_processes(url, settings.get("token"), deadline)
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError(f"sandbox server exited with status {proc.returncode}") from None
            raise
        yield LocalServer(url=url, port=port, pid=proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_all_processes(url: str, token: str | None, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while True:
        health = httpx.get(url + "/health", headers=headers, timeout=10).json()
        if health.get("status") == "ok":
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"sandbox at {url}: {health.get('processes_ready')} of {health.get('processes')} processes ready")
        time.sleep(0.05)
