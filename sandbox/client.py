"""A small client for any SandboxFusion-compatible server (ours or SandboxFusion itself).

    resp = run_code("http://127.0.0.1:8080", "print(1)", timeout=30)
    resp.run_result.stdout  # "1\\n"

`url` may be the server's base URL or end in `/run_code`. Waiting for a worker is not run
time: a call may wait up to `queue_timeout` seconds for its program to start (sent to the
server as the `queue_timeout` extension; a 503 "queue full" is retried after its Retry-After
within the same bound), and the HTTP timeout is that bound + the run timeout + a margin. A
call that cannot start within its bound raises SandboxNotStartedError; connection failures
and 5xx raise SandboxUnavailableError, refused requests (4xx) SandboxRefusedError
(`sandbox.errors`). A program that fails is not an error here: it comes back as a response
with status Failed (or SandboxError when the sandbox itself broke).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from sandbox.errors import SandboxNotStartedError, SandboxRefusedError, SandboxUnavailableError
from sandbox.models import QUEUE_TIMEOUT_PREFIX, RunCodeResponse, RunCodeStatus

HTTP_MARGIN_S = 10.0  # like verl: the HTTP timeout is the run timeout plus a margin (plus the queue bound)
QUEUE_TIMEOUT_S = 300.0  # default bound on the wait for a worker (generous: RL bursts queue deeply)
MAX_RETRY_AFTER_S = 10.0

_local = threading.local()


def run_code(
    url: str,
    code: str,
    *,
    timeout: float = 30.0,
    memory_limit_mb: int = 1024,
    stdin: str | None = None,
    token: str | None = None,
    files: dict[str, str] | None = None,
    fetch_files: list[str] | None = None,
    queue_timeout: float = QUEUE_TIMEOUT_S,
) -> RunCodeResponse:
    """Run Python `code` in the sandbox at `url` (blocking)."""
    body = _body(code, timeout, memory_limit_mb, stdin, files, fetch_files)
    client = _sync_client()
    deadline = time.monotonic() + queue_timeout
    while True:
        wait = _remaining(deadline)
        try:
            response = client.post(
                run_code_url(url), json={**body, "queue_timeout": wait}, headers=_headers(token),
                timeout=timeout + wait + HTTP_MARGIN_S,
            )
        except httpx.HTTPError as exc:
            raise SandboxUnavailableError(f"sandbox at {url} is unreachable", str(exc), "is the sandbox server running?") from exc
        delay = _busy_delay(response, deadline, url, queue_timeout)
        if delay is None:
            return _parse(response, url)
        time.sleep(delay)


async def run_code_async(
    url: str,
    code: str,
    *,
    timeout: float = 30.0,
    memory_limit_mb: int = 1024,
    stdin: str | None = None,
    token: str | None = None,
    files: dict[str, str] | None = None,
    fetch_files: list[str] | None = None,
    client: httpx.AsyncClient | None = None,
    queue_timeout: float = QUEUE_TIMEOUT_S,
) -> RunCodeResponse:
    """`run_code` for asyncio callers; pass a long-lived `client` to reuse connections."""
    body = _body(code, timeout, memory_limit_mb, stdin, files, fetch_files)
    own = client is None
    client = client or httpx.AsyncClient()
    deadline = time.monotonic() + queue_timeout
    try:
        while True:
            wait = _remaining(deadline)
            try:
                response = await client.post(
                    run_code_url(url), json={**body, "queue_timeout": wait}, headers=_headers(token),
                    timeout=timeout + wait + HTTP_MARGIN_S,
                )
            except httpx.HTTPError as exc:
                raise SandboxUnavailableError(f"sandbox at {url} is unreachable", str(exc), "is the sandbox server running?") from exc
            delay = _busy_delay(response, deadline, url, queue_timeout)
            if delay is None:
                return _parse(response, url)
            await asyncio.sleep(delay)
    finally:
        if own:
            await client.aclose()


def wait_ready(url: str, timeout: float = 60.0) -> None:
    """Block until `GET /v1/ping` answers "pong"; SandboxUnavailableError after `timeout` seconds."""
    ping = base_url(url) + "/v1/ping"
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            response = httpx.get(ping, timeout=5.0)
            if response.status_code == 200 and response.json() == "pong":
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except (httpx.HTTPError, ValueError) as exc:
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise SandboxUnavailableError(f"sandbox at {url} not ready after {timeout:.0f} s", last, "check the server's log")
        time.sleep(0.1)


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url.removesuffix("/run_code")


def run_code_url(url: str) -> str:
    return base_url(url) + "/run_code"


def _body(
    code: str, timeout: float, memory_limit_mb: int, stdin: str | None, files: dict[str, str] | None,
    fetch_files: list[str] | None,
) -> dict[str, object]:
    return {
        "code": code, "language": "python", "compile_timeout": timeout, "run_timeout": timeout,
        "memory_limit_MB": memory_limit_mb, "stdin": stdin, "files": files or {}, "fetch_files": fetch_files or [],
    }


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _remaining(deadline: float) -> float:
    return round(max(0.0, deadline - time.monotonic()), 3)


def _busy_delay(response: httpx.Response, deadline: float, url: str, bound: float) -> float | None:
    """Seconds to wait before retrying a 503 (queue full), or None to take the response as it
    is; SandboxNotStartedError once the queue bound leaves no time for another try."""
    if response.status_code != 503:
        return None
    try:
        delay = min(float(response.headers.get("Retry-After", "1")), MAX_RETRY_AFTER_S)
    except ValueError:
        delay = 1.0
    if time.monotonic() + delay > deadline:
        raise SandboxNotStartedError(
            f"sandbox at {url} had no free worker within the queue bound of {bound:g} s (queue full)",
            response.text[:2000], "raise the queue bound, add workers, or lower the calls' concurrency",
        )
    return delay


def _parse(response: httpx.Response, url: str) -> RunCodeResponse:
    if response.status_code == 200:
        parsed = RunCodeResponse.model_validate_json(response.content)
        if parsed.status == RunCodeStatus.SandboxError and parsed.message.startswith(QUEUE_TIMEOUT_PREFIX):
            raise SandboxNotStartedError(
                f"sandbox at {url} did not start the program", parsed.message,
                "raise the queue bound, add workers, or lower the calls' concurrency",
            )
        return parsed
    detail = response.text[:2000]
    if 400 <= response.status_code < 500:
        raise SandboxRefusedError(f"sandbox refused the request (HTTP {response.status_code})", detail)
    raise SandboxUnavailableError(f"sandbox at {url} failed (HTTP {response.status_code})", detail)


def _sync_client() -> httpx.Client:
    """One keep-alive client per thread (httpx clients are cheap to share within a thread)."""
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = httpx.Client()
    return client
