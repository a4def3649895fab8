"""The HTTP face: SandboxFusion's `POST /run_code` and `GET /v1/ping`, plus /health and /metrics.

`create_app(settings)` builds an app whose executor starts with the app (lifespan) and stops
with it. The module attribute `app` is built lazily from `RETOOL_SANDBOX_*` variables, so
`uvicorn sandbox.app:app` and Modal's `@modal.asgi_app()` can serve it as it is. With
`owner_dir` or `idle_timeout_s` set, the server ends by itself (`sandbox.lifetime`).

Bad input is always a clear 4xx: 400 unsupported language, 401 missing token, 413 code or body
too large, 422 malformed fields (non-finite or non-positive timeouts, unsafe paths - `..`,
absolute ones without a private view, /proc /sys /dev - bad base64);
503 + Retry-After when the queue is full. Timeouts above the server maximum are clamped.
A request that waits longer than its queue bound (`queue_timeout`, default the server's
`queue_timeout_s`) for a worker gets HTTP 200, SandboxError, no run_result and a message
starting "queue timeout:" - distinct from a program's time limit (Failed/TimeLimitExceeded).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from sandbox.executor import ExecutionRequest, Executor
from sandbox.lifetime import Lifetime, watch
from sandbox.models import (
    SUPPORTED_LANGUAGES,
    QUEUE_TIMEOUT_PREFIX,
    CommandRunStatus,
    RunCodeRequest,
    RunCodeResponse,
    RunResult,
    RunCodeStatus,
)
from sandbox.paths import UnsafePathError, check_file_layout, check_path
from sandbox.pool import QueueFullError, QueueTimeoutError
from sandbox.protocol import ExecutionOutcome
from sandbox.settings import SandboxSettings
from sandbox.shared_stats import SharedStats
from sandbox.view import in_kernel_tree

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/v1/ping"})
PUBLISH_INTERVAL_S = 0.5
logger = logging.getLogger(__name__)


def create_app(settings: SandboxSettings | None = None, shared: SharedStats | None = None) -> FastAPI:
    """The app; `shared`: this process is one of a multi-process server (`sandbox.supervisor`),
    which watches the lifetime rules itself and whose processes' stats /health sums."""
    settings = settings or SandboxSettings.from_env()
    executor = Executor(settings)
    lifetime = Lifetime(settings.owner_dir, settings.idle_timeout_s, settings.lease_dir)
    if shared is not None:
        executor.activity.on_change = lambda: shared.write(stats_row(executor))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await executor.start()
        watcher = asyncio.create_task(watch(lifetime, executor.activity)) if lifetime.active else None
        publisher = asyncio.create_task(_publish(shared, executor)) if shared is not None else None
        try:
            yield
        finally:
            for task in (watcher, publisher):
                if task is not None:
                    task.cancel()
            await executor.stop()

    app = FastAPI(title="retool sandbox", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.executor = executor
    app.state.settings = settings
    app.state.shared = shared

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the input, which cannot be rendered when it is NaN or Infinity.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/v1/ping")
    async def ping() -> str:
        return "pong"

    @app.post("/run_code", response_model=RunCodeResponse)
    async def run_code(body: RunCodeRequest) -> Any:
        request = _validate(body, settings, executor.isolation.private_root)
        try:
            outcome = await executor.run(request)
        except QueueFullError as exc:
            executor.counters.rejected += 1
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        except QueueTimeoutError as exc:
            executor.counters.queue_timeouts += 1
            return not_started(exc)
        except Exception as exc:  # a bug of ours: still SandboxFusion's answer for "the sandbox failed"
            logger.exception("sandbox execution failed")
            executor.counters.errors += 1
            outcome = ExecutionOutcome(kind="error", message=f"sandbox failure: {type(exc).__name__}: {exc}")
        return to_response(outcome)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return health_report(executor, shared)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(executor, shared))

    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(_Auth, token=settings.token)  # added last = runs first
    return app


def _validate(body: RunCodeRequest, settings: SandboxSettings, private_root: bool) -> ExecutionRequest:
    """The request checked and clamped; absolute paths only where programs have a private view."""
    if body.language not in SUPPORTED_LANGUAGES:
        raise HTTPException(400, f"language {body.language!r} is not supported; this sandbox runs {list(SUPPORTED_LANGUAGES)}")
    try:
        code_bytes = len(body.code.encode("utf-8"))
        (body.stdin or "").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPException(422, f"code and stdin must be valid Unicode text: {exc}") from exc
    if code_bytes > settings.max_code_bytes:
        raise HTTPException(413, f"code is {code_bytes} bytes; the limit is {settings.max_code_bytes}")
    files = {path: content for path, content in body.files.items() if content is not None}
    try:
        check_file_layout(files, allow_absolute=private_root)
        for path in [*files, *body.fetch_files]:
            absolute, parts = check_path(path, allow_absolute=private_root)
            if absolute and in_kernel_tree(parts):
                raise UnsafePathError(f"invalid path {path!r}: /proc, /sys and /dev are not part of the program's files")
    except UnsafePathError as exc:
        raise HTTPException(422, str(exc)) from exc
    for path, content in files.items():
        try:
            base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(422, f"files[{path!r}] is not valid base64: {exc}") from exc
    memory = body.memory_limit_MB if body.memory_limit_MB > 0 else settings.memory_limit_mb
    return ExecutionRequest(
        code=body.code,
        stdin=body.stdin,
        files=files,
        fetch_files=list(dict.fromkeys(body.fetch_files)),
        run_timeout=min(body.run_timeout, settings.max_run_timeout_s),
        memory_limit_mb=min(memory, settings.max_memory_limit_mb),
        queue_timeout=settings.queue_timeout_s if body.queue_timeout is None else body.queue_timeout,
    )


def not_started(exc: QueueTimeoutError) -> RunCodeResponse:
    """The answer for a request that never got a worker: a sandbox failure, not a program outcome."""
    return RunCodeResponse(status=RunCodeStatus.SandboxError, message=f"{QUEUE_TIMEOUT_PREFIX} {exc}", run_result=None)


def to_response(outcome: ExecutionOutcome) -> RunCodeResponse:
    """Map an execution outcome onto SandboxFusion's statuses."""
    if outcome.kind == "error":
        result = RunResult(
            status=CommandRunStatus.Error, execution_time=outcome.execution_time, stdout="", stderr=outcome.message
        )
        return RunCodeResponse(status=RunCodeStatus.SandboxError, message=outcome.message, run_result=result)
    if outcome.kind == "timeout":
        result = RunResult(
            status=CommandRunStatus.TimeLimitExceeded, execution_time=outcome.execution_time, return_code=None,
            stdout=outcome.stdout, stderr=outcome.stderr,
        )
        return RunCodeResponse(status=RunCodeStatus.Failed, run_result=result, files=outcome.files)
    result = RunResult(
        status=CommandRunStatus.Finished, execution_time=outcome.execution_time, return_code=outcome.return_code,
        stdout=outcome.stdout, stderr=outcome.stderr,
    )
    status = RunCodeStatus.Success if outcome.return_code == 0 else RunCodeStatus.Failed
    return RunCodeResponse(status=status, run_result=result, files=outcome.files)


def stats_row(executor: Executor) -> dict[str, float]:
    """This process's counters and gauges, as a row of the shared stats."""
    pool = executor.pool
    return {
        **executor.counters.model_dump(),
        "in_flight": executor.activity.in_flight, "last_change": executor.activity.last_change,
        "pool_size": pool.size if pool else executor.settings.pool_size(), "busy": pool.busy if pool else 0,
        "prepared": executor.prepared, "queue_depth": pool.waiting if pool else 0,
        "ready": 1.0 if executor.zygote is not None and executor.zygote.alive else 0.0,
    }


async def _publish(shared: SharedStats, executor: Executor) -> None:
    while True:  # gauges (busy, prepared) also change between requests
        shared.write(stats_row(executor))
        await asyncio.sleep(PUBLISH_INTERVAL_S)


def health_report(executor: Executor, shared: SharedStats | None = None) -> dict[str, Any]:
    zygote = executor.zygote
    ready = zygote.ready if zygote is not None else None
    row = stats_row(executor)
    if shared is not None:
        shared.write(row)
        row = shared.total()
    counts = {name: int(row[name]) for name in (*executor.counters.model_dump(), "pool_size", "busy", "prepared", "queue_depth")}
    processes = shared.count if shared is not None else 1
    # Whichever process answers, "ok" means every process of the server has its zygote up.
    processes_ready = int(row["ready"])
    return {
        "status": "ok" if processes_ready == processes else "starting",
        **counts,
        "max_queue": executor.settings.max_queue,
        "queue_timeout_s": executor.settings.queue_timeout_s,
        "processes": processes,
        "processes_ready": processes_ready,
        "network_isolated": executor.isolation.network,
        "isolation": executor.isolation.model_dump(),
        "preloaded": ready.preloaded if ready else [],
        "preload_failures": ready.preload_failures if ready else {},
        "zygote_pid": ready.pid if ready else None,
        "lifetime": {
            "owner_dir": executor.settings.owner_dir, "idle_timeout_s": executor.settings.idle_timeout_s,
            "lease_dir": executor.settings.lease_dir, "in_flight": int(row["in_flight"]),
        },
    }


def prometheus_text(executor: Executor, shared: SharedStats | None = None) -> str:
    report = health_report(executor, shared)
    lines = []
    for name in ("executions", "timeouts", "errors", "rejected", "queue_timeouts", "zygote_restarts", "leftovers_killed"):
        lines += [f"# TYPE retool_sandbox_{name}_total counter", f"retool_sandbox_{name}_total {report[name]}"]
    for name in ("pool_size", "busy", "prepared", "queue_depth", "processes"):
        lines += [f"# TYPE retool_sandbox_{name} gauge", f"retool_sandbox_{name} {report[name]}"]
    lines += ["# TYPE retool_sandbox_network_isolated gauge", f"retool_sandbox_network_isolated {int(report['network_isolated'])}"]
    return "\n".join(lines) + "\n"


class _Auth:
    """Bearer-token check on every route but /v1/ping (a no-op without a token)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"detail": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


class _BodyLimit:
    """Refuse bodies over the limit with 413 before they are parsed (declared or streamed size)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": f"request body is larger than {self.limit} bytes"}, status_code=413)
        await response(scope, receive, send)


def __getattr__(name: str) -> Any:
    """`sandbox.app.app`: built on first access from the environment (PEP 562)."""
    if name == "app":
        global _env_app
        if _env_app is None:
            _env_app = create_app(SandboxSettings.from_env(os.environ))
        return _env_app
    raise AttributeError(name)


_env_app: FastAPI | None = None
