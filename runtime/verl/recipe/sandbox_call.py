"""One code execution for the tool, through the sandbox's own client (`sandbox.client`,
which speaks the SandboxFusion `/run_code` contract verl uses: JSON request, HTTP timeout =
queue bound + run timeout + 10 s, 503 retried after Retry-After within the queue bound).

Waiting for a sandbox worker never changes a call's result: the run timeout counts from the
program's start, and a call whose program cannot start within `queue_timeout_s` is a sandbox
failure (the recipe's `no stdout here`), logged as such, never a program timeout."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.client import QUEUE_TIMEOUT_S, run_code_async
from sandbox.errors import SandboxError, SandboxNotStartedError

logger = logging.getLogger(__name__)


class SandboxCallSettings(BaseModel):
    """Where the code runs and with which limits (tool_config.yaml, from the environment)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    sandbox_url: str = Field(description="Sandbox base URL or its /run_code endpoint.")
    timeout_s: float = Field(30.0, gt=0, description="Per-call run timeout.")
    queue_timeout_s: float = Field(
        QUEUE_TIMEOUT_S, gt=0, description="Longest a call waits for a sandbox worker before it counts as a sandbox failure."
    )
    memory_limit_mb: int = Field(1024, ge=16, description="Per-call memory limit.")
    rate_limit: int = Field(128, ge=1, description="Concurrent calls from one worker process (a cap).")
    num_workers: int = Field(128, ge=1, description="HTTP connections kept per worker process.")

    @field_validator("sandbox_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"sandbox_url must be an http(s) URL, got {v!r} (is RETOOL_SANDBOX_URL set?)")
        return v


async def execute(client: httpx.AsyncClient, code: str, settings: SandboxCallSettings) -> dict[str, Any] | None:
    """The sandbox's response as a dict, or None when the sandbox could not answer
    (unreachable, refused, server fault, no worker within the queue bound): the recipe treats
    that like any unfinished run."""
    try:
        response = await run_code_async(
            settings.sandbox_url, code, timeout=settings.timeout_s, memory_limit_mb=settings.memory_limit_mb,
            client=client, queue_timeout=settings.queue_timeout_s,
        )
    except SandboxNotStartedError as exc:
        logger.warning("code_interpreter: the program did not start (sandbox busy): %s", exc)
        return None
    except SandboxError as exc:
        logger.warning("code_interpreter: %s", exc)
        return None
    return response.model_dump(mode="json")
