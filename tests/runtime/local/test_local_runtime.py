"""LocalRuntime and runtime.processes with real processes and real directories (no verl
training here: tests/runtime/local/test_local_sft_e2e.py runs that)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reconciler.errors import TerminalError
from reconciler.spec import RLStage, Spec
from reconciler.state.base import LocalRun, RunHandle
from runtime.local import runs as local_runs
from runtime import processes as procs
from reconciler.backend import RenderedCommand, RunStatus, StageContext
from runtime.checkpoints import marker_content, write_complete
from runtime.local.backend import LocalRuntime
from runtime.metrics import read_file
from runtime.verl.kind import RL
from tests.local_helpers import write_sft_jsonl

RID = "9a" * 32


def spec_for(tmp_path: Path, **extra: object) -> Spec:
    doc = {
        "name": "local-test", "local": {"root": "vols"},
        "secrets": {"wandb": {"env": ["RETOOL_TEST_WANDB_KEY"]}},
        "volumes": {"data": {"mount": "/data"}, "models": {"mount": "/models"},
                    "checkpoints": {"mount": "/c"}, "keep": {"mount": "/k", "protect": True}},
        "sandbox": {},
        "datasets": {"train": {"source": "path:train.jsonl", "format": "messages"},
                     "math": {"source": "builtin:tiny_math", "format": "rl"}},
        "models": {"tiny": {"source": "builtin:tiny-qwen2"}},
        "stages": {
            "sft": {"kind": "sft", "model": "model.tiny", "train": "dataset.train", "resources": {"processes_per_node": 1},
                    "train_batch_size": 8, "micro_batch_size_per_gpu": 8, "ulysses_sequence_parallel_size": 1},
            "big": {"kind": "sft", "model": "model.tiny", "train": "dataset.train", "secrets": ["wandb"],
                    "resources": {"gpu": "H100", "gpus_per_node": 8}},
            "rl": {"kind": "rl", "model": "stage.sft", "train": "dataset.math", "resources": {"processes_per_node": 1},
                   "train_batch_size": 4, "ppo_mini_batch_size": 4, "ulysses_sequence_parallel_size": 1},
            "rl_sglang": {"kind": "rl", "model": "stage.sft", "train": "dataset.math", "rollout": {"engine": "sglang"},
                        "train_batch_size": 4, "ppo_mini_batch_size": 4},
        },
    }
    doc.update(extra)
    return Spec.model_validate(doc)


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalRuntime:
    monkeypatch.setenv("RETOOL_LOCAL_DEVICE", "cpu")
    return LocalRuntime(str(tmp_path / ".retool"))


# --------------------------------------------------------------------------- detached processes


def start(tmp_path: Path, *scripts: str, name: str = "run") -> RunHandle:
    """Start `scripts` (python sources) as one detached run; a handle as launch_stage records it."""
    log = tmp_path / "logs" / f"{name}.log"
    exit_path = log.with_name(f"{name}.exit.json")
    commands = [procs.PlannedCommand(argv=[sys.executable, "-c", textwrap.dedent(s)]) for s in scripts]
    info = procs.start_detached(commands, log_path=log, exit_path=exit_path)
    return RunHandle(
        ref=LocalRun(pid=info.pid, pgid=info.pgid, start_ticks=info.start_ticks, tag=info.tag, log_path=str(log),
                     exit_path=str(exit_path), metrics_path=str(tmp_path / "stage" / "metrics.jsonl")),
        command=commands[-1].argv, total_steps=3,
    )


def poll_until(rt: LocalRuntime, handle: RunHandle, done: callable, timeout: float = 60) -> RunStatus:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = rt.poll_stage(handle)
        if done(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"condition not reached; last status {status}")


STEPS = """
    import sys, time
    for i in range(1, 4):
        print(f"step:{i} - train/loss:{4.0 - i} - train/lr:0.001", flush=True)
        time.sleep(0.2)
"""


def test_run_succeeds_and_metrics_are_parsed(tmp_path: Path, rt: LocalRuntime):
    handle = start(tmp_path, STEPS)
    status = poll_until(rt, handle, lambda s: s.state != "running")
    assert status.state == "succeeded" and (status.step, status.total) == (3, 3)
    assert status.metrics == {"train/loss": 1.0, "train/lr": 0.001}
    assert status.elapsed_s is not None and status.elapsed_s > 0
    assert (tmp_path / "stage" / "metrics.jsonl").read_text().count("\n") == 3
    record = procs.read_exit(Path(handle.ref.exit_path))
    assert record is not None and record.returncode == 0 and not record.cancelled


RUNNING = """
    import time
    print("wandb: View run tiny at: https://wandb.ai/me/retool/runs/abc123", flush=True)
    for i in range(1, 4):
        print(f"step:{i} - train/loss:{4.0 - i} - train/lr:0.001 - train/grad_norm:0.5", flush=True)
    time.sleep(300)
"""


def test_status_sees_a_running_runs_metrics_sparkline_and_wandb_url(tmp_path: Path, rt: LocalRuntime):
    from reconciler.loader import LoadedSpec
    from reconciler.refresh import observe_stage
    from reconciler.state.base import NodeRecord

    handle = start(tmp_path, RUNNING)
    try:
        status = poll_until(rt, handle, lambda s: s.step == 3)
        assert status.state == "running" and status.sparklines == {"loss": "█▅▁"}
        assert status.wandb_url == "https://wandb.ai/me/retool/runs/abc123"
        loaded = LoadedSpec(path=str(tmp_path / "s.yaml"), spec_dir=str(tmp_path), spec=spec_for(tmp_path), text="")
        rec = NodeRecord(address="stage.sft", kind="stage", status="running", run=handle, restart_id=RID)
        seen, notes = observe_stage(loaded, rec, rt)
        assert notes == [] and seen.run_state == "running" and seen.step == 3
        assert seen.metrics == {"train/loss": 1.0, "train/grad_norm": 0.5, "train/lr": 0.001}
        assert (seen.sparklines, seen.wandb_url) == (status.sparklines, status.wandb_url)
    finally:
        rt.cancel_stage(handle)


def test_a_resumed_runs_metrics_keep_the_steps_before_it(tmp_path: Path, rt: LocalRuntime):
    metrics = tmp_path / "stage" / "metrics.jsonl"
    metrics.parent.mkdir()
    # the first run reached step 3 (checkpoint at 2); the resumed run redoes step 3
    metrics.write_text("".join(f'{{"step": {i}, "train/loss": {9.0 - i}}}\n' for i in (1, 2, 3)))
    handle = start(tmp_path, "print('step:3 - train/loss:2.0', flush=True)")
    handle = handle.model_copy(update={"resume_from": 2})
    status = poll_until(rt, handle, lambda s: s.state != "running")
    assert status.state == "succeeded" and status.step == 3
    assert [(r.step, r.values["train/loss"]) for r in read_file(metrics)] == [(1, 8.0), (2, 7.0), (3, 2.0)]
    assert status.sparklines == {"loss": "█▇▁"}


def test_failure_reports_code_and_error_line_and_stops_the_sequence(tmp_path: Path, rt: LocalRuntime):
    handle = start(tmp_path, "raise ValueError('boom')", "print('never runs')")
    status = poll_until(rt, handle, lambda s: s.state != "running")
    assert status.state == "failed"
    assert status.message == "exited with code 1: ValueError: boom"
    assert "never runs" not in Path(handle.ref.log_path).read_text()
    assert procs.read_exit(Path(handle.ref.exit_path)).failed_command == 0


ORPHAN = """
    import subprocess, sys, time
    # like torchrun: a worker in a session of its own, out of reach of the group's signals
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    print("step:1 - train/loss:1.0", flush=True)
    time.sleep(300)
"""


def test_kill_9_of_the_leader_is_lost_and_leftovers_are_stopped(tmp_path: Path, rt: LocalRuntime):
    handle = start(tmp_path, ORPHAN)
    poll_until(rt, handle, lambda s: s.step == 1)
    tag = handle.ref.tag
    assert len(procs.tagged_processes(tag)) >= 3  # wrapper, script, its own-session child
    os.kill(handle.ref.pid, signal.SIGKILL)
    status = poll_until(rt, handle, lambda s: s.state != "running")
    assert status.state == "lost"
    assert "left no exit status" in status.message and "leftover" in status.message
    assert status.log_tail and status.step == 1
    assert procs.tagged_processes(tag) == []


def test_cancel_reaches_processes_in_other_sessions(tmp_path: Path, rt: LocalRuntime):
    handle = start(tmp_path, ORPHAN)
    poll_until(rt, handle, lambda s: s.step == 1)
    rt.cancel_stage(handle)
    assert procs.tagged_processes(handle.ref.tag) == []
    status = rt.poll_stage(handle)
    assert status.state == "failed" and status.message == "cancelled (SIGTERM)"
    rt.cancel_stage(handle)  # nothing left: a no-op


SLEEPER = "import time; print('step:1 - train/loss:1.0', flush=True); time.sleep(300)"


def sleeper_stage(rt: LocalRuntime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, total: int) -> StageContext:
    """A stage context whose training command is a long sleep, launched through launch_stage's own path."""
    monkeypatch.setattr(rt, "_train_commands", lambda ctx, paths, sandbox_url: [RenderedCommand(argv=["python", "-c", SLEEPER])])
    return StageContext(spec=spec_for(tmp_path), spec_dir=str(tmp_path), stage="sft", restart_id=RID, total_steps=total)


def test_launch_reattaches_to_a_live_run_nobody_recorded(tmp_path: Path, rt: LocalRuntime, monkeypatch: pytest.MonkeyPatch):
    ctx = sleeper_stage(rt, monkeypatch, tmp_path, total=3)
    run_dir = tmp_path / "vols" / "checkpoints" / "sft" / RID[:16]
    first = rt.launch_stage(ctx)
    handles = [first]
    try:
        record = json.loads((run_dir / local_runs.ACTIVE_RUN_FILE).read_text())
        assert RunHandle.model_validate(record) == first  # the whole handle, typed reference included
        (run_dir / "global_step_1").mkdir()  # what the run has written so far
        # apply died before recording `first`: the next apply launches the same stage again
        again = rt.launch_stage(ctx)
        handles.append(again)
        assert (again.ref.pid, again.ref.tag, again.started_at) == (first.ref.pid, first.ref.tag, first.started_at)
        assert again.reattached is True
        assert (run_dir / "global_step_1").is_dir() and not (run_dir.parent / ".replaced").exists()
        assert len(list((tmp_path / ".retool" / "logs").glob("sft-*.log"))) == 1
        assert procs.is_alive(first.ref.pid, first.ref.start_ticks)
        with pytest.raises(TerminalError, match="still has a running trainer"):
            local_runs.move_aside(run_dir)
        # more steps planned than that unrecorded run trains: it is stopped, not joined
        more = rt.launch_stage(ctx.model_copy(update={"total_steps": 5}))
        handles.append(more)
        assert more.ref.pid != first.ref.pid and not procs.is_alive(first.ref.pid, first.ref.start_ticks)
        assert procs.tagged_processes(first.ref.tag) == []
        assert (run_dir.parent / ".replaced").is_dir()  # from scratch, over a run that no longer runs
    finally:
        for handle in handles:
            rt.cancel_stage(handle)


def test_launch_does_not_reuse_a_record_whose_run_ended(tmp_path: Path, rt: LocalRuntime, monkeypatch: pytest.MonkeyPatch):
    ctx = sleeper_stage(rt, monkeypatch, tmp_path, total=3)
    first = rt.launch_stage(ctx)
    poll_until(rt, first, lambda s: s.step == 1)
    rt.cancel_stage(first)
    assert rt.poll_stage(first).state == "failed"
    second = rt.launch_stage(ctx)
    try:
        assert second.ref.pid != first.ref.pid and second.ref.tag != first.ref.tag
        assert second.reattached is False
        assert procs.is_alive(second.ref.pid, second.ref.start_ticks)
    finally:
        rt.cancel_stage(second)


def test_a_recycled_pid_is_not_our_run():
    ticks = procs.start_ticks(os.getpid())
    assert ticks is not None
    assert procs.is_alive(os.getpid(), ticks)
    assert not procs.is_alive(os.getpid(), ticks + 1)


def test_tail_splits_carriage_returns(tmp_path: Path):
    log = tmp_path / "x.log"
    log.write_text("a\nbar 1%\rbar 50%\rbar 100%\nlast\n")
    assert procs.tail(log, 3) == ["bar 50%", "bar 100%", "last"]
    assert procs.tail(tmp_path / "missing.log") == []


# --------------------------------------------------------------------------- the runtime's other methods


def test_volumes(tmp_path: Path, rt: LocalRuntime):
    spec = spec_for(tmp_path)
    out = rt.ensure_volume("data", spec.volumes["data"], spec)
    assert out.change == "created" and out.outputs["path"] == str(tmp_path / "vols" / "data")
    assert rt.ensure_volume("data", spec.volumes["data"], spec).change == "unchanged"
    assert rt.delete_volume("data", spec.volumes["data"], spec).change == "updated"
    assert not (tmp_path / "vols" / "data").exists()
    with pytest.raises(TerminalError, match="protected"):
        rt.delete_volume("keep", spec.volumes["keep"], spec)


def test_build_image_records_the_environment(tmp_path: Path, rt: LocalRuntime):
    spec = spec_for(tmp_path)
    first = rt.build_image(spec.image, spec)
    assert first.change == "created"
    assert first.outputs["packages"]["verl"] == "0.9.1" and first.outputs["device"] == "cpu"
    assert first.outputs["python"] == ".".join(map(str, sys.version_info[:3]))
    assert rt.build_image(spec.image, spec).change == "unchanged"
    pinned = spec.image.model_copy(update={"pip": ["verl==0.8.0"]})
    assert "verl 0.9.1 (image wants ==0.8.0)" in rt.build_image(pinned, spec).message


def test_blocked_reasons(tmp_path: Path, rt: LocalRuntime):
    spec = spec_for(tmp_path)
    assert rt.blocked_reason(spec, "stage.sft") is None
    assert "8× H100 but this machine has 0 GPU" in rt.blocked_reason(spec, "stage.big")
    assert "needs a GPU" in rt.blocked_reason(spec, "stage.rl_sglang")
    assert rt.blocked_reason(spec, "dataset.train") is None
    # the CPU rollout ships with retool: RL is not blocked on CPU (vLLM's CPU build where installed)
    rl = spec.stages["rl"]
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert isinstance(rl, RLStage) and RL.engine(rl, rt.machine()) == ("vllm" if has_vllm else "transformers")
    assert rt.blocked_reason(spec, "stage.rl") is None


def test_preflight_and_launch_name_missing_secrets(tmp_path: Path, rt: LocalRuntime, monkeypatch: pytest.MonkeyPatch):
    spec = spec_for(tmp_path)
    monkeypatch.delenv("RETOOL_TEST_WANDB_KEY", raising=False)
    assert any("RETOOL_TEST_WANDB_KEY" in p for p in rt.preflight(spec))
    monkeypatch.setenv("RETOOL_TEST_WANDB_KEY", "value")
    assert rt.preflight(spec) == []


def test_prepare_dataset_is_idempotent_and_notices_a_changed_file(tmp_path: Path, rt: LocalRuntime):
    spec = spec_for(tmp_path)
    write_sft_jsonl(tmp_path / "train.jsonl", rows=6)
    first = rt.prepare_dataset("train", spec.datasets["train"], spec, str(tmp_path))
    assert first.change == "created" and first.outputs["rows"] == 6
    assert first.outputs["path"] == str(tmp_path / "vols" / "data" / "datasets" / "train" / "train.parquet")
    assert rt.prepare_dataset("train", spec.datasets["train"], spec, str(tmp_path)).change == "unchanged"
    time.sleep(0.01)
    write_sft_jsonl(tmp_path / "train.jsonl", rows=4, seed=1)
    again = rt.prepare_dataset("train", spec.datasets["train"], spec, str(tmp_path))
    assert again.change == "updated" and again.outputs["rows"] == 4 and again.outputs["digest"] != first.outputs["digest"]
    capped = spec.datasets["train"].model_copy(update={"max_rows": 2})
    assert rt.prepare_dataset("train", capped, spec, str(tmp_path)).outputs["rows"] == 2


def test_model_building_and_the_tool_check_draw_no_progress_bars(
    tmp_path: Path, rt: LocalRuntime, capfd: pytest.CaptureFixture[str]
):
    from transformers.utils import logging as tf_logging

    from runtime.local.finalize import measure_tool_calls

    assert tf_logging.is_progress_bar_enabled()
    spec = spec_for(tmp_path)
    built = rt.prepare_model("tiny", spec.models["tiny"], spec, str(tmp_path))
    checked = measure_tool_calls(Path(built.outputs["path"]), prompts=2, problems="fixed_shape")
    out, err = capfd.readouterr()
    assert built.change == "created" and checked["n"] == 2 and checked["problems"] == "fixed_shape"
    assert "Writing model shards" not in out + err and "Loading weights" not in out + err
    assert "it/s" not in out + err
    assert tf_logging.is_progress_bar_enabled()  # the process keeps its own setting


def test_render_and_discover(tmp_path: Path, rt: LocalRuntime):
    spec = spec_for(tmp_path)
    ctx = StageContext(spec=spec, spec_dir=str(tmp_path), stage="sft", restart_id=RID, total_steps=12, inputs={
        "dataset.train": {"path": "/d/train.parquet"}, "model.tiny": {"path": "/m/tiny"}})
    train, merge = rt.render_stage(ctx)
    run_dir = tmp_path / "vols" / "checkpoints" / "sft" / RID[:16]
    assert f"trainer.default_local_dir={run_dir}" in train.argv and "trainer.device=cpu" in train.argv
    assert merge.argv[-4:] == ["--local_dir", f"{run_dir}/global_step_12", "--target_dir", f"{run_dir}/merged"]

    step = run_dir / "global_step_4"
    step.mkdir(parents=True)
    for kind in ("model", "optim", "extra_state"):
        (step / f"{kind}_world_size_1_rank_0.pt").write_bytes(b"x")
    (run_dir / "latest_checkpointed_iteration.txt").write_text("4")
    write_complete(step, 4, 1, RID, now=0.0)
    (run_dir / "retool.json").write_text(marker_content(RID, "sft", 1))
    foreign = tmp_path / "vols" / "checkpoints" / "sft" / ("77" * 8) / "global_step_9"
    foreign.mkdir(parents=True)
    found = rt.discover_checkpoints(spec, "sft", RID)
    assert [(c.step, c.valid, c.path) for c in found] == [
        (4, True, str(step)), (9, False, str(foreign)),
    ]


def test_launch_refuses_without_secret_values(tmp_path: Path, rt: LocalRuntime, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RETOOL_TEST_WANDB_KEY", raising=False)
    monkeypatch.setenv("RETOOL_LOCAL_DEVICE", "cuda")  # pretend a GPU so stage.big renders
    spec = spec_for(tmp_path)
    ctx = StageContext(spec=spec, spec_dir=str(tmp_path), stage="big", restart_id=RID, total_steps=2, inputs={
        "dataset.train": {"path": "/d/train.parquet"}, "model.tiny": {"path": "/m/tiny"}})
    with pytest.raises(TerminalError, match="RETOOL_TEST_WANDB_KEY"):
        rt.launch_stage(ctx)
    assert not (tmp_path / ".retool" / "logs").exists()


def test_error_line_names_the_trainer_exception_not_torchruns_summary():
    _error_line = procs.error_line
    log = [
        "[rank0]: hydra.errors.InstantiationException: Error in call to target 'verl.workers.config.model.HFModelConfig':",
        "[rank0]: OSError(\"Repo id must be in the form 'repo_name': '/nonexistent/model'.\")",
        "E1126 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "  exitcode  : 1 (pid: 10667)",
    ]
    assert _error_line(log) == (
        "InstantiationException: Error in call to target 'verl.workers.config.model.HFModelConfig': "
        "OSError(\"Repo id must be in the form 'repo_name': '/nonexistent/model'.\")"
    )
    assert _error_line(["all good"]) == ""


def test_sandbox_is_started_found_and_restarted(tmp_path: Path, rt: LocalRuntime):
    import httpx

    spec = spec_for(tmp_path, sandbox={"workers": 1})
    first = rt.ensure_sandbox(spec.sandbox, spec)
    pids = [first.outputs["pid"]]
    try:
        assert first.change == "created"
        assert httpx.get(first.outputs["url"] + "/v1/ping", timeout=5).json() == "pong"
        assert rt.idle_reason(spec, "sandbox") is None
        assert rt.ensure_sandbox(spec.sandbox, spec).outputs == first.outputs  # found, unchanged
        assert rt.ensure_sandbox(spec.sandbox, spec).change == "unchanged"
        modal_only = spec.sandbox.model_copy(update={"replicas": 3})
        assert rt.ensure_sandbox(modal_only, spec).change == "unchanged"

        changed = spec.sandbox.model_copy(update={"memory_limit_mb": 512})
        second = rt.ensure_sandbox(changed, spec)
        pids.append(second.outputs["pid"])
        assert second.change == "updated" and second.outputs["pid"] != first.outputs["pid"]
        assert not procs.is_alive(first.outputs["pid"])

        os.killpg(second.outputs["pid"], signal.SIGKILL)  # the sidecar died
        deadline = time.time() + 10
        while procs.is_alive(second.outputs["pid"]) and time.time() < deadline:
            time.sleep(0.1)
        assert rt.idle_reason(spec, "sandbox").startswith("idle, starts on demand")  # plan: no-op
        third = rt.ensure_sandbox(changed, spec)
        pids.append(third.outputs["pid"])
        assert third.change == "updated" and third.outputs["pid"] != second.outputs["pid"]
    finally:
        for pid in pids:
            procs.terminate_run(pid, grace_s=5)


def test_a_hung_recorded_sandbox_is_stopped_before_another_starts(tmp_path: Path, rt: LocalRuntime):
    import subprocess

    from runtime.atomic import write_json
    from runtime.local.resources import SandboxRecord
    from tests.local_helpers import free_port

    spec = spec_for(tmp_path, sandbox={"workers": 1})
    # A live recorded sidecar that no longer answers /v1/ping (its own session, as the real one).
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    record = SandboxRecord(
        pid=hung.pid, url=f"http://127.0.0.1:{free_port()}", start_ticks=procs.start_ticks(hung.pid),
        config_hash="whatever", log_path=str(tmp_path / "old.log"),
    )
    write_json(rt.state_dir / "sandbox.json", record.model_dump())
    started = None
    try:
        started = rt.ensure_sandbox(spec.sandbox, spec)
        assert started.change == "updated" and started.outputs["pid"] != hung.pid
        hung.wait(timeout=30)  # stopped, not left behind
    finally:
        if hung.poll() is None:
            hung.kill()
            hung.wait()
        if started is not None:
            procs.terminate_run(started.outputs["pid"], grace_s=5)


def test_a_launched_rl_run_holds_the_sidecar_up_and_an_sft_run_does_not(
    tmp_path: Path, rt: LocalRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.local.resources import _load, lease_dir, ping

    urls: list[str | None] = []

    def commands(ctx: StageContext, paths: object, sandbox_url: str | None) -> list[RenderedCommand]:
        urls.append(sandbox_url)
        return [RenderedCommand(argv=["python", "-c", SLEEPER])]

    monkeypatch.setattr(rt, "_train_commands", commands)
    spec = spec_for(tmp_path)
    handles = []
    try:
        sft = rt.launch_stage(StageContext(spec=spec, spec_dir=str(tmp_path), stage="sft", restart_id=RID, total_steps=3))
        handles.append(sft)
        rl = rt.launch_stage(StageContext(spec=spec, spec_dir=str(tmp_path), stage="rl", restart_id=RID, total_steps=3))
        handles.append(rl)
        leases = {p.name: p.read_text().split() for p in lease_dir(rt.state_dir).iterdir()}
        assert str(rl.ref.pid) in leases and str(sft.ref.pid) not in leases
        assert leases[str(rl.ref.pid)] == [str(rl.ref.pid), str(rl.ref.start_ticks)]  # dies with the run's leader
        sft_url, rl_url = urls
        assert sft_url is None and rl_url is not None and ping(rl_url)  # no sidecar was running: RL started it
    finally:
        for handle in handles:
            rt.cancel_stage(handle)
        sidecar = _load(rt.state_dir / "sandbox.json")
        if sidecar is not None:
            procs.terminate_run(sidecar.pid, grace_s=5)
