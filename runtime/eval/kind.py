"""The eval stage kind (runtime.stage_kind's contract, on runtime.eval).

An eval stage trains nothing: its run draws and grades samples, and its output is metrics,
not a model. It still speaks the reconciler's step arithmetic, in its own terms: a step is
one sample round (one sample of every problem), the total is `samples`, and its only
"checkpoint" is the number of rounds complete on disk (runtime.eval.discover), so raising
`samples` resumes and keeps the drawn ones. There is no merge; finalize computes the
metrics from the samples.
"""

from __future__ import annotations

from typing import ClassVar

from reconciler.backend import Checkpoint, Outcome, RenderedCommand, StageContext
from reconciler.spec import EvalStage, Stage
from runtime.checkpoints import MARKER_FILE
from reconciler.errors import TerminalError
from runtime.eval.discover import eval_checkpoint
from runtime.eval.engine import pick_engine
from runtime.eval.finalize import eval_outcome
from runtime.eval.job import JOB_FILE, PROGRESS_FILE, EvalJob
from runtime.eval.render import eval_command, eval_job, eval_stage
from runtime.eval.samples import RESULTS_FILE, SAMPLES_FILE
from runtime.stage_kind import Machine, ModelMerger, StageFiles, StageKind, require_sandbox
from runtime.verl.common import StagePaths


class EvalKind(StageKind):
    name: ClassVar[str] = "eval"
    uses_sandbox: ClassVar[bool] = True
    resumable_files: ClassVar[tuple[str, ...]] = (SAMPLES_FILE, PROGRESS_FILE, RESULTS_FILE)

    def blocker(self, stage: Stage, machine: Machine) -> str | None:
        if not isinstance(stage, EvalStage):
            return None
        try:  # runtime.eval.engine.pick_engine decides, here as in the run
            pick_engine(stage.engine, gpus=machine.gpus, has_vllm=machine.has_module("vllm"))
        except TerminalError as exc:
            return f"{exc.summary} ({exc.hint})" if exc.hint else exc.summary
        return None

    def job(self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None) -> EvalJob:
        """The runner's job: paths as the run sees them, the machine's GPUs."""
        return eval_job(
            ctx, out_dir=paths.stage_dir, sandbox_url=require_sandbox(ctx, sandbox_url), gpus=machine.gpus,
            device=machine.device,
        )

    def commands(
        self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None,
    ) -> list[RenderedCommand]:
        return [eval_command(ctx, self.job(ctx, paths, machine, sandbox_url))]

    def run_inputs(
        self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None,
    ) -> dict[str, str]:
        return {JOB_FILE: self.job(ctx, paths, machine, sandbox_url).model_dump_json(indent=2) + "\n"}

    def discover(self, files: StageFiles, *, world_size: int, restart_id: str) -> list[Checkpoint]:
        """This run's complete sample rounds (runtime.eval.discover)."""
        return eval_checkpoint(
            run_dir=files.run_dir, restart_id=restart_id, marker=files.read_text(MARKER_FILE),
            progress=files.read_text(PROGRESS_FILE),
        )

    def finalize(
        self, ctx: StageContext, checkpoint: Checkpoint, paths: StagePaths, files: StageFiles, merger: ModelMerger,
    ) -> Outcome:
        """Metrics for exactly the spec's `samples` per problem, from the samples on disk."""
        return eval_outcome(
            files.run_dir, ctx.total_steps or eval_stage(ctx).samples, checkpoint,
            progress=files.read_text(PROGRESS_FILE), samples=files.read_text(SAMPLES_FILE),
            results=files.read_text(RESULTS_FILE),
        )


EVAL = EvalKind()
