"""The runtime interface: what the reconciler asks of a backend.

The reconciler never imports torch, verl, ray or modal; backends do, lazily, inside
their methods. Every operation is idempotent and says `created | unchanged | updated`
(docs/architecture.md, "Reconcile from observed reality"). Implementations:
`runtime.local.backend.LocalRuntime`, `runtime.modal.backend.ModalRuntime`, and `tests`'
in-memory runtime with injectable failures. Beyond `Runtime`, a backend may declare
optional capabilities (the mixin ABCs at the end of this module); callers test for them with
`isinstance` and do without when absent.

Checkpoint layout (shared by every backend): a stage writes its verl checkpoints to
`<stage volume>/<stage name>/<restart_id[:16]>/global_step_N`, so checkpoints written under
another restart identity are never resumed from; they are reported as foreign and kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import Field

from reconciler.readiness import DoctorCheck
from reconciler.records import Frozen
from reconciler.spec import Dataset, Image, Model, Sandbox, Spec, Volume
from reconciler.state.base import RunHandle, StateStore, WandbRun

Change = Literal["created", "unchanged", "updated"]


class Outcome(Frozen):
    """Result of an idempotent ensure/prepare call."""

    change: Change
    outputs: dict[str, Any] = Field(default_factory=dict)
    message: str = ""


class RunStatus(Frozen):
    """What a backend observes about a detached run right now."""

    state: Literal["running", "succeeded", "failed", "lost"]
    step: int | None = None
    total: int | None = None
    message: str = ""
    log_tail: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)  # latest values, trainer's keys ("train/loss")
    elapsed_s: float | None = None
    sparklines: dict[str, str] = Field(default_factory=dict)  # {"loss": "▇▅▃▂▁"} (SFT) / {"reward": ...} (RL)
    wandb_url: str | None = None
    wandb: WandbRun | None = None  # the run's W&B run: URL online, folders and `wandb sync` offline


class Checkpoint(Frozen):
    step: int
    path: str
    valid: bool
    reason: str = ""  # why invalid: "missing shard rank 3 of 8", "written under another restart identity"
    world_size: int | None = None
    restart_id: str | None = None


def latest_resumable(checkpoints: list[Checkpoint], restart_id: str) -> Checkpoint | None:
    """The checkpoint a run of `restart_id` resumes from: the newest valid one written under
    that identity (a backend that cannot tell the identity reports None, and is trusted)."""
    valid = [c for c in checkpoints if c.valid and c.restart_id in (None, restart_id)]
    return max(valid, key=lambda c: c.step) if valid else None


class StageContext(Frozen):
    """Everything a backend needs to launch, render or finalize one stage."""

    spec: Spec
    spec_dir: str  # directory of the spec file (relative `path:` sources resolve against it)
    stage: str  # stage name (address `stage.<name>`)
    restart_id: str
    total_steps: int | None = None
    resume_from: int | None = None  # checkpoint step to resume from; None = from scratch
    inputs: dict[str, dict[str, Any]] = Field(default_factory=dict)  # upstream address -> its recorded outputs
    state_dir: str = ""  # the local state directory (logs, sidecar files)


class RenderedCommand(Frozen):
    """One process the stage runs: argv, environment (secret values never included:
    secrets appear as names in `secret_env`), and where it runs."""

    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: list[str] = Field(default_factory=list)
    cwd: str | None = None
    description: str = ""


class Runtime(Protocol):
    """A backend. Methods raise `reconciler.errors.TerminalError` or `TransientError`."""

    name: str

    def preflight(self, spec: Spec) -> list[str]:
        """Environment problems that stop `apply` before anything changes
        (credentials, missing tools). Empty when ready. Must return in seconds."""
        ...

    def blocked_reason(self, spec: Spec, address: str) -> str | None:
        """Why this node cannot run on this backend (plan shows `blocked`), or None."""
        ...

    def ensure_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome: ...

    def delete_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome: ...

    def build_image(self, image: Image, spec: Spec) -> Outcome: ...

    def prepare_dataset(self, name: str, dataset: Dataset, spec: Spec, spec_dir: str) -> Outcome:
        """Materialize a dataset as parquet. outputs: path, digest (of the files), rows."""
        ...

    def prepare_model(self, name: str, model: Model, spec: Spec, spec_dir: str) -> Outcome:
        """Materialize a Hugging Face model directory. outputs: path, digest."""
        ...

    def ensure_sandbox(self, sandbox: Sandbox, spec: Spec) -> Outcome:
        """Start (or find running) the sandbox. outputs: url, pid or app info."""
        ...

    def render_stage(self, ctx: StageContext) -> list[RenderedCommand]:
        """The exact commands `launch_stage` runs (`retool render`)."""
        ...

    def launch_stage(self, ctx: StageContext) -> RunHandle:
        """Start the stage detached; return at once with a handle recorded in state."""
        ...

    def poll_stage(self, handle: RunHandle) -> RunStatus: ...

    def cancel_stage(self, handle: RunHandle) -> None: ...

    def discover_checkpoints(self, spec: Spec, stage: str, restart_id: str) -> list[Checkpoint]:
        """Read checkpoints from the stage's volume (never from memory)."""
        ...

    def finalize_stage(self, ctx: StageContext, checkpoint: Checkpoint) -> Outcome:
        """After success: merge to a Hugging Face dir, run post-checks.
        outputs: model_path, final_step, plus checks (e.g. tool_call_rate)."""
        ...


# --------------------------------------------------------------------------- optional capabilities
# A backend MAY offer more than `Runtime`. Each extra is a mixin ABC the backend names among
# its bases (dstack's `ComputeWith...` classes are the model), so a caller asks
# `isinstance(runtime, ReadsMetrics)` and the type checker then knows the method is there;
# a backend that declares one and forgets its method cannot be instantiated. Who has what
# (tests/reconciler/test_capabilities.py keeps this table true):
#
#   capability         local  modal  ray  tests' MemoryRuntime
#   ChecksPresence       x            x
#   ChecksSpec                  x
#   ChecksReadiness             x     x
#   OpensSharedState            x
#   ReadsMetrics         x            x
#   PollsAtOwnPace                          x
#   ReportsCapacity                   x


DEFAULT_POLL_INTERVAL_S = 5.0  # how often apply polls a running stage, unless the backend says


class ChecksPresence(ABC):
    """The backend can tell that a recorded volume, dataset, model or sandbox is gone, or
    stopped on purpose until something needs it. Without it `refresh` trusts them as recorded."""

    @abstractmethod
    def missing_reason(self, spec: Spec, address: str) -> str | None:
        """Why a recorded node no longer exists (e.g. a dead sandbox sidecar), or None when it
        is there or cannot be told. Cheap and read-only: plan calls it (refresh)."""

    @abstractmethod
    def idle_reason(self, spec: Spec, address: str) -> str | None:
        """Why a recorded node is stopped on purpose and starts again on demand (e.g. a sandbox
        sidecar that ended after its idle timeout), or None. Not drift: plan keeps it a no-op
        and status shows it `idle`. Cheap and read-only: plan calls it (refresh)."""


class ChecksSpec(ABC):
    """The backend judges a spec offline (no credentials, no network): `retool validate`
    fails on its problems; validate and plan print its warnings."""

    @abstractmethod
    def spec_problems(self, spec: Spec) -> list[str]:
        """What the backend would refuse, each as `dotted.field: why` (located in the YAML)."""

    @abstractmethod
    def spec_warnings(self, spec: Spec) -> list[str]:
        """What may fail or drift later (nothing is blocked)."""


class ChecksReadiness(ABC):
    """The backend checks a real workspace for `retool doctor` (credentials, secrets, GPUs,
    the image, volumes, the state store). Without it doctor runs `preflight` and the
    state-store rows."""

    @abstractmethod
    def doctor_checks(
        self, spec: Spec, open_store: Callable[[], StateStore], *, build_image: bool = True
    ) -> list[DoctorCheck]:
        """One row per check; `open_store` opens the spec's state store (end with
        `reconciler.readiness.store_checks(open_store)`, the rows every backend shares)."""


class OpensSharedState(ABC):
    """The backend serves a shared state store (`state.store` other than local) through
    its own client, so doctor checks the store with the same credentials as the backend."""

    @abstractmethod
    def shared_store(self, spec: Spec) -> StateStore | None:
        """The spec's state store opened with this backend's client, or None when the spec's
        store is not one this backend serves (the caller opens it the ordinary way)."""


class ReadsMetrics(ABC):
    """The backend reads a run's per-step metrics from where it wrote them (`retool report`).
    Without it the report shows no curves and says why."""

    @abstractmethod
    def read_metrics(self, spec: Spec, stage: str, restart_id: str) -> list[tuple[int, dict[str, float]]]:
        """[(step, {trainer key: value})], in step order."""


class PollsAtOwnPace(ABC):
    """The backend sets how often apply polls a running stage (a test runtime whose runs
    advance per poll says 0). Without it apply polls every DEFAULT_POLL_INTERVAL_S."""

    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S


class ReportsCapacity(ABC):
    """The backend tells what its compute has free now next to what the spec's stages ask
    for (a cluster the user runs: the Ray backend); plan prints it as a note."""

    @abstractmethod
    def capacity_note(self, spec: Spec) -> str | None:
        """One line, e.g. `Ray cluster http://head:8265: 6 of 16 GPUs free; stage.rl needs 8`,
        or None. Cheap, read-only and free of heavy imports: plan calls it (refresh)."""


def poll_interval(runtime: Runtime) -> float:
    """How often apply polls this backend's running stages."""
    return runtime.poll_interval_s if isinstance(runtime, PollsAtOwnPace) else DEFAULT_POLL_INTERVAL_S
