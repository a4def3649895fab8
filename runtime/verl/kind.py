"""The training stage kinds, `sft` and `rl` (runtime.stage_kind's contract, on verl).

Both train with verl, checkpoint into `global_step_N` directories under their run
directory, and end in a Hugging Face model merged from the final checkpoint: their steps
are optimizer steps and their checkpoints are verl's. They differ in their command
(runtime.verl.sft, runtime.verl.rl), where the merge reads the weights (an RL checkpoint
keeps the policy under `actor/`), and the post-check (SFT's `tool_call_check`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from reconciler.backend import Checkpoint, Outcome, RenderedCommand, StageContext
from reconciler.errors import TerminalError
from reconciler.spec import RLStage, SFTStage, Stage, ToolCallCheck
from runtime import checkpoints as ckpts
from runtime.stage_kind import Machine, ModelMerger, StageFiles, StageKind, require_sandbox
from runtime.verl.common import StagePaths, stage_spec
from runtime.verl.rl import CPU_ENGINES, GPU_ENGINES, render_rl, rollout_engine
from runtime.verl.sft import render_merge, render_sft


class TrainingKind(StageKind):
    """A verl training stage: checkpoints are `global_step_N`, the output a merged model."""

    def merge_source(self, checkpoint_dir: str) -> str:
        """The folder of `checkpoint_dir` that holds the model's FSDP shards."""
        return checkpoint_dir

    def merge_command(self, checkpoint_dir: str, target_dir: str) -> RenderedCommand:
        return render_merge(self.merge_source(checkpoint_dir), target_dir)

    def tool_call_check(self, stage: Stage) -> ToolCallCheck | None:
        """The check finalize runs on the merged model, if the stage asks for one."""
        return None

    def discover(self, files: StageFiles, *, world_size: int, restart_id: str) -> list[Checkpoint]:
        """Every run directory's checkpoints (foreign ones are reported, never resumed)."""
        return ckpts.evaluate(files.checkpoint_entries(), world_size, restart_id, root=files.stage_root)

    def finalize(
        self, ctx: StageContext, checkpoint: Checkpoint, paths: StagePaths, files: StageFiles, merger: ModelMerger,
    ) -> Outcome:
        """Merge `checkpoint` (the backend skips a merge its record already names), then
        enforce the tool-call check's minimum rate."""
        if not checkpoint.valid:
            raise TerminalError(f"checkpoint {checkpoint.path} is not valid", checkpoint.reason)
        check = self.tool_call_check(stage_spec(ctx))
        merged = merger.merge(lambda target: self.merge_command(checkpoint.path, target), checkpoint, check)
        outputs: dict[str, Any] = {
            "model_path": paths.merged_dir, "final_step": checkpoint.step, "checkpoint": checkpoint.path,
            **merged.outputs,
        }
        message = f"merged step {checkpoint.step} into {paths.merged_dir}"
        if check is not None:
            from runtime.toolcheck import require_rate

            measured = merged.tool_check
            rate, prompts = (measured.rate, measured.prompts) if measured is not None else (0.0, 0)
            outputs.update({"tool_call_rate": rate, "tool_call_prompts": prompts, "tool_call_min_rate": check.min_rate})
            examples = measured.examples if measured is not None else ""
            message += "; " + require_rate(ctx.stage, check.min_rate, rate, prompts, paths.merged_dir, examples)
        return Outcome(change=merged.change, outputs=outputs, message=message)


class SFTKind(TrainingKind):
    name: ClassVar[str] = "sft"

    def commands(
        self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None,
    ) -> list[RenderedCommand]:
        return [render_sft(
            ctx, paths, cpu=machine.cpu, attn_implementation=machine.attn_implementation, wandb_key=machine.wandb_key,
        )]

    def tool_call_check(self, stage: Stage) -> ToolCallCheck | None:
        return stage.tool_call_check if isinstance(stage, SFTStage) else None


class RLKind(TrainingKind):
    name: ClassVar[str] = "rl"
    uses_sandbox: ClassVar[bool] = True

    def merge_source(self, checkpoint_dir: str) -> str:
        return f"{checkpoint_dir}/actor"  # verl's RL checkpoint: actor/ (and critic/ with PPO)

    def blocker(self, stage: Stage, machine: Machine) -> str | None:
        if not isinstance(stage, RLStage) or self.engine(stage, machine) is not None:
            return None
        wanted = stage.rollout.engine
        if wanted in GPU_ENGINES:
            if machine.cpu and wanted not in CPU_ENGINES:
                return f"rollout engine {wanted} needs a GPU; this machine has none (use `rollout.engine: auto`)"
            hint = "pip install -c constraints.txt -e '.[vllm]'" if machine.cpu else f"pip install {wanted}"
            return f"rollout engine {wanted} is not installed ({hint})"
        return (
            "no rollout engine: verl 0.9.1 registers only vllm/sglang/trtllm, "
            + ("none of which is installed, " if not machine.cpu else "and of those only vllm runs on CPU (not installed), ")
            + "and retool's transformers rollout (runtime.verl.rollout) is not available"
        )

    @staticmethod
    def engine(stage: RLStage, machine: Machine) -> str | None:
        """The rollout engine `machine` runs for `stage` (runtime.verl.rl.rollout_engine)."""
        return rollout_engine(stage.rollout.engine, cpu=machine.cpu, installed=machine.has_module)

    def commands(
        self, ctx: StageContext, paths: StagePaths, machine: Machine, sandbox_url: str | None,
    ) -> list[RenderedCommand]:
        stage = stage_spec(ctx)
        if not isinstance(stage, RLStage):
            raise TerminalError(f"stage.{ctx.stage} is not an RL stage")
        engine = self.engine(stage, machine)
        if engine is None:
            raise TerminalError(f"stage.{ctx.stage} cannot run on this machine", self.blocker(stage, machine) or "")
        return render_rl(
            ctx, sandbox_url=require_sandbox(ctx, sandbox_url), cpu=machine.cpu, paths=paths, rollout=engine,
            attn_implementation=machine.attn_implementation, wandb_key=machine.wandb_key,
        )


SFT = SFTKind()
RL = RLKind()
