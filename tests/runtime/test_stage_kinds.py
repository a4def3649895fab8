"""The stage kind objects (runtime.stage_kind's contract) on their own, with the backend's
parts played by small in-memory doubles: files as a dict, a merger that records its calls."""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reconciler.backend import Checkpoint, RenderedCommand, StageContext
from reconciler.errors import TerminalError
from reconciler.loader import parse_spec_text
from reconciler.spec import RLStage, Spec, Stage, ToolCallCheck
from runtime.checkpoints import CkptEntry, marker_content
from runtime.eval.job import JOB_FILE, EvalJob, Progress
from runtime.eval.kind import EVAL
from runtime.eval.samples import Sample
from runtime.stage_kind import Machine, MergeResult, ToolCallMeasure
from runtime.stage_kinds import KINDS, kind_of
from runtime.verl.common import StagePaths
from runtime.verl.kind import RL, SFT
from runtime.verl.rl import rollout_engine
from runtime.verl.rollout import PLUGIN_MODULE

SPECS = Path(__file__).resolve().parents[2] / "specs"
RID = "7a" * 32
RUN = f"/vol/c/x/{RID[:16]}"
PATHS = StagePaths(stage_dir=RUN, ckpt_dir=RUN, merged_dir=f"{RUN}/merged")
URL = "http://127.0.0.1:8123"
INPUTS = {
    "dataset.tiny_sft": {"path": "/vol/d/tiny_sft/train.parquet"},
    "dataset.tiny_math": {"path": "/vol/d/tiny_math/train.parquet"},
    "dataset.tiny_math_test": {"path": "/vol/d/tiny_math_test/train.parquet"},
    "dataset.aime_2024": {"path": "/vol/d/aime_2024/train.parquet"},
    "model.tiny": {"path": "/vol/m/tiny"},
    "stage.sft": {"model_path": "/vol/c/sft/ab/merged"},
    "stage.rl": {"model_path": "/vol/c/rl/cd/merged"},
}


def spec() -> Spec:
    return parse_spec_text((SPECS / "retool-tiny.yaml").read_text())


def ctx(stage: str, total: int | None = 4) -> StageContext:
    return StageContext(spec=spec(), spec_dir=str(SPECS), stage=stage, restart_id=RID, total_steps=total, inputs=INPUTS)


def machine(*, cpu: bool = True, modules: tuple[str, ...] = (PLUGIN_MODULE,)) -> Machine:
    return Machine(device="cpu" if cpu else "cuda", gpus=0 if cpu else 1, attn_implementation=None,
                   has_module=lambda name: name in modules)


@dataclass
class DictFiles:
    """StageFiles over a dict of run-directory files and a stage-root listing."""

    files: dict[str, str] = field(default_factory=dict)
    entries: list[CkptEntry] = field(default_factory=list)
    stage_root: str = "/vol/c/x"
    run_dir: str = RUN

    def read_text(self, name: str) -> str | None:
        return self.files.get(name)

    def checkpoint_entries(self) -> list[CkptEntry]:
        return list(self.entries)


@dataclass
class RecordingMerger:
    """ModelMerger that records the command it was given for a target and answers `rate`."""

    rate: float | None = None
    commands: list[RenderedCommand] = field(default_factory=list)

    def merge(
        self, command: Callable[[str], RenderedCommand], checkpoint: Checkpoint, check: ToolCallCheck | None,
    ) -> MergeResult:
        self.commands.append(command("/tmp/target"))
        measured = ToolCallMeasure(rate=self.rate or 0.0, prompts=check.prompts) if check is not None else None
        return MergeResult(change="created", outputs={"extra": 1}, tool_check=measured)


def test_every_stage_kind_of_the_spec_has_one_object() -> None:
    union = typing.get_args(Stage)[0]  # Annotated[SFTStage | RLStage | EvalStage, discriminator]
    kinds = {typing.get_args(member.model_fields["kind"].annotation)[0] for member in typing.get_args(union)}
    assert kinds == set(KINDS) == {"sft", "rl", "eval"}
    assert {name: kind_of(s).name for name, s in spec().stages.items()} == {
        name: s.kind for name, s in spec().stages.items()
    }


def test_the_rollout_engine_is_chosen_by_one_rule() -> None:
    everything = (PLUGIN_MODULE, "vllm", "sglang")
    assert rollout_engine("auto", cpu=False, installed=lambda m: m in everything) == "vllm"
    assert rollout_engine("auto", cpu=False, installed=lambda m: m in (PLUGIN_MODULE, "sglang")) == "sglang"
    # on CPU: vLLM's CPU build when installed, else retool's transformers rollout; never SGLang
    assert rollout_engine("auto", cpu=True, installed=lambda m: m in everything) == "vllm"
    assert rollout_engine("auto", cpu=True, installed=lambda m: m in (PLUGIN_MODULE, "sglang")) == "transformers"
    assert rollout_engine("vllm", cpu=True, installed=lambda m: m in everything) == "vllm"
    assert rollout_engine("vllm", cpu=True, installed=lambda m: m == PLUGIN_MODULE) is None
    assert rollout_engine("sglang", cpu=True, installed=lambda m: m in everything) is None
    assert rollout_engine("transformers", cpu=True, installed=lambda m: m in everything) == "transformers"
    assert rollout_engine("sglang", cpu=False, installed=lambda m: m == PLUGIN_MODULE) is None
    assert rollout_engine("auto", cpu=True, installed=lambda m: False) is None


def test_rl_is_blocked_with_the_reason_where_no_engine_runs() -> None:
    rl = spec().stages["rl"]
    assert isinstance(rl, RLStage)
    vllm = rl.model_copy(update={"rollout": rl.rollout.model_copy(update={"engine": "vllm"})})
    sglang = rl.model_copy(update={"rollout": rl.rollout.model_copy(update={"engine": "sglang"})})
    assert RL.blocker(rl, machine()) is None
    assert RL.blocker(vllm, machine(modules=("vllm",))) is None  # vLLM's CPU build
    assert "needs a GPU" in (RL.blocker(sglang, machine(modules=("sglang",))) or "")
    assert ".[vllm]" in (RL.blocker(vllm, machine()) or "")
    assert "not installed" in (RL.blocker(vllm, machine(cpu=False)) or "")
    assert "transformers rollout" in (RL.blocker(rl, machine(modules=())) or "")
    with pytest.raises(TerminalError, match="cannot run on this machine"):
        RL.commands(ctx("rl"), PATHS, machine(modules=()), URL)


def test_kinds_that_call_the_sandbox_refuse_to_render_without_it() -> None:
    assert (SFT.uses_sandbox, RL.uses_sandbox, EVAL.uses_sandbox) == (False, True, True)
    for name in ("rl", "eval_sft"):
        with pytest.raises(TerminalError, match="needs the sandbox"):
            kind_of(spec().stages[name]).commands(ctx(name), PATHS, machine(), None)


def test_training_kinds_render_their_merge_after_the_run_and_eval_none() -> None:
    sft, rl, ev = (kind_of(spec().stages[n]).render(ctx(n), PATHS, machine(), URL) for n in ("sft", "rl", "eval_sft"))
    assert sft[-1].argv[-4:] == ["--local_dir", f"{RUN}/global_step_4", "--target_dir", f"{RUN}/merged"]
    assert rl[-1].argv[-4:] == ["--local_dir", f"{RUN}/global_step_4/actor", "--target_dir", f"{RUN}/merged"]
    assert all("(in finalize, after training)" in c[-1].description for c in (sft, rl))
    assert [c.argv[:3] for c in ev] == [["python", "-m", "runtime.eval.run"]]
    assert EVAL.merge_command(f"{RUN}/global_step_4", f"{RUN}/merged") is None
    unknown = SFT.render(ctx("sft", total=None), PATHS, machine(), None)[-1]
    assert f"{RUN}/global_step_N" in unknown.argv


def test_eval_writes_its_job_before_the_run_with_the_machines_gpus() -> None:
    (name, text), = EVAL.run_inputs(ctx("eval_sft"), PATHS, machine(cpu=False), URL).items()
    job = EvalJob.model_validate_json(text)
    assert name == JOB_FILE and (job.out_dir, job.gpus, job.device, job.sandbox_url) == (RUN, 1, "cuda", URL)
    assert SFT.run_inputs(ctx("sft"), PATHS, machine(), None) == {}
    assert EVAL.resumable_files and not SFT.resumable_files and not RL.resumable_files


def test_sft_finalize_merges_then_holds_the_model_to_its_tool_call_rate() -> None:
    ckpt = Checkpoint(step=4, path=f"{RUN}/global_step_4", valid=True, world_size=1, restart_id=RID)
    good = RecordingMerger(rate=0.9)
    out = SFT.finalize(ctx("sft"), ckpt, PATHS, DictFiles(), good)
    assert good.commands[0].argv[-4:] == ["--local_dir", f"{RUN}/global_step_4", "--target_dir", "/tmp/target"]
    assert out.change == "created" and out.outputs["model_path"] == f"{RUN}/merged" and out.outputs["extra"] == 1
    assert (out.outputs["tool_call_rate"], out.outputs["tool_call_prompts"], out.outputs["tool_call_min_rate"]) == (0.9, 50, 0.8)
    with pytest.raises(TerminalError, match="below the required 80%"):
        SFT.finalize(ctx("sft"), ckpt, PATHS, DictFiles(), RecordingMerger(rate=0.5))
    merger = RecordingMerger()
    out = RL.finalize(ctx("rl"), ckpt, PATHS, DictFiles(), merger)
    assert merger.commands[0].argv[-3] == f"{RUN}/global_step_4/actor" and "tool_call_rate" not in out.outputs
    with pytest.raises(TerminalError, match="is not valid"):
        SFT.finalize(ctx("sft"), ckpt.model_copy(update={"valid": False}), PATHS, DictFiles(), good)


def test_an_evals_checkpoint_is_its_complete_sample_rounds() -> None:
    marker = marker_content(RID, "eval_sft", 1)
    progress = Progress(problems={"tiny_math_test": 2}, rounds=2, drawn=4, target=2).model_dump_json()
    (ckpt,) = EVAL.discover(DictFiles({"retool.json": marker, "progress.json": progress}), world_size=1, restart_id=RID)
    assert (ckpt.step, ckpt.valid, ckpt.path) == (2, True, RUN)
    (foreign,) = EVAL.discover(DictFiles({"retool.json": marker, "progress.json": progress}), world_size=1,
                               restart_id="0" * 64)
    assert not foreign.valid
    samples = "".join(
        Sample(dataset="tiny_math_test", problem=p, sample=k, response="", answer="1", ground_truth="1",
               correct=p == 0, score=1.0, tool_calls=1, response_tokens=10).model_dump_json() + "\n"
        for p in range(2) for k in range(2)
    )
    files = DictFiles({"progress.json": progress, "samples.jsonl": samples})
    out = EVAL.finalize(ctx("eval_sft", total=2), ckpt, PATHS, files, RecordingMerger())
    assert out.outputs["results"]["tiny_math_test"]["mean_at_n"] == 0.5 and out.outputs["final_step"] == 2
