"""What a stage kind must provide, whichever backend runs it (docs/stage-kinds.md).

A stage kind (`sft`, `rl`, `eval`) is one object that knows everything about its kind of
stage that does not depend on where it runs: the commands it renders, whether and from
where a model is merged after it, how its progress is discovered from the files it left,
and what its recorded outputs are. A backend supplies only what does: paths
(`StagePaths`), the machine the processes run on (`Machine`), reading the stage's files
(`StageFiles`) and running the merge (`ModelMerger`). `runtime.stage_kinds.kind_of` maps a
stage spec to its kind object.

Progress is counted in *steps* and resumed from *checkpoints*, because the reconciler's
step arithmetic (resume from the latest valid checkpoint, a decrease below it is a no-op)
is the same for every kind. What a step and a checkpoint are is the kind's business: a
training kind's are verl's optimizer steps and `global_step_N` directories; an eval
stage's are sample rounds (one sample of every problem) and the rounds complete on disk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from reconciler.backend import Change, Checkpoint, Outcome, RenderedCommand, StageContext
from reconciler.errors import TerminalError
from reconciler.spec import Stage, ToolCallCheck
from runtime.checkpoints import CkptEntry
from runtime.verl.common import StagePaths


@dataclass(frozen=True)
class Machine:
    """Where a stage's processes run, as its backend knows it.

    `device` "cpu" trains through runtime.verl.cpu_platform; `gpus` is what each node's
    processes may use; `attn_implementation` is what verl loads models with when not its
    default (FlashAttention 2), e.g. "sdpa" where flash_attn is missing; `has_module` says
    whether a Python module is importable there (a rollout or eval engine); `wandb_key` whether
    W&B's key reaches the processes from the backend's own environment (else W&B logs offline
    unless one of the stage's secrets carries it)."""

    device: Literal["cpu", "cuda"]
    gpus: int
    attn_implementation: str | None
    has_module: Callable[[str], bool]
    wandb_key: bool = False  # WANDB_API_KEY reaches the processes from the backend's environment

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"


class StageFiles(Protocol):
    """One run of a stage on its volume, read by the backend (a directory on this machine,
    a Modal volume). Paths are as the stage's processes see them."""

    @property
    def stage_root(self) -> str:
        """`<volume>/<stage>`: every run directory of the stage lives under it."""
        ...

    @property
    def run_dir(self) -> str:
        """`<stage root>/<restart_id[:16]>`: this run's directory."""
        ...

    def read_text(self, name: str) -> str | None:
        """The text of the file `name` in the run directory, None when it does not exist.
        Raises TransientError when it exists but cannot be read now."""
        ...

    def checkpoint_entries(self) -> list[CkptEntry]:
        """The stage root's listing as runtime.checkpoints.scan_local builds it (every run
        directory, four levels deep, no merged models, no retool run files); [] when the
        root does not exist. Raises TransientError when it cannot be listed now."""
        ...


class ToolCallMeasure(BaseModel):
    """How often a merged model called the tool (runtime.toolcheck), as its merge reports it."""

    model_config = ConfigDict(frozen=True)

    rate: float
    prompts: int
    examples: str = Field("", description="A few completions, one a line, to show when the rate is too low.")


class MergeResult(BaseModel):
    """What a backend's merge did: `change` is `unchanged` when the merged model of this
    checkpoint was already there (its record names it)."""

    model_config = ConfigDict(frozen=True)

    change: Change
    outputs: dict[str, Any] = Field(default_factory=dict, description="The backend's extra outputs (metrics, W&B URL).")
    tool_check: ToolCallMeasure | None = None


class ModelMerger(Protocol):
    """Runs a merge where the stage's files are (a subprocess here, a function on Modal)."""

    def merge(
        self, command: Callable[[str], RenderedCommand], checkpoint: Checkpoint, check: ToolCallCheck | None,
    ) -> MergeResult:
        """Run `command(target_dir)`, which merges `checkpoint` into `target_dir` (the stage's
        merged directory, or a temporary one the backend swaps in), then measure the tool-call
        rate when `check` is set. Idempotent: a merge already recorded for this checkpoint
        (and check) is not run again."""
        ...


class StageKind(ABC):
    """One kind of stage. Implementations: runtime.verl.kind (sft, rl), runtime.eval.kind (eval).

    A kind is stateless: every method gets what it needs from its arguments."""

    name: ClassVar[str]
    uses_sandbox: ClassVar[bool] = False  # its processes call the code sandbox while they run
    resumable_files: ClassVar[tuple[str, ...]] = ()
    """Files in the run directory that carry a run's progress and that a backend which keeps
    the run directory across a from-scratch launch must set aside (training kinds: none, the
    backend moves whole checkpoint directories)."""

    def blocker(self, stage: Stage, machine: Machine) -> str | None:
        """Why this stage cannot run on `machine` (plan shows it `blocked`), or None."""
        return None

    @abstractmethod
    def commands(
        self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None,
    ) -> list[RenderedCommand]:
        """The processes one run executes, in order. `sandbox_url` is where the sandbox
        answers (None: not running; a kind that `uses_sandbox` refuses then)."""

    def run_inputs(
        self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None,
    ) -> dict[str, str]:
        """Files (name -> text) the backend writes into the run directory before launching."""
        return {}

    def merge_command(self, checkpoint_dir: str, target_dir: str) -> RenderedCommand | None:
        """The command that merges the checkpoint at `checkpoint_dir` into a Hugging Face
        model at `target_dir`; None for a kind whose output is not a model."""
        return None

    def finalize_commands(self, ctx: StageContext, paths: StagePaths) -> list[RenderedCommand]:
        """What finalize runs after the run (shown by `retool render`, never launched)."""
        final = ctx.total_steps if ctx.total_steps is not None else "N"
        merge = self.merge_command(f"{paths.ckpt_dir}/global_step_{final}", paths.merged_dir)
        if merge is None:
            return []
        return [merge.model_copy(update={"description": merge.description + " (in finalize, after training)"})]

    def render(
        self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None,
    ) -> list[RenderedCommand]:
        """`retool render`: the run's commands, then finalize's."""
        return [*self.commands(ctx, paths, machine, sandbox_url), *self.finalize_commands(ctx, paths)]

    @abstractmethod
    def discover(self, files: StageFiles, *, world_size: int, restart_id: str) -> list[Checkpoint]:
        """The stage's checkpoints read from its files (valid or not, with the reason)."""

    @abstractmethod
    def finalize(
        self, ctx: StageContext, checkpoint: Checkpoint, paths: StagePaths, files: StageFiles, merger: ModelMerger,
    ) -> Outcome:
        """The stage's recorded outputs after its run succeeded at `checkpoint`; a failed
        post-check raises TerminalError (the run's files stay)."""


def require_sandbox(ctx: StageContext, sandbox_url: str | None) -> str:
    """`sandbox_url`, or the error a stage that calls the sandbox raises without one."""
    if sandbox_url is None:
        raise TerminalError(
            f"stage.{ctx.stage} needs the sandbox, which is not running",
            hint="apply the `sandbox` node first (retool apply starts it)",
        )
    return sandbox_url
