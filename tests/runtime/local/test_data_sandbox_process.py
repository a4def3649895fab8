"""The sandbox server as a local process (runtime.sandbox_process), against the real server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

from reconciler.errors import TerminalError
from runtime.sandbox_process import ephemeral_sandbox, start_detached


def test_start_detached_leads_its_own_session_logs_and_stops(tmp_path: Path) -> None:
    from sandbox.client import run_code

    log = tmp_path / "logs" / "sandbox.log"
    proc = start_detached("127.0.0.1", None, log, workers=1, memory_limit_mb=512, preload=[])
    try:
        assert os.getsid(proc.pid) == proc.pid  # its own session and process group
        assert httpx.get(proc.url + "/v1/ping", timeout=5).json() == "pong"
        assert run_code(proc.url, "print(6 * 7)").run_result.stdout == "42\n"
        assert log.is_file()
    finally:
        proc.stop()
    assert not proc.alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/v1/ping", timeout=5)


def test_ephemeral_sandbox_is_gone_after_the_block() -> None:
    with ephemeral_sandbox(workers=1, preload=[]) as url:
        assert httpx.get(url + "/v1/ping", timeout=5).json() == "pong"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/ping", timeout=5)


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TerminalError) as err:
            start_detached("127.0.0.1", port, tmp_path / "s.log", workers=1, preload=[], ready_timeout_s=60)
    assert "exited with status" in err.value.summary
    assert str(tmp_path / "s.log") in err.value.hint


def test_sandbox_errors_become_retool_errors_at_the_runtime_boundary() -> None:
    from reconciler.errors import TransientError
    from runtime.sandbox_process import retool_errors
    from sandbox.client import run_code
    from sandbox.errors import SandboxRefusedError, SandboxSettingsError
    from sandbox.settings import SandboxSettings

    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    with pytest.raises(TransientError, match="unreachable") as unreachable:
        with retool_errors():
            run_code(url, "print(1)")
    assert unreachable.value.hint == "is the sandbox server running?"
    with pytest.raises(TerminalError, match="invalid sandbox settings"):
        with retool_errors():
            SandboxSettings.from_env({"RETOOL_SANDBOX_WORKERS": "zero"})
    with pytest.raises(TerminalError, match="HTTP 401") as refused:
        with retool_errors():
            raise SandboxRefusedError("sandbox refused the request (HTTP 401)", "missing token")
    assert refused.value.detail == "missing token" and not isinstance(refused.value, TransientError)
    assert issubclass(SandboxSettingsError, Exception)
