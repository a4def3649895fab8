"""The apply engine against the in-memory runtime (tests/fakes/memory_runtime.py) and the
in-memory store: ordering, state after every transition, re-attach, detach, failures and
what they skip, blocked changes, stale saved plans, deletes, updates, cancel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler.apply.engine import ApplyEvent, ApplyResult, apply, cancel
from reconciler.errors import StalePlanError, StateLockedError, TerminalError
from reconciler.loader import LoadedSpec
from reconciler.plan import Plan
from reconciler.refresh import refresh_and_plan
from reconciler.state.base import LockInfo
from reconciler.state.memory import MemoryStore
from tests.fakes.memory_runtime import Call, MemoryRuntime
from tests.fakes.pipeline import load

ORDER = [
    "volume.checkpoints", "volume.data", "volume.models", "image", "sandbox",
    "dataset.rl_data", "dataset.sft_data", "model.base", "stage.sft", "stage.rl",
]


def plan_for(loaded: LoadedSpec, store: MemoryStore, rt: MemoryRuntime, **kw: Any) -> Plan:
    return refresh_and_plan(loaded, store.read(), rt, **kw)


def run(loaded: LoadedSpec, store: MemoryStore, rt: MemoryRuntime, *, plan_kw: dict[str, Any] | None = None,
        **kw: Any) -> ApplyResult:
    plan = plan_for(loaded, store, rt, **(plan_kw or {}))
    kw.setdefault("sleep", lambda s: None)
    return apply(plan, loaded, store, rt, **kw)


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedSpec:
    return load(tmp_path)


@pytest.fixture
def rt() -> MemoryRuntime:
    return MemoryRuntime()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def actions(plan: Plan) -> dict[str, str]:
    return {c.address: c.action for c in plan.changes if c.action != "no-op"}


# --------------------------------------------------------------------------- a clean run


def test_fresh_apply_creates_everything_in_dependency_order(loaded, store, rt) -> None:
    events: list[ApplyEvent] = []
    result = run(loaded, store, rt, on_event=events.append)
    assert result.ok and result.exit_code == 0
    assert [r.address for r in result.results] == ORDER
    assert [e.address for e in events if e.kind == "start"] == ORDER
    state = store.read()
    assert state is not None
    assert {a: r.status for a, r in state.nodes.items()} == {a: "succeeded" for a in ORDER}
    sft = state.nodes["stage.sft"]
    assert (sft.steps_done, sft.total_steps, sft.outputs["final_step"]) == (16, 16, 16)
    assert sft.outputs["model_path"].endswith("/step_16")
    assert sft.output_id and sft.restart_id
    # 4 polls of 5 steps -> elapsed 4 s (the fake's clock): measured speed and cost ($1 per CPU-second).
    assert sft.seconds_per_step == pytest.approx(4 / 16)
    assert sft.cost_usd == pytest.approx(4.0)
    rl = state.nodes["stage.rl"]
    assert rl.inputs["stage.sft"] == sft.output_id
    assert rl.steps_done == 3
    # Progress events reached the caller while waiting.
    steps = [e.step for e in events if e.kind == "progress" and e.address == "stage.sft"]
    assert steps == [5, 10, 15, 16]


def test_state_is_written_after_every_transition(loaded, store, rt) -> None:
    run(loaded, store, rt)
    serials = [s.serial for s in store.history]
    assert serials == list(range(1, len(serials) + 1))
    assert len(serials) == 8 + 3 * 2  # 8 resources, then (launched, run finished, finalized) per stage
    # The run handle was on disk while the stage was running, before it finished.
    running = [s for s in store.history if s.nodes.get("stage.sft") and s.nodes["stage.sft"].status == "running"]
    assert running and running[0].nodes["stage.sft"].run is not None
    assert running[0].nodes["stage.sft"].run.ref.run_id == "run-0"  # type: ignore[union-attr]


def test_second_apply_changes_nothing_and_writes_nothing(loaded, store, rt) -> None:
    run(loaded, store, rt)
    serial = store.read().serial  # type: ignore[union-attr]
    calls = len(rt.calls)
    result = run(loaded, store, rt)
    assert result.ok and {r.result for r in result.results} == {"unchanged"}
    assert store.read().serial == serial  # type: ignore[union-attr]
    new_methods = {c.method for c in rt.calls[calls:]}
    assert new_methods <= {"blocked_reason", "discover_checkpoints", "poll_stage"}


# --------------------------------------------------------------------------- refusals before any change


def test_held_lock_refuses_before_touching_anything(loaded, store, rt) -> None:
    plan = plan_for(loaded, store, rt)
    holder = LockInfo(command="retool apply other.yaml")
    store.lock(holder)
    before = len(rt.calls)
    with pytest.raises(StateLockedError, match="retool apply other.yaml"):
        apply(plan, loaded, store, rt, sleep=lambda s: None)
    assert len(rt.calls) == before and store.read() is None
    assert store.lock_info().id == holder.id  # type: ignore[union-attr]


def test_saved_plan_is_refused_once_serial_moved(loaded, store, rt, tmp_path) -> None:
    run(loaded, store, rt)
    edited = load(tmp_path, **{"stages.rl.logging": {"experiment": "x"}})
    saved = plan_for(edited, store, rt)
    old_serial = saved.serial
    run(load(tmp_path, **{"stages.rl.logging": {"experiment": "y"}}), store, rt)
    new_serial = store.read().serial  # type: ignore[union-attr]
    with pytest.raises(StalePlanError) as exc:
        apply(saved, edited, store, rt, saved=True)
    assert exc.value.summary == "Saved plan is stale"
    assert exc.value.detail == (
        f"state serial moved from {old_serial} to {new_serial} since the plan was made; run `retool plan` again."
    )
    assert store.lock_info() is None  # released on the way out


def test_preflight_problems_stop_apply_before_any_change(loaded, store, rt) -> None:
    rt.preflight_problems = ["modal token missing", "no GPU quota"]
    plan = plan_for(loaded, store, rt)
    with pytest.raises(TerminalError) as exc:
        apply(plan, loaded, store, rt)
    assert "not ready" in exc.value.summary
    assert "modal token missing" in exc.value.detail and "no GPU quota" in exc.value.detail
    assert store.read() is None
    assert not [c for c in rt.calls if c.method not in ("preflight", "blocked_reason")]


# --------------------------------------------------------------------------- failures and what they skip


def test_failed_node_skips_its_dependents_and_independent_nodes_continue(loaded, store, rt) -> None:
    rt.fail_when(lambda c: c.method == "prepare_dataset" and c.address == "dataset.rl_data", "terminal")
    result = run(loaded, store, rt)
    assert result.exit_code == 1
    by = {r.address: r for r in result.results}
    assert by["dataset.rl_data"].result == "failed"
    assert "injected terminal failure" in by["dataset.rl_data"].message
    assert by["stage.rl"].result == "skipped"
    assert by["stage.rl"].message == "skipped because dataset.rl_data failed"
    # stage.sft does not need rl_data: it ran.
    assert by["stage.sft"].result == "succeeded" and by["dataset.sft_data"].result == "created"
    # Fixed, the next apply finishes the job without redoing anything.
    rt.clear_failures()
    result = run(loaded, store, rt)
    assert result.ok
    assert {r.address for r in result.results if r.result != "unchanged"} == {"dataset.rl_data", "stage.rl"}
    assert rt.executions["stage.sft"] == 1


def test_skip_propagates_transitively_naming_the_root_failure(loaded, store, rt) -> None:
    rt.fail_when(lambda c: c.method == "prepare_model", "terminal")
    result = run(loaded, store, rt)
    by = {r.address: r for r in result.results}
    assert by["stage.sft"].message == "skipped because model.base failed"
    assert by["stage.rl"].message == "skipped because model.base failed"


def test_transient_faults_are_retried_within_one_apply(loaded, store, rt) -> None:
    rt.fail_when(lambda c: c.method == "build_image" and len(rt.calls_to("build_image")) <= 2, "transient")
    slept: list[float] = []
    result = run(loaded, store, rt, sleep=slept.append)
    assert result.ok
    assert len(rt.calls_to("build_image")) == 3
    assert slept[:2] == [1.0, 2.0]  # backoff


def test_transient_faults_give_up_after_the_retry_budget(loaded, store, rt) -> None:
    rt.fail_when(lambda c: c.method == "build_image", "transient")
    result = run(loaded, store, rt, retries=2)
    assert result.result("image").result == "failed"  # type: ignore[union-attr]
    assert len(rt.calls_to("build_image")) == 3
    # Ordering-only: stages do not need the image's identity, but they do wait for it.
    assert result.result("stage.sft").result == "skipped"  # type: ignore[union-attr]


def test_blocked_change_completes_what_comes_before_then_stops(loaded, store, rt) -> None:
    rt.blocked = {"stage.rl": "RL needs a GPU on this backend"}
    plan = plan_for(loaded, store, rt)
    assert plan.change("stage.rl").action == "blocked"  # type: ignore[union-attr]
    result = apply(plan, loaded, store, rt, sleep=lambda s: None)
    assert result.exit_code == 1
    assert result.stopped == "stage.rl: RL needs a GPU on this backend"
    assert result.result("stage.sft").result == "succeeded"  # type: ignore[union-attr]
    assert result.result("stage.rl").result == "blocked"  # type: ignore[union-attr]
    assert not rt.calls_to("launch_stage", "stage.rl")


def test_run_that_fails_is_resumed_from_its_checkpoint_next_time(loaded, store, rt) -> None:
    rt.script_run("sft", "fail", at_step=12)
    result = run(loaded, store, rt)
    assert result.result("stage.sft").result == "failed"  # type: ignore[union-attr]
    assert result.result("stage.rl").message == "skipped because stage.sft failed"  # type: ignore[union-attr]
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert (rec.status, rec.steps_done) == ("failed", 12)
    plan = plan_for(loaded, store, rt)
    assert plan.change("stage.sft").action == "resume"  # type: ignore[union-attr]
    assert plan.change("stage.sft").resume_from == 10  # type: ignore[union-attr]
    result = apply(plan, loaded, store, rt, sleep=lambda s: None)
    assert result.ok
    second = rt.runs["run-1"]
    assert (second.resume_from, second.step) == (10, 16)


def test_lost_run_is_recorded_lost_and_resumed(loaded, store, rt) -> None:
    rt.script_run("sft", "lost", at_step=7)
    run(loaded, store, rt)
    assert store.read().nodes["stage.sft"].status == "lost"  # type: ignore[union-attr]
    result = run(loaded, store, rt)
    assert result.ok and rt.runs["run-1"].resume_from == 5


def test_unreachable_run_is_never_relaunched(loaded, store, rt) -> None:
    rt.fail_when(lambda c: c.method == "poll_stage" and c.address == "stage.sft", "terminal")
    result = run(loaded, store, rt)
    res = result.result("stage.sft")
    assert res is not None and res.result == "failed" and "not relaunched" in res.message
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert rec.status == "running" and rec.run is not None  # still ours to re-attach
    rt.clear_failures()
    result = run(loaded, store, rt)
    assert result.ok
    assert len(rt.calls_to("launch_stage", "stage.sft")) == 1


def test_failed_finalize_is_retried_without_retraining(loaded, store, rt) -> None:
    rt.fail_when(lambda c: c.method == "finalize_stage" and c.address == "stage.sft", "terminal")
    result = run(loaded, store, rt)
    assert result.result("stage.sft").result == "failed"  # type: ignore[union-attr]
    rt.clear_failures()
    result = run(loaded, store, rt)
    assert result.ok
    assert rt.executions["stage.sft"] == 1  # the trained run was finalized, not run again


# --------------------------------------------------------------------------- re-attach and detach


def test_no_wait_leaves_runs_going_and_skips_what_needs_them(loaded, store, rt) -> None:
    result = run(loaded, store, rt, wait=False)
    assert result.ok
    assert result.result("stage.sft").result == "running"  # type: ignore[union-attr]
    assert result.result("stage.rl").message == "skipped because stage.sft is still running (--no-wait)"  # type: ignore[union-attr]
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert rec.status == "running" and rec.run is not None
    plan = plan_for(loaded, store, rt)
    assert plan.change("stage.sft").action == "no-op"  # type: ignore[union-attr]
    assert "re-attaches" in " ".join(plan.change("stage.sft").notes)  # type: ignore[union-attr]
    result = apply(plan, loaded, store, rt, sleep=lambda s: None)
    assert result.ok and result.result("stage.sft").result == "succeeded"  # type: ignore[union-attr]
    assert result.result("stage.rl").result == "succeeded"  # type: ignore[union-attr]
    assert len(rt.calls_to("launch_stage", "stage.sft")) == 1


def test_ctrl_c_while_waiting_detaches_and_the_next_apply_reattaches(loaded, store, rt) -> None:
    events: list[ApplyEvent] = []

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    result = run(loaded, store, rt, sleep=interrupt, on_event=events.append)
    assert result.detached and result.exit_code == 130
    assert result.result("stage.sft").result == "running"  # type: ignore[union-attr]
    assert result.result("stage.rl").result == "not-run"  # type: ignore[union-attr]
    assert any(e.kind == "detached" and "re-attaches" in e.message for e in events)
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert rec.status == "running" and rt.runs["run-0"].state == "running"
    assert store.lock_info() is None
    result = run(loaded, store, rt)
    assert result.ok
    assert len(rt.calls_to("launch_stage", "stage.sft")) == 1


def test_running_stage_with_new_restart_identity_is_cancelled_then_rerun(loaded, store, rt, tmp_path) -> None:
    run(loaded, store, rt, wait=False)
    edited = load(tmp_path, **{"stages.sft.optim": {"lr": 2e-5}})
    plan = plan_for(edited, store, rt)
    assert plan.change("stage.sft").action == "rerun"  # type: ignore[union-attr]
    result = apply(plan, edited, store, rt, sleep=lambda s: None)
    assert result.ok
    assert [c.method for c in rt.calls if c.address == "stage.sft"].count("cancel_stage") == 1
    assert rt.runs["run-0"].state == "failed"  # cancelled
    assert rt.runs["run-1"].resume_from is None


# --------------------------------------------------------------------------- edits after a successful run


def test_sft_lr_change_reruns_sft_and_rl_with_the_new_upstream_identity(loaded, store, rt, tmp_path) -> None:
    run(loaded, store, rt)
    old = store.read()
    edited = load(tmp_path, **{"stages.sft.optim": {"lr": 2e-5}})
    plan = plan_for(edited, store, rt)
    assert actions(plan) == {"stage.sft": "rerun", "stage.rl": "rerun"}
    result = apply(plan, edited, store, rt, sleep=lambda s: None)
    assert result.ok
    new = store.read()
    assert new.nodes["stage.sft"].restart_id != old.nodes["stage.sft"].restart_id  # type: ignore[union-attr]
    assert new.nodes["stage.rl"].inputs["stage.sft"] == new.nodes["stage.sft"].output_id  # type: ignore[union-attr]
    assert rt.executions["stage.sft"] == 2 and rt.executions["stage.rl"] == 2
    assert actions(plan_for(edited, store, rt)) == {}


def test_more_epochs_resume_sft_from_its_last_step(loaded, store, rt, tmp_path) -> None:
    run(loaded, store, rt)
    edited = load(tmp_path, **{"stages.sft.epochs": 3})
    plan = plan_for(edited, store, rt)
    assert actions(plan) == {"stage.sft": "resume", "stage.rl": "rerun"}
    assert plan.change("stage.sft").resume_from == 16  # type: ignore[union-attr]
    result = apply(plan, edited, store, rt, sleep=lambda s: None)
    assert result.ok
    resumed = [r for r in rt.runs.values() if r.stage == "sft"][-1]
    assert (resumed.resume_from, resumed.step) == (16, 24)
    assert store.read().nodes["stage.sft"].outputs["final_step"] == 24  # type: ignore[union-attr]


def test_update_fields_are_recorded_without_running_anything(loaded, store, rt, tmp_path) -> None:
    run(loaded, store, rt)
    launches = len(rt.calls_to("launch_stage"))
    edited = load(tmp_path, **{"stages.rl.logging": {"experiment": "renamed"}})
    plan = plan_for(edited, store, rt)
    assert actions(plan) == {"stage.rl": "update"}
    result = apply(plan, edited, store, rt)
    assert result.ok and result.result("stage.rl").result == "updated"  # type: ignore[union-attr]
    assert len(rt.calls_to("launch_stage")) == launches
    rec = store.read().nodes["stage.rl"]  # type: ignore[union-attr]
    assert rec.config["logging"]["experiment"] == "renamed"
    assert actions(plan_for(edited, store, rt)) == {}


def test_image_change_rebuilds_image_and_reruns_no_stage(loaded, store, rt, tmp_path) -> None:
    run(loaded, store, rt)
    edited = load(tmp_path, **{"image.pip": ["verl==0.9.1", "sympy"]})
    plan = plan_for(edited, store, rt)
    assert actions(plan) == {"image": "update"}
    result = apply(plan, edited, store, rt)
    assert result.ok and result.result("image").result == "updated"  # type: ignore[union-attr]
    assert rt.executions["image"] == 2 and rt.executions["stage.sft"] == 1


def test_replace_reruns_from_scratch_despite_checkpoints(loaded, store, rt) -> None:
    run(loaded, store, rt)
    result = run(loaded, store, rt, plan_kw={"replace": {"stage.rl"}})
    assert result.ok
    rl_runs = [r for r in rt.runs.values() if r.stage == "rl"]
    assert len(rl_runs) == 2 and rl_runs[1].resume_from is None


# --------------------------------------------------------------------------- deletes


def test_removed_stage_is_forgotten_and_its_data_kept(loaded, store, rt, tmp_path) -> None:
    run(loaded, store, rt)
    edited = load(tmp_path, **{"stages.rl": None, "datasets.rl_data": None})
    plan = plan_for(edited, store, rt)
    assert actions(plan) == {"stage.rl": "delete", "dataset.rl_data": "delete"}
    result = apply(plan, edited, store, rt, prune=True)
    assert result.ok
    assert {r.result for r in result.results if r.action == "delete"} == {"forgotten"}
    state = store.read()
    assert "stage.rl" not in state.nodes and "dataset.rl_data" not in state.nodes  # type: ignore[union-attr]
    assert rt.datasets["rl_data"]  # the data itself is still there


def _drop_volume(tmp_path: Path, protect: bool) -> tuple[LoadedSpec, LoadedSpec]:
    before = load(tmp_path, **{"volumes.scratch": {"mount": "/scratch", "protect": protect}})
    after = load(tmp_path)
    return before, after


@pytest.mark.parametrize("prune", [False, True])
def test_removed_volume_is_deleted_only_with_prune(store, rt, tmp_path, prune) -> None:
    before, after = _drop_volume(tmp_path, protect=False)
    run(before, store, rt)
    result = run(after, store, rt, prune=prune)
    assert result.ok
    assert result.result("volume.scratch").result == ("deleted" if prune else "forgotten")  # type: ignore[union-attr]
    assert ("scratch" in rt.volumes) is (not prune)
    assert "volume.scratch" not in store.read().nodes  # type: ignore[union-attr]


def test_protected_volume_needs_allow_data_loss(store, rt, tmp_path) -> None:
    before, after = _drop_volume(tmp_path, protect=True)
    run(before, store, rt)
    result = run(after, store, rt, prune=True)
    res = result.result("volume.scratch")
    assert res is not None and res.result == "failed" and "--allow-data-loss" in res.message
    assert "scratch" in rt.volumes and "volume.scratch" in store.read().nodes  # type: ignore[union-attr]
    result = run(after, store, rt, prune=True, allow_data_loss=True)
    assert result.result("volume.scratch").result == "deleted"  # type: ignore[union-attr]
    assert "scratch" not in rt.volumes


# --------------------------------------------------------------------------- cancel


def test_cancel_stops_a_running_stage_and_keeps_checkpoints(loaded, store, rt) -> None:
    run(loaded, store, rt, wait=False)
    outcome = cancel("stage.sft", loaded, store, rt)
    assert outcome.recorded
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert rec.status == "cancelled" and rt.runs["run-0"].state == "failed"
    assert rt.checkpoints[("sft", rec.restart_id)]  # nothing deleted
    plan = plan_for(loaded, store, rt)
    assert plan.change("stage.sft").action == "resume"  # type: ignore[union-attr]


def test_cancel_while_an_apply_waits_on_the_run(loaded, store, rt) -> None:
    """The waiting apply holds the lock: cancel stops the run, the apply records its end."""
    outcomes = []

    def cancel_from_another_terminal(seconds: float) -> None:
        if not outcomes:
            outcomes.append(cancel("stage.sft", loaded, store, rt))

    result = run(loaded, store, rt, sleep=cancel_from_another_terminal)
    assert outcomes[0].recorded is False and "records the end" in outcomes[0].message
    assert result.result("stage.sft").result == "failed"  # type: ignore[union-attr]
    assert result.result("stage.rl").message == "skipped because stage.sft failed"  # type: ignore[union-attr]
    assert store.read().nodes["stage.sft"].status == "failed"  # type: ignore[union-attr]
    assert store.lock_info() is None


def test_cancel_refuses_what_is_not_running(loaded, store, rt) -> None:
    run(loaded, store, rt)
    with pytest.raises(TerminalError, match="no running run"):
        cancel("stage.sft", loaded, store, rt)
    with pytest.raises(TerminalError, match="Only stages"):
        cancel("dataset.sft_data", loaded, store, rt)
    assert store.lock_info() is None


def test_calls_are_attributed_to_addresses(loaded, store, rt) -> None:
    run(loaded, store, rt)
    assert {c.address for c in rt.calls if c.method == "prepare_dataset"} == {"dataset.rl_data", "dataset.sft_data"}
    assert all(isinstance(c, Call) for c in rt.calls)
