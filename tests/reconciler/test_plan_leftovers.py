"""Two plan behaviours around stages that stopped early or left checkpoints behind:
a cancelled run that never logged a step plans `rerun` (it existed: it is not `create`), and
invalid / foreign checkpoints are noted in the plan that starts the stage, not on every plan
that leaves it alone (`retool status` lists them every time)."""

from __future__ import annotations

from pathlib import Path

from reconciler.apply.engine import apply, cancel
from reconciler.loader import LoadedSpec
from reconciler.plan import ReasonCode
from reconciler.refresh import observe_and_plan, refresh_and_plan
from reconciler.state.memory import MemoryStore
from reconciler.status import compute_status
from tests.fakes.memory_runtime import MemoryRuntime
from tests.fakes.pipeline import load


def apply_plan(loaded: LoadedSpec, store: MemoryStore, rt: MemoryRuntime, **kw: object) -> None:
    plan = refresh_and_plan(loaded, store.read(), rt)
    apply(plan, loaded, store, rt, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


def test_cancel_before_the_first_step_plans_a_rerun_not_a_create(tmp_path: Path) -> None:
    loaded, store, rt = load(tmp_path), MemoryStore(), MemoryRuntime(steps_per_poll=0)
    apply_plan(loaded, store, rt, wait=False)
    assert store.read().nodes["stage.sft"].status == "running"  # type: ignore[union-attr]
    assert cancel("stage.sft", loaded, store, rt).recorded
    rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
    assert (rec.status, rec.steps_done) == ("cancelled", 0) and not rt.checkpoints
    change = refresh_and_plan(loaded, store.read(), rt).change("stage.sft")
    assert change is not None and change.action == "rerun" and change.resume_from is None
    assert change.reason_codes == [ReasonCode.RUN_CANCELLED, ReasonCode.NO_STEP_REACHED]
    assert change.discard_steps == 0


def test_a_stage_recorded_but_never_launched_is_still_created(tmp_path: Path) -> None:
    loaded, store, rt = load(tmp_path), MemoryStore(), MemoryRuntime()
    apply_plan(loaded, store, rt)
    state = store.read()
    assert state is not None
    rec = state.nodes["stage.rl"]
    rec.status, rec.run, rec.steps_done, rec.outputs = "failed", None, 0, {}
    rt.checkpoints.pop(("rl", rec.restart_id))
    state.serial += 1
    store.write(state)
    change = refresh_and_plan(loaded, store.read(), rt).change("stage.rl")
    assert change is not None and change.action == "create"


def test_a_foreign_checkpoint_is_noted_when_the_stage_starts_not_on_every_plan(tmp_path: Path) -> None:
    loaded, store, rt = load(tmp_path), MemoryStore(), MemoryRuntime()
    rt.checkpoints[("sft", "f" * 64)] = {20: (True, "")}  # an earlier restart identity's, left on the volume
    apply_plan(loaded, store, rt)
    note = "invalid checkpoint global_step_20: written under another restart identity (not resumed from)"
    sft = refresh_and_plan(loaded, store.read(), rt).change("stage.sft")
    assert sft is not None and sft.action == "no-op" and note not in sft.notes  # the finished stage: quiet
    edited = load(tmp_path, **{"stages.sft.epochs": 4})
    sft = refresh_and_plan(edited, store.read(), rt).change("stage.sft")
    assert sft is not None and sft.action == "resume" and note in sft.notes  # starting again: it matters
    apply_plan(edited, store, rt)
    state = store.read()
    sft = refresh_and_plan(edited, state, rt).change("stage.sft")
    assert sft is not None and sft.action == "no-op" and note not in sft.notes
    observed, plan = observe_and_plan(edited, state, rt)
    row = next(n for n in compute_status(plan, edited.spec, state, observed).nodes if n.address == "stage.sft")
    assert row.invalid_checkpoints == ["global_step_20: written under another restart identity"]  # status: always
