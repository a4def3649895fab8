"""A real sandbox server on loopback for tests (ours and other components'):

    with local_server(workers=2) as server:
        run_code(server.url, "print(1)")

Runs `python -m sandbox.server` in a subprocess on a free port, configured through
`RETOOL_SANDBOX_*` variables, waits for /v1/ping, and stops it (and with it the zygote and
every execution) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
            wait_ready(url, timeout=ready_timeout)
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
