"""Eval stages on the Modal backend (against the fake adapter): the rendered runner command
and its job (vLLM over the stage's GPUs, the sidecar sandbox), the job on the volume at
launch, checkpoints and results read from the volume."""

from __future__ import annotations

import json

import pytest

from reconciler.backend import StageContext
from runtime.eval.job import EvalJob, Progress
from runtime.eval.samples import Sample
from runtime.modal.layout import stage_function_name
from tests.fakes.fake_modal import Containers
from tests.plan_helpers import qwen
from tests.runtime.modal.test_modal_backend import RID, ready

EVAL = {"kind": "eval", "model": "stage.sft", "datasets": ["dataset.aime_2024", "dataset.aime_2025"], "samples": 4,
        "resources": {"gpu": "H100", "gpus_per_node": 8}}
VOL = "retool-qwen7b-checkpoints"
BASE = f"eval_sft/{RID[:16]}"


def spec():  # type: ignore[no-untyped-def]
    return qwen(stages__eval_sft=EVAL)


def ctx(total: int = 4) -> StageContext:
    return StageContext(
        spec=spec(), spec_dir="/unused", stage="eval_sft", restart_id=RID, total_steps=total,
        inputs={"stage.sft": {"model_path": "/checkpoints/sft/x/merged"},
                "dataset.aime_2024": {"path": "/data/datasets/aime_2024/train.parquet"},
                "dataset.aime_2025": {"path": "/data/datasets/aime_2025/train.parquet"}},
    )


def test_render_runs_the_eval_runner_with_vllm_on_the_stages_gpus() -> None:
    fake, rt = ready(spec())
    (cmd,) = rt.render_stage(ctx())
    assert cmd.argv[1:] == ["-m", "runtime.eval.run", f"/checkpoints/{BASE}/job.json"]
    Containers(hold=True).install(fake, [stage_function_name("eval_sft")])
    rt.launch_stage(ctx())
    job = EvalJob.model_validate_json(fake.volumes[VOL][f"{BASE}/job.json"])
    assert (job.model_dir, job.gpus, job.engine, job.samples) == ("/checkpoints/sft/x/merged", 8, "auto", 4)
    assert job.datasets == {"aime_2024": "/data/datasets/aime_2024/train.parquet", "aime_2025": "/data/datasets/aime_2025/train.parquet"}
    assert job.sandbox_url.startswith("http://127.0.0.1:")  # the sidecar inside the container
    assert (job.temperature, job.top_p, job.max_response_length) == (1.0, 0.6, 16384)


def test_launch_puts_the_job_on_the_volume_and_starts_the_sidecar() -> None:
    s = spec()
    fake, rt = ready(s)
    Containers(hold=True).install(fake, [stage_function_name("eval_sft")])
    handle = rt.launch_stage(ctx())
    job = EvalJob.model_validate_json(fake.volumes[VOL][f"{BASE}/job.json"])
    assert job.out_dir == f"/checkpoints/{BASE}" and job.samples == 4
    (call,) = [c for c in fake.calls.values() if c.function == stage_function_name("eval_sft")]
    assert call.payload["sidecar"] is not None and call.payload["kind"] == "eval"
    assert handle.ref.call_id in fake.calls


def _sample(d: str, p: int, k: int, ok: bool) -> str:
    return Sample(dataset=d, problem=p, sample=k, response="x", answer="1" if ok else "2", ground_truth="1",
                  correct=ok, score=1.0 if ok else -1.0, tool_calls=1, response_tokens=100).model_dump_json()


def test_checkpoint_and_results_come_from_the_volume() -> None:
    s = spec()
    fake, rt = ready(s)
    assert rt.discover_checkpoints(s, "eval_sft", RID) == []
    fake.write(VOL, f"{BASE}/retool.json", json.dumps({"restart_id": RID, "stage": "eval_sft", "world_size": 1}))
    fake.write(VOL, f"{BASE}/progress.json", Progress(problems={"aime_2024": 2, "aime_2025": 1}, rounds=4).model_dump_json())
    lines = [_sample(d, p, k, ok=(k % 2 == 0)) for d, n in (("aime_2024", 2), ("aime_2025", 1)) for p in range(n) for k in range(4)]
    fake.write(VOL, f"{BASE}/samples.jsonl", "\n".join(lines) + "\n")
    (ckpt,) = rt.discover_checkpoints(s, "eval_sft", RID)
    assert ckpt.valid and ckpt.step == 4
    out = rt.finalize_stage(ctx(), ckpt)
    assert out.outputs["final_step"] == 4 and out.outputs["samples"] == 4
    aime = out.outputs["results"]["aime_2024"]
    assert aime["mean_at_n"] == 0.5 and aime["pass_at_k"] == pytest.approx({"1": 0.5, "2": 5 / 6, "4": 1.0})
    assert aime["maj_at_n"] == 1.0  # a 2:2 tie goes to the answer seen first (sample 0, correct)


def test_a_rerun_from_scratch_sets_earlier_samples_aside() -> None:
    s = spec()
    fake, rt = ready(s)
    Containers(hold=True).install(fake, [stage_function_name("eval_sft")])
    fake.write(VOL, f"{BASE}/samples.jsonl", _sample("aime_2024", 0, 0, True) + "\n")
    fake.write(VOL, f"{BASE}/progress.json", Progress(problems={"aime_2024": 1}, rounds=1).model_dump_json())
    rt.launch_stage(ctx())
    files = fake.volumes[VOL]
    kept = [k for k in files if k.startswith("eval_sft/.replaced/") and k.endswith("/samples.jsonl")]
    assert len(kept) == 1 and "aime_2024" in str(files[kept[0]])
    assert files[f"{BASE}/samples.jsonl"] in (b"", "")
    assert rt.discover_checkpoints(s, "eval_sft", RID) == []
