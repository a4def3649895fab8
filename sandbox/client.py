"""A small client for any SandboxFusion-compatible server (ours or SandboxFusion itself).

    resp = run_code("http://127.0.0.1:8080", "print(1)", timeout=30)
    resp.run_result.stdout  # "1\\n"

`url` may be the server's base URL or end in `/run_code`. A 503 (queue full) is retried after
its Retry-After, a few times; connection failures and 5xx raise SandboxUnavailableError,
refused requests (4xx) raise SandboxRefusedError (`sandbox.errors`). A program that fails is not an error here: it comes back
as a response with status Failed (or SandboxError when the sandbox itself broke).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from sandbox.errors import SandboxRefusedError, SandboxUnavailableError
from sandbox.models import RunCodeResponse

HTTP_MARGIN_S = 10.0  # like verl: the HTTP timeout is the run timeout plus a margin
BUSY_RETRIES = 5

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
) -> RunCodeResponse:
    """Run Python `code` in the sandbox at `url` (blocking)."""
    body = _body(code, timeout, memory_limit_mb, stdin, files, fetch_files)
    client = _sync_client()
    for attempt in range(BUSY_RETRIES + 1):
        try:
            response = client.post(
                run_code_url(url), json=body, headers=_headers(token), timeout=timeout + HTTP_MARGIN_S
            )
        except httpx.HTTPError as exc:
            raise SandboxUnavailableError(f"sandbox at {url} is unreachable", str(exc), "is the sandbox server running?") from exc
        delay = _busy_delay(response, attempt)
        if delay is None:
            return _parse(response, url)
        time.sleep(delay)
    raise AssertionError("unreachable")


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
) -> RunCodeResponse:
    """`run_code` for asyncio callers; pass a long-lived `client` to reuse connections."""
    body = _body(code, timeout, memory_limit_mb, stdin, files, fetch_files)
    own = client is None
    client = client or httpx.AsyncClient()
    try:
        for attempt in range(BUSY_RETRIES + 1):
            try:
                response = await client.post(
                    run_code_url(url), json=body, headers=_headers(token), timeout=timeout + HTTP_MARGIN_S
                )
            except httpx.HTTPError as exc:
                raise SandboxUnavailableError(f"sandbox at {url} is unreachable", str(exc), "is the sandbox server running?") from exc
            delay = _busy_delay(response, attempt)
            if delay is None:
                return _parse(response, url)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")
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


def _busy_delay(response: httpx.Response, attempt: int) -> float | None:
    """Seconds to wait before retrying a 503, or None to take the response as it is."""
    if response.status_code != 503 or attempt >= BUSY_RETRIES:
        return None
    try:
        return min(float(response.headers.get("Retry-After", "1")), 10.0)
    except ValueError:
        return 1.0


def _parse(response: httpx.Response, url: str) -> RunCodeResponse:
    if response.status_code == 200:
        return RunCodeResponse.model_validate_json(response.content)
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
