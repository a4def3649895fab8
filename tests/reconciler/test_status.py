"""Status: sync / health / fingerprint / steps / checkpoint / elapsed / cost per node, from
recorded state plus observation (compute_status is pure: state and Observed are built here)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from reconciler.apply.engine import apply
from reconciler.loader import LoadedSpec
from reconciler.plan import Observed, ObservedNode, ReasonCode
from reconciler.refresh import observe_and_plan
from reconciler.state.base import LockInfo, NodeRecord, OpaqueRun, RunHandle, State, WandbRun
from reconciler.state.memory import MemoryStore
from reconciler.status import NodeStatus, StatusReport, compute_status, render_status
from tests.fakes.memory_runtime import MemoryRuntime
from tests.fakes.pipeline import load


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedSpec:
    return load(tmp_path)


def applied(loaded: LoadedSpec, **kw: object) -> tuple[MemoryStore, MemoryRuntime]:
    store, rt = MemoryStore(), MemoryRuntime()
    _, plan = observe_and_plan(loaded, None, rt)
    apply(plan, loaded, store, rt, sleep=lambda s: None, **kw)  # type: ignore[arg-type]
    return store, rt


def status_of(loaded: LoadedSpec, state: State | None, observed: Observed, now: float = 0.0, **kw: object) -> StatusReport:
    _, plan = observe_and_plan(loaded, state, None)
    return compute_status(plan, loaded.spec, state, observed, now=now, **kw)  # type: ignore[arg-type]


def row(report: StatusReport, address: str) -> NodeStatus:
    return next(n for n in report.nodes if n.address == address)


def test_everything_missing_before_the_first_apply(loaded: LoadedSpec) -> None:
    report = status_of(loaded, None, Observed())
    assert {n.sync for n in report.nodes} == {"missing"}
    assert {n.health for n in report.nodes} == {None}
    assert row(report, "stage.sft").total == 16 and row(report, "stage.sft").step is None
    assert report.serial == 0 and not report.in_sync


def test_after_a_full_apply_everything_is_in_sync_and_healthy(loaded: LoadedSpec) -> None:
    store, rt = applied(loaded)
    state = store.read()
    observed, plan = observe_and_plan(loaded, state, rt)
    assert state is not None
    report = compute_status(plan, loaded.spec, state, observed, now=state.nodes["stage.sft"].finished_at or 0)
    assert report.in_sync and {n.health for n in report.nodes} == {"healthy"}
    sft = row(report, "stage.sft")
    assert sft.fingerprint == state.nodes["stage.sft"].restart_id[:12]
    assert (sft.step, sft.total, sft.latest_checkpoint) == (16, 16, 16)
    assert sft.cost_usd == pytest.approx(4.0)  # 4 s at $1/s (the pipeline's CPU price)
    assert report.cost_usd == pytest.approx(4.0 + 1.0)  # rl: 1 poll
    assert report.serial == state.serial


def running_state(loaded: LoadedSpec) -> State:
    store, _ = applied(loaded, wait=False)
    state = store.read()
    assert state is not None
    return state


def test_running_stage_is_progressing_with_observed_step_and_cost_so_far(loaded: LoadedSpec) -> None:
    state = running_state(loaded)
    started = state.nodes["stage.sft"].run.started_at  # type: ignore[union-attr]
    seen = Observed(nodes={"stage.sft": ObservedNode(run_state="running", step=12, latest_valid_checkpoint=10)})
    report = status_of(loaded, state, seen, now=started + 30)
    sft = row(report, "stage.sft")
    assert (sft.sync, sft.health, sft.step, sft.latest_checkpoint) == ("in sync", "progressing", 12, 10)
    assert sft.elapsed_s == pytest.approx(30)
    assert sft.cost_usd == pytest.approx(30)  # the running attempt so far, at $1/s
    assert row(report, "stage.rl").sync == "missing"


@pytest.mark.parametrize(
    ("run_state", "health", "words"),
    [
        ("lost", "lost", "resumes it"),
        ("failed", "failed", "resumes it"),
        ("succeeded", "progressing", "records its result"),
    ],
)
def test_observed_run_outcome_decides_health(loaded: LoadedSpec, run_state: str, health: str, words: str) -> None:
    state = running_state(loaded)
    seen = Observed(nodes={"stage.sft": ObservedNode(run_state=run_state, step=16)})  # type: ignore[arg-type]
    sft = row(status_of(loaded, state, seen), "stage.sft")
    assert sft.health == health and words in sft.message


@pytest.mark.parametrize(("status", "health"), [("failed", "failed"), ("cancelled", "failed"), ("lost", "lost")])
def test_recorded_outcome_decides_health_without_observation(loaded: LoadedSpec, status: str, health: str) -> None:
    state = running_state(loaded)
    state.nodes["stage.sft"].status = status  # type: ignore[assignment]
    state.nodes["stage.sft"].message = f"it {status}"
    sft = row(status_of(loaded, state, Observed(refreshed=False)), "stage.sft")
    assert (sft.health, sft.sync, sft.message) == (health, "out of sync", f"it {status}")


def test_edits_show_out_of_sync_with_the_plan_reasons(loaded: LoadedSpec, tmp_path: Path) -> None:
    store, _ = applied(loaded)
    edited = load(tmp_path, **{"stages.rl.logging": {"experiment": "renamed"}})
    report = status_of(edited, store.read(), Observed())
    rl = row(report, "stage.rl")
    assert (rl.sync, rl.health, rl.action) == ("out of sync", "healthy", "update")
    assert rl.reason_codes == [ReasonCode.UPDATE_FIELDS_CHANGED]
    assert row(report, "stage.sft").sync == "in sync"


def test_removed_node_is_listed_out_of_sync(loaded: LoadedSpec, tmp_path: Path) -> None:
    store, _ = applied(loaded)
    edited = load(tmp_path, **{"stages.rl": None, "datasets.rl_data": None})
    report = status_of(edited, store.read(), Observed())
    rl = row(report, "stage.rl")
    assert (rl.sync, rl.action, rl.message) == ("out of sync", "delete", "finished at step 3")
    assert report.nodes[-1].address in ("stage.rl", "dataset.rl_data")


def test_invalid_checkpoints_and_lock_are_reported(loaded: LoadedSpec) -> None:
    state = running_state(loaded)
    seen = Observed(nodes={"stage.sft": ObservedNode(
        run_state="running", step=12, latest_valid_checkpoint=5,
        invalid_checkpoints=["global_step_10: missing shard rank 1 of 2"],
    )})
    lock = LockInfo(command="retool apply demo.yaml")
    report = status_of(loaded, state, seen, lock=lock)
    assert row(report, "stage.sft").invalid_checkpoints == ["global_step_10: missing shard rank 1 of 2"]
    assert report.lock is not None and report.lock.id == lock.id
    assert StatusReport.model_validate_json(report.model_dump_json()) == report


def render(report: StatusReport, width: int) -> str:
    buf = io.StringIO()
    render_status(report, Console(file=buf, width=width, color_system=None))
    return buf.getvalue()


def test_render_status_wide_and_narrow(loaded: LoadedSpec) -> None:
    state = running_state(loaded)
    seen = Observed(
        nodes={"stage.sft": ObservedNode(run_state="running", step=12, latest_valid_checkpoint=10,
                                         invalid_checkpoints=["global_step_11: [bold]half[/bold] written"])},
        refreshed=False, notes=["stage.rl: cannot observe"],
    )
    report = status_of(loaded, state, seen, lock=LockInfo(command="retool apply x"))
    wide = render(report, 200)
    assert "not refreshed" in wide and "note: stage.rl: cannot observe" in wide
    assert "locked by" in wide and "retool apply x" in wide
    sft_line = next(line for line in wide.splitlines() if line.startswith("stage.sft"))
    assert "in sync" in sft_line and "progressing" in sft_line and "12/16" in sft_line
    assert "[bold]half[/bold]" in sft_line  # spec and runtime text is never read as markup
    narrow = render(report, 80)
    assert all(len(line) <= 80 for line in narrow.splitlines() if line.startswith(("volume", "stage", "dataset")))
    assert "  stage.sft: running; invalid: global_step_11" in narrow


def test_status_of_a_record_with_no_run_handle(loaded: LoadedSpec) -> None:
    state = State(nodes={"stage.sft": NodeRecord(address="stage.sft", kind="stage", status="pending")})
    sft = row(status_of(loaded, state, Observed()), "stage.sft")
    assert sft.health is None and sft.fingerprint is None and sft.elapsed_s is None
    # A handle alone, without a running status, does not count as progressing.
    state.nodes["stage.sft"].run = RunHandle(ref=OpaqueRun(run_id="x"))
    assert row(status_of(loaded, state, Observed()), "stage.sft").health is None


def test_running_stage_shows_latest_metrics_sparkline_and_wandb_url(loaded: LoadedSpec) -> None:
    state = running_state(loaded)
    seen = Observed(nodes={"stage.sft": ObservedNode(
        run_state="running", step=12,
        metrics={"train/loss": 0.5, "train/grad_norm": 2.0, "train/lr": 1e-05, "perf/mfu": 0.0},
        sparklines={"loss": "█▅▁"}, wandb_url="https://wandb.ai/me/retool/runs/abc123",
    )})
    report = status_of(loaded, state, seen)
    sft = row(report, "stage.sft")
    assert sft.metrics == {"loss": 0.5, "grad_norm": 2.0, "lr": 1e-05}
    assert (sft.sparklines, sft.wandb_url) == ({"loss": "█▅▁"}, "https://wandb.ai/me/retool/runs/abc123")
    assert StatusReport.model_validate_json(report.model_dump_json()) == report  # --json carries them
    text = render(report, 200)
    assert "stage.sft  loss 0.5 █▅▁ · grad_norm 2 · lr 1e-05" in text
    assert "W&B https://wandb.ai/me/retool/runs/abc123" in text
    assert row(report, "stage.rl").metrics == {}


OFFLINE = WandbRun(
    mode="offline", project="retool", group="p", run_id="p-sft-0123456789abcdef",
    run_dirs=["/v/sft/x/wandb/offline-run-20260101_000000-p-sft-0123456789abcdef",
              "/v/sft/x/wandb/offline-run-20260101_010000-p-sft-0123456789abcdef"],
    sync_command="wandb sync /v/sft/x/wandb/offline-run-20260101_000000-p-sft-0123456789abcdef "
                 "/v/sft/x/wandb/offline-run-20260101_010000-p-sft-0123456789abcdef",
)


def test_offline_wandb_run_shows_its_folders_and_the_sync_command(loaded: LoadedSpec) -> None:
    state = running_state(loaded)
    launched = OFFLINE.model_copy(update={"run_dirs": [], "sync_command": None})
    rec = state.nodes["stage.sft"]
    assert rec.run is not None
    rec.run = rec.run.model_copy(update={"wandb": launched})
    # Not observed (no refresh): the run its launch named, nothing written yet.
    unseen = status_of(loaded, state, Observed())
    assert row(unseen, "stage.sft").wandb == launched
    assert "W&B offline run p-sft-0123456789abcdef, nothing written yet" in render(unseen, 200)
    # Observed: its folders, one per segment, and the one command that uploads them in order.
    seen = Observed(nodes={"stage.sft": ObservedNode(run_state="running", step=3, wandb=OFFLINE)})
    report = status_of(loaded, state, seen)
    sft = row(report, "stage.sft")
    assert sft.wandb == OFFLINE and sft.wandb_url is None
    assert StatusReport.model_validate_json(report.model_dump_json()) == report  # --json carries it, typed
    text = render(report, 400)
    assert "W&B offline " + " ".join(OFFLINE.run_dirs) in text
    assert "upload: " + str(OFFLINE.sync_command) in text
    # Finished: what finalize recorded; online with its URL.
    online = OFFLINE.model_copy(update={"mode": "online", "run_dirs": [], "sync_command": None,
                                        "url": "https://wandb.ai/me/retool/runs/p-sft-0123456789abcdef"})
    rec.status, rec.outputs = "succeeded", {"wandb": online.model_dump(mode="json")}
    done = status_of(loaded, state, Observed())
    assert row(done, "stage.sft").wandb == online and row(done, "stage.sft").wandb_url == online.url
    assert f"W&B {online.url}" in render(done, 200)


def test_finished_stage_shows_what_finalize_recorded(loaded: LoadedSpec) -> None:
    store, _ = applied(loaded)
    state = store.read()
    assert state is not None
    state.nodes["stage.rl"].outputs.update(
        final_metrics={"critic/score/mean": -0.5, "response_length/mean": 61.5, "num_turns/mean": 3.0},
        sparklines={"reward": "▁▅█"},
    )
    report = status_of(loaded, state, Observed())
    rl = row(report, "stage.rl")
    assert rl.metrics == {"reward": -0.5, "response_length": 61.5, "tool_calls": 0.5}
    assert rl.sparklines == {"reward": "▁▅█"} and rl.wandb_url is None
    assert "  stage.rl  reward -0.5 ▁▅█ · response_length 61.5 · tool_calls 0.5" in render(report, 200)
    # a stage that finished without metrics shows none (and no metrics section at all)
    assert row(report, "stage.sft").metrics == {} and "\nmetrics\n" in render(report, 200)
    state.nodes["stage.rl"].outputs.pop("final_metrics")
    state.nodes["stage.rl"].outputs.pop("sparklines")
    assert "\nmetrics\n" not in render(status_of(loaded, state, Observed()), 200)
