"""What the Modal backend hands across: the app definition, payloads and results of spawned
calls, and launch keys -- plain pydantic data.

A leaf: it imports no other `runtime.modal` module (an import-linter contract keeps it so),
so the adapter, the app builder, the launch registry and the worker all build on it without
importing each other. Payloads are plain JSON-able data (Modal pickles them; only builtins
cross, so the CLI and the container need not run the same Python).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.records import Frozen

SIDECAR_PORT = 8765  # the RL container's sandbox sidecar listens on localhost here by default

# --------------------------------------------------------------------------- the app

ImageOp = Literal[
    "from_registry", "apt_install", "env", "pip_install", "uv_pip_install", "run_commands",
    "add_local_python_source",
]


class ImageStep(BaseModel):
    """One call on `modal.Image`: `op(*args, **options)`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: ImageOp
    args: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)  # only for op == "env"


Entry = Literal["run_stage", "prepare", "finalize", "sandbox_web"]


class FunctionSpec(Frozen):
    """One `app.function(...)` registration of an entry point in `runtime.modal.worker`."""

    name: str  # Modal function name within the app
    entry: Entry
    gpu: str | list[str] | None = None  # "H100:8", or a fallback list ["H100:8", "A100-80GB:8"]
    cpu: float | None = None
    memory_mb: int | None = None
    timeout_s: int = 3600
    retries: int = 0
    volumes: dict[str, str] = Field(default_factory=dict)  # mount path -> Modal volume name
    secrets: list[str] = Field(default_factory=list)  # Modal secret names
    env: dict[str, str] = Field(default_factory=dict)  # non-secret settings for the entry point
    cluster_size: int | None = None  # `@modal.clustered(size=N)` when nodes > 1
    efa: bool = False  # `experimental_options={"efa_enabled": True}` (clustered functions)
    web: bool = False  # `@modal.asgi_app()`
    concurrent_inputs: int | None = None  # `@modal.concurrent(max_inputs=N)`
    min_containers: int | None = None
    max_containers: int | None = None


class AppDefinition(Frozen):
    app_name: str
    environment: str | None = None
    image: list[ImageStep]
    functions: list[FunctionSpec]

    def function(self, name: str) -> FunctionSpec:
        for fn in self.functions:
            if fn.name == name:
                return fn
        raise KeyError(name)

    def digest(self) -> str:
        """Identity of what would be deployed (an unchanged digest needs no redeploy)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- launch keys


class LaunchKey(BaseModel):
    """What a stage call carries to register itself (payload field `launch`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry: str  # Modal Dict name
    key: str  # the stage identity
    launch_id: str


class Registration(BaseModel):
    """What the launch registry holds for a stage identity: the call running it now."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    launch_id: str
    call_id: str
    segment: int = 0
    at: float = 0.0


# --------------------------------------------------------------------------- payloads


class SidecarSettings(Frozen):
    """The sandbox the RL container starts on localhost before training."""

    port: int = SIDECAR_PORT
    workers: int | None = None
    max_queue: int = 256
    memory_limit_mb: int = 1024
    max_output_bytes: int = 65536
    preload: list[str] = Field(default_factory=list)


class StagePayload(Frozen):
    version: int = 1
    app_name: str
    function: str
    environment: str | None = None
    stage: str
    kind: Literal["sft", "rl", "eval"]
    restart_id: str
    segment: int = 0
    segments_planned: int = 1
    total_steps: int | None = None
    resume_from: int | None = None
    world_size: int = 1
    nodes: int = 1
    # multi-node: how long rank 0 waits for every rank to check in (and each rank for rank 0)
    join_timeout_s: float = 600.0
    commands: list[dict[str, Any]]  # reconciler.backend.RenderedCommand dumps, exactly `retool render`'s
    checkpoint_dir: str  # container path: <mount>/<stage>/<restart_id[:16]>
    checkpoint_volume: str  # Modal volume name holding it
    volumes: dict[str, str]  # Modal volume name -> mount path (reloaded at start, committed at the end)
    sidecar: SidecarSettings | None = None
    # service sandbox: the variable holding its token; the container puts the token into
    # RETOOL_SANDBOX_URL (`<url>/t/<token>`) so the token never enters payloads or state
    sandbox_token_var: str | None = None
    # a from-scratch launch over checkpoints of the same identity: the first attempt moves
    # them to <stage>/.replaced/ (never deletes them)
    replace_existing: bool = False
    train_seconds: float  # per attempt: stop, commit and hand over to the next segment after this
    commit_every_s: float = 600.0
    launch: LaunchKey | None = None  # how the call registers itself (runtime.modal.launches)


class PreparePayload(Frozen):
    kind: Literal["dataset", "model"]
    name: str
    config: dict[str, Any]  # the Dataset / Model spec section
    spec_dir: str  # container directory that `path:` sources resolve against (uploaded inputs)
    out_dir: str  # container path to materialise into
    volume: str  # Modal volume name to commit


class FinalizePayload(Frozen):
    stage: str
    checkpoint_path: str
    step: int
    merged_dir: str
    volume: str
    commands: list[dict[str, Any]]  # merge command(s), rendered like the stage's
    tool_call_check: dict[str, Any] | None = None  # ToolCallCheck dump for SFT stages with a check
