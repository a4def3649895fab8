"""Real verl SFT on the tiny model through LocalRuntime: launch detached, poll to the end,
discover checkpoints, merge, resume with more steps, cancel, and a run lost to `kill -9`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from reconciler.errors import TerminalError
from reconciler.spec import Spec
from reconciler.state.base import RunHandle
from runtime import processes as procs
from reconciler.backend import RunStatus, StageContext
from runtime.checkpoints import latest_valid
from runtime.local.backend import LocalRuntime
from tests.local_helpers import write_sft_jsonl

pytestmark = pytest.mark.slow

RID = "e5" * 32


def make_spec(tmp_path: Path, **stage: object) -> Spec:
    sft = {
        "kind": "sft", "model": "model.tiny", "train": "dataset.train", "resources": {"processes_per_node": 1},
        "max_length": 512, "train_batch_size": 8, "micro_batch_size_per_gpu": 8, "epochs": 4,
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0}, "ulysses_sequence_parallel_size": 1,
        "use_remove_padding": True, "gradient_checkpointing": False, "save_freq": 2,
    }
    sft.update(stage)
    return Spec.model_validate({
        "name": "e2e", "local": {"root": str(tmp_path / "volumes")},
        "volumes": {"data": {"mount": "/data"}, "models": {"mount": "/models"}, "checkpoints": {"mount": "/c"}},
        "datasets": {"train": {"source": "path:train.jsonl", "format": "messages"}},
        "models": {"tiny": {"source": "builtin:tiny-qwen2"}},
        "stages": {"sft": sft},
    })


def wait(rt: LocalRuntime, handle: RunHandle, timeout: float = 300) -> RunStatus:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = rt.poll_stage(handle)
        if status.state != "running":
            return status
        time.sleep(1)
    rt.cancel_stage(handle)
    raise AssertionError("run did not finish in time")


def wait_for_step(rt: LocalRuntime, handle: RunHandle, step: int, timeout: float = 300) -> RunStatus:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = rt.poll_stage(handle)
        if status.state != "running" or (status.step or 0) >= step:
            return status
        time.sleep(0.5)
    raise AssertionError(f"no step {step} in time")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("e2e")
    write_sft_jsonl(tmp / "train.jsonl", rows=64)
    spec = make_spec(tmp)
    rt = LocalRuntime(str(tmp / ".retool"))
    for name, vol in spec.volumes.items():
        assert rt.ensure_volume(name, vol, spec).change == "created"
    data = rt.prepare_dataset("train", spec.datasets["train"], spec, str(tmp))
    model = rt.prepare_model("tiny", spec.models["tiny"], spec, str(tmp))
    assert data.change == model.change == "created" and data.outputs["rows"] == 64
    return tmp, rt, {"dataset.train": data.outputs, "model.tiny": model.outputs}


def test_train_resume_merge(prepared):
    tmp, rt, inputs = prepared
    spec = make_spec(tmp)
    ctx = StageContext(spec=spec, spec_dir=str(tmp), stage="sft", restart_id=RID, total_steps=3, inputs=inputs,
                       state_dir=str(tmp / ".retool"))
    t0 = time.time()
    handle = rt.launch_stage(ctx)
    assert time.time() - t0 < 10  # detached: returns at once
    assert handle.ref.pid and handle.ref.pgid == handle.ref.pid and Path(handle.ref.log_path).parent == tmp / ".retool" / "logs"
    status = wait(rt, handle)
    assert status.state == "succeeded", (status.message, status.log_tail)
    assert (status.step, status.total) == (3, 3) and status.metrics["train/loss"] > 0
    print(f"\n3 steps from scratch: {status.elapsed_s:.1f}s wall")

    found = [c for c in rt.discover_checkpoints(spec, "sft", RID) if c.restart_id == RID]
    assert [(c.step, c.valid) for c in found] == [(2, True), (3, True)]
    latest = latest_valid(found, RID)
    assert latest is not None and latest.world_size == 1
    metrics_file = Path(rt.stage_paths(spec, "sft", RID).stage_dir) / "metrics.jsonl"
    assert len(metrics_file.read_text().splitlines()) == 3

    # More steps: resumes from global_step_3 (verl logs it) and continues at step 4.
    ctx5 = ctx.model_copy(update={"total_steps": 5, "resume_from": 3})
    handle = rt.launch_stage(ctx5)
    status = wait(rt, handle)
    assert status.state == "succeeded", (status.message, status.log_tail)
    log = Path(handle.ref.log_path).read_text()
    assert "global_step_3 (step 3)" in log or "Loaded model from" in log
    from runtime.metrics import parse_text

    assert [r.step for r in parse_text(log)] == [4, 5]
    print(f"resume 3 -> 5: {status.elapsed_s:.1f}s wall")
    latest = latest_valid(rt.discover_checkpoints(spec, "sft", RID), RID)
    assert latest is not None and latest.step == 5

    out = rt.finalize_stage(ctx5, latest)
    assert out.change == "created" and out.outputs["final_step"] == 5
    again = rt.finalize_stage(ctx5, latest)
    assert again.change == "unchanged" and again.outputs["model_path"] == out.outputs["model_path"]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out.outputs["model_path"])
    model = AutoModelForCausalLM.from_pretrained(out.outputs["model_path"])
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]

    # The tool-call check: measured on the merged model, cached, and enforced.
    checked = make_spec(tmp, tool_call_check={"prompts": 4, "min_rate": 0.0})
    res = rt.finalize_stage(ctx5.model_copy(update={"spec": checked}), latest)
    assert res.outputs["tool_call_prompts"] == 4 and 0.0 <= res.outputs["tool_call_rate"] <= 1.0
    strict = make_spec(tmp, tool_call_check={"prompts": 4, "min_rate": 1.0})
    if res.outputs["tool_call_rate"] < 1.0:
        with pytest.raises(TerminalError, match="well-formed tool call"):
            rt.finalize_stage(ctx5.model_copy(update={"spec": strict}), latest)

    # A forced rerun of the same identity starts from scratch; the old run is moved aside, not deleted.
    rerun = ctx.model_copy(update={"total_steps": 1, "resume_from": None})
    handle = rt.launch_stage(rerun)
    status = wait(rt, handle)
    assert status.state == "succeeded" and status.step == 1
    assert [c.step for c in rt.discover_checkpoints(spec, "sft", RID) if c.restart_id == RID] == [1]
    assert any((rt.stage_root(spec, "sft") / ".replaced").iterdir())


def test_cancel_and_lost(prepared):
    tmp, rt, inputs = prepared
    spec = make_spec(tmp, save_freq=100)
    rid = "f6" * 32
    ctx = StageContext(spec=spec, spec_dir=str(tmp), stage="sft", restart_id=rid, total_steps=30, inputs=inputs)
    handle = rt.launch_stage(ctx)
    status = wait_for_step(rt, handle, 1)
    assert status.state == "running" and status.step >= 1
    rt.cancel_stage(handle)
    status = rt.poll_stage(handle)
    assert status.state == "failed" and status.message.startswith("cancelled")
    assert procs.tagged_processes(handle.ref.tag) == []  # torchrun's workers too
    rt.cancel_stage(handle)  # idempotent

    handle = rt.launch_stage(ctx)
    assert wait_for_step(rt, handle, 1).state == "running"
    os.killpg(handle.ref.pgid, signal.SIGKILL)  # nothing gets to write an exit status
    deadline = time.time() + 30
    while (status := rt.poll_stage(handle)).state == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert status.state == "lost" and "left no exit status" in status.message and status.log_tail
    # torchrun's workers live in their own sessions and survive the group's SIGKILL: poll stopped them
    assert "leftover" in status.message and procs.tagged_processes(handle.ref.tag) == []


def test_resume_at_an_epoch_boundary_reaches_the_total(prepared):
    """verl restores a checkpoint taken at an epoch's last step with an exhausted dataloader
    (that epoch then yields nothing); the rendered spare epoch lets the run still reach its total."""
    tmp, rt, inputs = prepared
    rid = "a7" * 32
    one = make_spec(tmp, epochs=1, train_batch_size=32, micro_batch_size_per_gpu=32)  # 64 rows: 2 steps/epoch
    ctx = StageContext(spec=one, spec_dir=str(tmp), stage="sft", restart_id=rid, total_steps=2, inputs=inputs)
    assert wait(rt, rt.launch_stage(ctx)).state == "succeeded"
    three = make_spec(tmp, epochs=3, train_batch_size=32, micro_batch_size_per_gpu=32)
    handle = rt.launch_stage(ctx.model_copy(update={"spec": three, "total_steps": 6, "resume_from": 2}))
    status = wait(rt, handle)
    assert status.state == "succeeded" and status.step == 6, (status.message, status.log_tail)
    latest = latest_valid(rt.discover_checkpoints(three, "sft", rid), rid)
    assert latest is not None and latest.step == 6


def test_two_processes_write_both_shards_and_merge(prepared):
    tmp, rt, inputs = prepared
    rid = "b8" * 32
    spec = make_spec(tmp, resources={"processes_per_node": 2}, micro_batch_size_per_gpu=4, save_freq=100)
    with pytest.raises(TerminalError, match="does not divide the per-process batch 4"):
        rt.render_stage(StageContext(spec=make_spec(tmp, resources={"processes_per_node": 2}), spec_dir=str(tmp),
                                     stage="sft", restart_id=rid, total_steps=2, inputs=inputs))
    ctx = StageContext(spec=spec, spec_dir=str(tmp), stage="sft", restart_id=rid, total_steps=2, inputs=inputs)
    handle = rt.launch_stage(ctx)
    assert "--nproc_per_node=2" in handle.command
    status = wait(rt, handle)
    assert status.state == "succeeded" and status.step == 2, (status.message, status.log_tail)
    (ck,) = [c for c in rt.discover_checkpoints(spec, "sft", rid) if c.restart_id == rid]  # others' runs are foreign
    assert ck.valid and ck.world_size == 2
    assert sorted(p.name for p in Path(ck.path).glob("model_world_size_2_rank_*.pt")) == [
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt",
    ]
    out = rt.finalize_stage(ctx, ck)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out.outputs["model_path"]).num_parameters() > 0
