"""Server settings: one pydantic model, filled from arguments or `RETOOL_SANDBOX_*` variables.

Every field can be set from the environment as `RETOOL_SANDBOX_<FIELD NAME IN CAPITALS>`
(lists are comma-separated), so the ASGI app can be configured where only the environment
reaches it (Modal's `@modal.asgi_app`, `uvicorn sandbox.app:app`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox.errors import SandboxSettingsError

ENV_PREFIX = "RETOOL_SANDBOX_"
MIB = 1024 * 1024


SHM_MIN_FREE = 1024 * MIB
WORKERS_PER_PROCESS = 8  # one event loop drives this many workers by default (docs/sandbox-load.md)


def default_work_root() -> str:
    """/dev/shm/retool-sandbox where /dev/shm is a tmpfs with at least 1 GiB free, else under the
    temporary directory. On a tmpfs, mounting each program's overlay takes ~0.1 ms instead of
    ~4 ms on ext4 (overlayfs tests its work directory on every mount)."""
    try:
        stats = os.statvfs("/dev/shm")
        with open("/proc/self/mounts") as f:
            on_tmpfs = any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in f)
        if on_tmpfs and stats.f_bavail * stats.f_frsize >= SHM_MIN_FREE and os.access("/dev/shm", os.W_OK):
            return "/dev/shm/retool-sandbox"
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), "retool-sandbox")


class SandboxSettings(BaseModel):
    """How the sandbox server runs and the limits it puts on each execution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int | None = Field(None, ge=1, le=256, description="Executions at once; default the CPU count.")
    max_queue: int = Field(256, ge=0, description="Requests allowed to wait for a worker; beyond it HTTP 503.")
    queue_timeout_s: float = Field(
        300.0, gt=0, allow_inf_nan=False,
        description="Longest a request waits for a worker unless it names its own `queue_timeout`; then SandboxError "
        "'queue timeout: ...' (the program did not run). Waiting never counts against the run timeout.",
    )
    hash_seed: int | None = Field(
        None, ge=0, le=4294967295,
        description="PYTHONHASHSEED of the pre-warmed interpreter (so of every program); default random per server, "
        "shared by all processes of a multi-process server so set order never depends on which one ran it.",
    )
    processes: int | None = Field(
        None, ge=1, le=64,
        description="Server processes sharing the port, each with its share of the workers; default one per "
        f"{WORKERS_PER_PROCESS} workers.",
    )
    preload: list[str] = Field(
        default_factory=lambda: ["numpy", "sympy"],
        description="Modules the pre-warmed interpreter imports once; every execution starts with them loaded.",
    )
    warmup: bool = Field(
        True, description="Exercise preloaded modules once (lazy imports) and then clear their result caches."
    )
    memory_limit_mb: int = Field(1024, ge=16, description="Address-space limit when a request sends none (<= 0).")
    max_memory_limit_mb: int = Field(8192, ge=16, description="Requests asking for more are clamped to this.")
    max_output_bytes: int = Field(65536, ge=1024, description="Per-stream output cap; the rest is cut with a marker.")
    token: str | None = Field(None, description="Bearer token required on every route except /v1/ping.")
    max_code_bytes: int = Field(1 * MIB, ge=1, description="Longer code is refused with HTTP 413.")
    max_request_bytes: int = Field(32 * MIB, ge=1024, description="Larger request bodies are refused with 413.")
    max_run_timeout_s: float = Field(300.0, gt=0, description="Longer run timeouts are clamped to this.")
    max_processes: int = Field(256, ge=8, description="Processes + threads per execution (needs a separate uid).")
    max_file_bytes: int = Field(64 * MIB, ge=4096, description="Largest file an execution may write.")
    max_open_files: int = Field(1024, ge=32, description="Open file descriptors per execution process.")
    max_fetch_bytes: int = Field(16 * MIB, ge=0, description="Total bytes returned through fetch_files.")
    stack_mb: int = Field(8, ge=1, le=1024, description="Stack limit; small so threads start under the memory cap.")
    work_root: str = Field(
        default_factory=lambda: default_work_root(),
        description="Directory that holds the per-worker directories (default: on /dev/shm when it is a large tmpfs).",
    )
    uid_base: int = Field(
        1_500_000, ge=1000, description="First uid of the range executions run as when the server is root."
    )
    isolate_users: bool = Field(True, description="When root, run each worker slot as its own unprivileged uid.")
    idle_timeout_s: float | None = Field(
        None, gt=0, description="Exit after this long with no request (unless a lease in lease_dir is alive)."
    )
    owner_dir: str | None = Field(None, description="Exit as soon as this directory is gone (a project's state dir).")
    lease_dir: str | None = Field(
        None, description="Files '<pid> <start ticks>' of processes that hold the server up against idle_timeout_s."
    )
    filesystem_view: bool = Field(
        True, description="Give each execution a private copy-on-write view of the whole filesystem (overlayfs, root)."
    )

    def pool_size(self) -> int:
        return self.workers or os.cpu_count() or 1

    def process_count(self) -> int:
        """Server processes: as asked (never more than workers), else one per WORKERS_PER_PROCESS."""
        size = self.pool_size()
        if self.processes is not None:
            return min(self.processes, size)
        return max(1, -(-size // WORKERS_PER_PROCESS))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SandboxSettings:
        """Settings from `RETOOL_SANDBOX_*` variables; explicit `overrides` win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if field.annotation == list[str]:
                values[name] = [item.strip() for item in raw.split(",") if item.strip()]
            elif name in ("token", "workers", "processes", "hash_seed", "idle_timeout_s", "owner_dir", "lease_dir"):
                values[name] = raw or None
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SandboxSettingsError(
                "invalid sandbox settings",
                str(exc),
                f"check the {ENV_PREFIX}* environment variables and the serve options",
            ) from exc
