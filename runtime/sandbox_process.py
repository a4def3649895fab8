"""The sandbox server as a local process: detached (for a pipeline's sidecar) or ephemeral
(for data generation and tests).

`start_detached` runs `python -m sandbox.server` in its own session (so it leads a process
group that outlives the caller and can be stopped as a whole), logs to a file, and by
default waits until `GET /v1/ping` answers. `ephemeral_sandbox()` does the same for the
duration of a `with` block and stops the group on exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from reconciler.errors import RetoolError, TerminalError, TransientError
from runtime.processes import terminate_run
from sandbox.errors import SandboxError, SandboxUnavailableError

READY_TIMEOUT_S = 180.0  # a cold machine imports numpy and sympy before the server answers
TOKEN_ENV = "RETOOL_SANDBOX_TOKEN"  # the token travels by environment, never on the command line


class SandboxProcess(BaseModel):
    """A started sandbox server: the leader of its own process group."""

    model_config = ConfigDict(frozen=True)

    pid: int
    url: str
    port: int
    log_path: str

    def alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace_s`; reap our child."""
        terminate_run(self.pid, grace_s=grace_s, poll_s=0.05)


def as_retool_error(exc: SandboxError) -> RetoolError:
    """The sandbox package's error as retool's: unavailable is transient, the rest terminal."""
    kind = TransientError if isinstance(exc, SandboxUnavailableError) else TerminalError
    return kind(exc.summary, exc.detail, exc.hint)


@contextmanager
def retool_errors() -> Iterator[None]:
    """Raise sandbox errors from the block as retool errors (the runtime boundary)."""
    try:
        yield
    except SandboxError as exc:
        raise as_retool_error(exc) from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_argv(
    host: str, port: int, *, workers: int | None = None, memory_limit_mb: int | None = None,
    max_output_bytes: int | None = None, max_queue: int | None = None, preload: list[str] | None = None,
    python: str | None = None,
) -> list[str]:
    """The command that serves the sandbox (`python -m sandbox.server ...`)."""
    argv = [python or sys.executable, "-m", "sandbox.server", "--host", host, "--port", str(port)]
    for flag, value in (
        ("--workers", workers), ("--memory-limit-mb", memory_limit_mb),
        ("--max-output-bytes", max_output_bytes), ("--max-queue", max_queue),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if preload is not None:
        argv += ["--preload", ",".join(preload)]
    return argv


def start_detached(
    host: str, port: int | None, log_path: Path, *, workers: int | None = None,
    memory_limit_mb: int | None = None, max_output_bytes: int | None = None, max_queue: int | None = None,
    preload: list[str] | None = None, token: str | None = None, python: str | None = None,
    ready_timeout_s: float | None = READY_TIMEOUT_S, settings_env: dict[str, str] | None = None,
) -> SandboxProcess:
    """Start the server in a new session writing to `log_path`; `port=None` picks a free one.

    Waits for `/v1/ping` unless `ready_timeout_s` is None; if the server exits or does not
    answer in time, it is stopped and a TerminalError carries the log's tail.
    """
    port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(settings_env or {})}  # settings_env: RETOOL_SANDBOX_* for the server
    if token:
        env[TOKEN_ENV] = token
    argv = server_argv(
        host, port, workers=workers, memory_limit_mb=memory_limit_mb, max_output_bytes=max_output_bytes,
        max_queue=max_queue, preload=preload, python=python,
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent),
        )
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    started = SandboxProcess(pid=proc.pid, url=f"http://{connect_host}:{port}", port=port, log_path=str(log_path))
    if ready_timeout_s is not None:
        try:
            wait_until_serving(started, ready_timeout_s)
        except BaseException:
            started.stop(grace_s=2.0)
            raise
    return started


def wait_until_serving(proc: SandboxProcess, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Block until the server answers `/v1/ping`; TerminalError (with the log tail) if it
    exits first or stays silent for `timeout_s`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        try:
            response = httpx.get(proc.url + "/v1/ping", timeout=2.0)
            if response.status_code == 200 and response.json() == "pong":
                return
            last = f"HTTP {response.status_code}"
        except (httpx.HTTPError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        exited = _exit_status(proc.pid)
        if exited is not None or time.monotonic() > deadline:
            what = f"exited with status {exited}" if exited is not None else f"did not answer within {timeout_s:g} s"
            raise TerminalError(
                f"the sandbox server {what}", f"last ping: {last}\n{log_tail(Path(proc.log_path))}",
                f"full log: {proc.log_path}",
            )
        time.sleep(0.1)


def _exit_status(pid: int) -> int | None:
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: only liveness is knowable
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return -1
        return None
    return os.waitstatus_to_exitcode(status) if done else None


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def ephemeral_sandbox(
    *, workers: int | None = None, memory_limit_mb: int | None = None, preload: list[str] | None = None,
    max_queue: int | None = None, log_path: Path | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[str]:
    """A sandbox on a free loopback port for the `with` block; yields its base URL."""
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if log_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="retool-sandbox-")
        log_path = Path(tmp.name) / "sandbox.log"
    try:
        proc = start_detached(
            "127.0.0.1", None, log_path, workers=workers, memory_limit_mb=memory_limit_mb, preload=preload,
            max_queue=max_queue, ready_timeout_s=ready_timeout_s,
        )
        try:
            yield proc.url
        finally:
            proc.stop()
    finally:
        if tmp is not None:
            tmp.cleanup()
