"""One SandboxFusion `/run_code` call, as verl's own client makes it (RECIPE.md, "The
SandboxFusion HTTP contract"): JSON request, HTTP read timeout = run timeout + 10 s, retried
on 503/504 and on connection errors."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({503, 504})


class SandboxSettings(BaseModel):
    """Where the code runs and with which limits (from tool_config.yaml / the environment)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    sandbox_url: str = Field(description="Sandbox base URL or its /run_code endpoint.")
    timeout_s: float = Field(30.0, gt=0, description="Per-call run timeout.")
    memory_limit_mb: int = Field(1024, ge=16, description="Per-call memory limit.")
    rate_limit: int = Field(128, ge=1, description="Concurrent calls from one worker process (a cap).")
    num_workers: int = Field(128, ge=1, description="HTTP connections kept per worker process.")
    retries: int = Field(3, ge=1, description="Attempts on 503/504 or connection errors.")

    @field_validator("sandbox_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"sandbox_url must be an http(s) URL, got {v!r} (is RETOOL_SANDBOX_URL set?)")
        return v

    @property
    def run_code_url(self) -> str:
        base = self.sandbox_url.rstrip("/")
        return base if base.endswith("/run_code") else f"{base}/run_code"


def run_code_request(code: str, settings: SandboxSettings) -> dict[str, Any]:
    """The SandboxFusion request body for one Python execution."""
    return {
        "code": code,
        "language": "python",
        "compile_timeout": settings.timeout_s,
        "run_timeout": settings.timeout_s,
        "memory_limit_MB": settings.memory_limit_mb,
        "stdin": None,
        "files": {},
        "fetch_files": [],
    }


async def run_code(client: httpx.AsyncClient, code: str, settings: SandboxSettings) -> dict[str, Any] | None:
    """POST one execution; the parsed response, or None when the sandbox could not answer."""
    body = run_code_request(code, settings)
    timeout = httpx.Timeout(settings.timeout_s + 10.0, connect=10.0)
    for attempt in range(1, settings.retries + 1):
        try:
            resp = await client.post(settings.run_code_url, json=body, timeout=timeout)
        except httpx.TransportError as exc:
            logger.warning("sandbox %s unreachable (attempt %d): %s", settings.run_code_url, attempt, exc)
        else:
            if resp.status_code == 200:
                return resp.json()
            logger.warning("sandbox answered HTTP %d (attempt %d): %s", resp.status_code, attempt, resp.text[:200])
            if resp.status_code not in RETRY_STATUS:
                return None
        if attempt < settings.retries:
            await asyncio.sleep(0.5 * 2 ** (attempt - 1))
    return None
