"""The SandboxFusion HTTP contract: request and response bodies of `POST /run_code`.

Field names, defaults and status values follow SandboxFusion's server so its clients (verl's
`call_sandbox_api`, the `sandbox-fusion` package) work unchanged. Unknown request fields are
ignored, as SandboxFusion does. Stricter than SandboxFusion on purpose: timeouts must be
finite numbers (run_timeout > 0), otherwise the request is refused with HTTP 422.

One extension, ignored by SandboxFusion's server: `queue_timeout`, the longest a request may
wait for a free worker before its program starts (default: the server's `queue_timeout_s`).
A request that waits longer gets `SandboxError` with a message starting `QUEUE_TIMEOUT_PREFIX`
and no run_result: its program did not run. Waiting never counts against `run_timeout`.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

SUPPORTED_LANGUAGES = ("python",)
QUEUE_TIMEOUT_PREFIX = "queue timeout:"  # the message of a request whose program never started


class RunCodeStatus(str, Enum):
    Success = "Success"  # the program ran and exited 0
    Failed = "Failed"  # non-zero exit, death by signal, or time limit
    SandboxError = "SandboxError"  # the sandbox itself failed; the program's fate is unknown


class CommandRunStatus(str, Enum):
    Finished = "Finished"
    Error = "Error"
    TimeLimitExceeded = "TimeLimitExceeded"


class RunResult(BaseModel):
    """One command's outcome (SandboxFusion's CommandRunResult)."""

    status: CommandRunStatus
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    compile_timeout: float = Field(10, ge=0, allow_inf_nan=False, description="Unused for Python; validated.")
    run_timeout: float = Field(
        10, gt=0, allow_inf_nan=False, description="Wall-clock seconds; clamped to the server's maximum."
    )
    queue_timeout: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="Longest wait for a free worker, seconds (retool extension); none: the server's default.",
    )
    memory_limit_MB: int = Field(-1, description="Address-space limit in MiB; <= 0 means the server default.")
    code: str = Field(..., description="The program.")
    stdin: str | None = Field(None, description="Standard input; none means an empty stdin.")
    language: str = Field(..., description="Only 'python' is supported.")
    files: dict[str, str | None] = Field(
        default_factory=dict, description="Relative path -> base64 content, written into the working directory."
    )
    fetch_files: list[str] = Field(
        default_factory=list, description="Relative paths returned (base64) after the run; missing ones are skipped."
    )


class RunCodeResponse(BaseModel):
    status: RunCodeStatus
    message: str = ""
    compile_result: RunResult | None = None
    run_result: RunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
