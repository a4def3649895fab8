"""make_plan's decision table on a small inline spec, plus the views (docs/architecture.md,
"Test each layer at its own level")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.errors import TerminalError
from reconciler.plan import Observed, ObservedNode, Plan, PlannedChange, ReasonCode as R, make_plan
from reconciler.state.base import NodeRecord, State
from reconciler.cli.plan_view import plan_markdown, plan_text
from tests.plan_helpers import QWEN, REPO, observed_at_end, spec_from, succeeded_state

#   volume.data ─> dataset.d (1000 rows) ─┬──────────┐
#   volume.models ─> model.m ───────────> stage.a ─> stage.b
#   image ··> sandbox ··························┘ (rl)
TOY = """\
name: toy
image: {base: "python:3.12-slim"}
volumes: {data: {mount: /data}, models: {mount: /models, protect: true}, checkpoints: {mount: /ckpt}}
sandbox: {}
datasets: {d: {source: "builtin:tiny_math", format: rl, expected_rows: 1000}}
models: {m: {source: "builtin:tiny-qwen2"}}
stages:
  a:
    kind: sft
    model: model.m
    train: dataset.d
    train_batch_size: 10
    epochs: 2
    ulysses_sequence_parallel_size: 1
    resources: {gpu: H100, gpus_per_node: 2, timeout_hours: 1.5}
    seconds_per_step: 36
  b:
    kind: rl
    model: stage.a
    train: dataset.d
    train_batch_size: 10
    ppo_mini_batch_size: 10
    max_steps: 50
    resources: {gpu: A100, gpus_per_node: 1}
    seconds_per_step: 72
"""
SPEC = spec_from(TOY)


def edited(old: str, new: str) -> str:
    assert TOY.count(old) == 1, old
    return TOY.replace(old, new)


def plan_for(text: str = TOY, state: State | None = None, observed: Observed | None = None, **kw: object) -> Plan:
    return make_plan(spec_from(text), state, observed or Observed(), spec_path="toy.yaml", created_at=0.0, **kw)


def actions(plan: Plan) -> dict[str, str]:
    return {c.address: c.action for c in plan.changes if c.action != "no-op"}


def with_record(state: State, address: str, **update: object) -> State:
    state = state.model_copy(deep=True)
    state.nodes[address] = state.nodes[address].model_copy(update=update)
    return state


@pytest.fixture()
def done() -> State:
    return succeeded_state(SPEC)


# --------------------------------------------------------------------------- create and estimates


def test_without_state_everything_is_created_with_estimates() -> None:
    plan = plan_for()
    assert {c.action for c in plan.changes} == {"create"}
    assert [c.address for c in plan.changes][-2:] == ["stage.a", "stage.b"]
    a = plan.change("stage.a")
    assert a is not None and a.total_steps == 200  # 1000 // 10 * 2 epochs
    assert a.estimate.steps == 200 and a.estimate.source == "spec"
    assert a.estimate.gpu_hours == pytest.approx(4.0)  # 200 * 36 s = 2 h on 2 GPUs
    assert a.estimate.usd == pytest.approx(4.0 * 3.95)
    assert a.estimate.segments == 2  # 2 h wall in attempts of 1.5 h
    b = plan.change("stage.b")
    assert b is not None and b.total_steps == 50  # capped by max_steps
    assert b.estimate.gpu_hours == pytest.approx(1.0) and b.estimate.usd == pytest.approx(2.10)
    assert plan.total.gpu_hours == pytest.approx(5.0) and plan.total.usd == pytest.approx(15.80 + 2.10)
    assert plan.serial == 0 and plan.has_changes


def test_measured_seconds_per_step_beat_the_spec(done: State) -> None:
    state = with_record(done, "stage.a", seconds_per_step=18.0)
    plan = plan_for(edited("epochs: 2", "epochs: 3"), state, observed_at_end(state))
    a = plan.change("stage.a")
    assert a is not None and a.action == "resume" and a.resume_from == 200
    assert a.estimate.source == "measured" and a.estimate.steps == 100
    assert a.estimate.gpu_hours == pytest.approx(100 * 18 * 2 / 3600)


def test_recorded_rows_beat_expected_rows(done: State) -> None:
    state = with_record(done, "dataset.d", outputs={**done.nodes["dataset.d"].outputs, "rows": 500})
    state = with_record(state, "stage.a", steps_done=100, outputs={"final_step": 100})
    plan = plan_for(edited("epochs: 2", "epochs: 4"), state, observed_at_end(state))
    a = plan.change("stage.a")
    assert a is not None and a.total_steps == 200 and a.resume_from == 100


def test_unknown_rows_and_no_cap_leave_steps_unknown() -> None:
    plan = plan_for(edited(", expected_rows: 1000", ""))
    a = plan.change("stage.a")
    assert a is not None and a.total_steps is None and a.estimate.steps == 0
    assert any("steps unknown until dataset.d is prepared" in n for n in a.notes)
    b = plan.change("stage.b")
    assert b is not None and b.total_steps == 50  # max_steps alone bounds it


# --------------------------------------------------------------------------- the decision table


def test_nothing_changed_is_all_no_op(done: State) -> None:
    plan = plan_for(TOY, done, observed_at_end(done))
    assert actions(plan) == {} and not plan.has_changes
    assert plan.total.gpu_hours == 0 and plan.serial == 7 and plan.lineage == "lineage-test"


def test_restart_field_reruns_the_stage_and_everything_downstream(done: State) -> None:
    plan = plan_for(edited("seconds_per_step: 36", "seconds_per_step: 36\n    seed: 7"), done, observed_at_end(done))
    assert actions(plan) == {"stage.a": "rerun", "stage.b": "rerun"}
    a, b = plan.change("stage.a"), plan.change("stage.b")
    assert a is not None and b is not None
    assert a.reason_codes == [R.RESTART_FIELDS_CHANGED] and a.diff == ["stages.a.seed: 42 → 7 (restart)"]
    assert a.discard_steps == 200 and a.discard_gpu_hours == pytest.approx(4.0)
    assert b.reason_codes == [R.INPUT_CHANGES] and b.discard_steps == 50


def test_replace_forces_a_rerun(done: State) -> None:
    plan = plan_for(TOY, done, observed_at_end(done), replace={"stage.b"})
    assert actions(plan) == {"stage.b": "rerun"}
    b = plan.change("stage.b")
    assert b is not None and b.reason_codes == [R.REPLACE_REQUESTED] and b.discard_steps == 50
    with pytest.raises(TerminalError, match="--replace: unknown address stage.nope"):
        plan_for(TOY, done, replace={"stage.nope"})


def test_resume_below_the_reached_step_is_a_no_op_with_a_note(done: State) -> None:
    plan = plan_for(edited("max_steps: 50", "max_steps: 30"), done, observed_at_end(done))
    b = plan.change("stage.b")
    assert b is not None and b.action == "no-op" and b.reason_codes == [R.RESUME_FIELDS_CHANGED]
    assert b.notes == ["already at step 50: the new total 30 needs no more steps"]


def test_resume_without_a_valid_checkpoint_reruns(done: State) -> None:
    observed = Observed(nodes={"stage.b": ObservedNode(run_state="succeeded", invalid_checkpoints=["global_step_50: missing shard rank 0 of 1"])})
    plan = plan_for(edited("max_steps: 50", "max_steps: 80"), done, observed)
    b = plan.change("stage.b")
    assert b is not None and b.action == "rerun"
    assert b.reason_codes == [R.RESUME_FIELDS_CHANGED, R.NO_VALID_CHECKPOINT]
    assert "invalid checkpoint global_step_50: missing shard rank 0 of 1 (not resumed from)" in b.notes


def test_without_refresh_resume_trusts_the_record_and_says_so(done: State) -> None:
    plan = plan_for(edited("max_steps: 50", "max_steps: 80"), done, Observed(refreshed=False))
    b = plan.change("stage.b")
    assert b is not None and b.action == "resume" and b.resume_from == 50 and b.estimate.steps == 30
    assert b.reason_codes == [R.RESUME_FIELDS_CHANGED]
    assert "checkpoint not verified (plan made without refreshing)" in b.notes
    assert any(w.startswith("not refreshed") for w in plan.warnings) and not plan.refreshed


def test_update_fields_update_in_place(done: State) -> None:
    plan = plan_for(edited("seconds_per_step: 72", "seconds_per_step: 72\n    test_freq: 5"), done, observed_at_end(done))
    assert actions(plan) == {"stage.b": "update"}
    b = plan.change("stage.b")
    assert b is not None and b.diff == ["stages.b.test_freq: 10 → 5 (update)"] and b.estimate.steps == 0
    assert b.reason_codes == [R.UPDATE_FIELDS_CHANGED]


def test_failed_run_resumes_from_its_latest_valid_checkpoint(done: State) -> None:
    state = with_record(done, "stage.a", status="failed", steps_done=120, message="CUDA error")
    observed = Observed(nodes={"stage.a": ObservedNode(run_state="failed", latest_valid_checkpoint=100)})
    plan = plan_for(TOY, state, observed)
    a = plan.change("stage.a")
    assert a is not None and a.action == "resume" and a.resume_from == 100
    assert a.reason_codes == [R.RUN_FAILED] and a.estimate.steps == 100
    assert a.reasons == ["last run failed: CUDA error"]  # the run's own message reaches the reader
    assert actions(plan) == {"stage.a": "resume", "stage.b": "rerun"}


def test_lost_run_without_checkpoint_reruns(done: State) -> None:
    state = with_record(done, "stage.a", status="lost", steps_done=30)
    observed = Observed(nodes={"stage.a": ObservedNode(run_state="lost")})
    a = plan_for(TOY, state, observed).change("stage.a")
    assert a is not None and a.action == "rerun" and a.discard_steps == 30
    assert a.reason_codes == [R.RUN_LOST, R.NO_VALID_CHECKPOINT]


def test_failed_dataset_is_prepared_again(done: State) -> None:
    state = with_record(done, "dataset.d", status="failed", message="HTTP 503")
    plan = plan_for(TOY, state, observed_at_end(state))
    assert actions(plan) == {"dataset.d": "create", "stage.a": "rerun", "stage.b": "rerun"}
    assert plan.change("dataset.d").reason_codes == [R.RUN_FAILED]  # type: ignore[union-attr]


def test_running_is_a_no_op_that_apply_reattaches_to(done: State) -> None:
    state = with_record(done, "stage.a", status="running", steps_done=80)
    observed = Observed(nodes={"stage.a": ObservedNode(run_state="running", step=90)})
    plan = plan_for(edited("epochs: 2", "epochs: 3"), state, observed)
    a = plan.change("stage.a")
    assert a is not None and a.action == "no-op" and a.reason_codes == [R.RUNNING]
    assert a.reasons == ["running (step 90)"]  # the step the backend observed, not the recorded 80
    assert a.notes == ["apply re-attaches to it", "the other changes are planned once it finishes"]
    # its consumer will see a new output once it finishes
    b = plan.change("stage.b")
    assert b is not None and b.action == "rerun" and b.reason_codes == [R.INPUT_CHANGES]


def test_run_that_finished_unwatched_is_recorded_by_apply(done: State) -> None:
    state = with_record(done, "stage.a", status="running", steps_done=150)
    observed = Observed(nodes={"stage.a": ObservedNode(run_state="succeeded", step=200, latest_valid_checkpoint=200)})
    plan = plan_for(TOY, state, observed)
    a = plan.change("stage.a")
    assert a is not None and a.action == "no-op" and a.notes == ["apply records its result"]
    assert a.reason_codes == [R.FINISHED_UNRECORDED]
    assert plan.change("stage.b").action == "rerun"  # type: ignore[union-attr]  # its input is a new final step


def test_running_with_a_restart_change_is_rerun_after_cancelling(done: State) -> None:
    state = with_record(done, "stage.b", status="running", steps_done=10)
    plan = plan_for(edited("ppo_mini_batch_size: 10", "ppo_mini_batch_size: 5"), state, Observed())
    b = plan.change("stage.b")
    assert b is not None and b.action == "rerun" and b.notes == ["cancels the running attempt first"]
    assert b.reason_codes == [R.RESTART_FIELDS_CHANGED]


def test_vanished_node_is_created_again(done: State) -> None:
    observed = Observed(nodes={"dataset.d": ObservedNode(exists=False)})
    plan = plan_for(TOY, done, observed)
    d = plan.change("dataset.d")
    assert d is not None and d.action == "create" and d.reason_codes == [R.GONE]
    assert actions(plan)["stage.a"] == "rerun"


def test_dataset_change_reruns_its_consumers(done: State) -> None:
    plan = plan_for(edited("expected_rows: 1000}", "expected_rows: 1000, max_rows: 500}"), done, observed_at_end(done))
    assert actions(plan) == {"dataset.d": "rerun", "stage.a": "rerun", "stage.b": "rerun"}
    assert plan.change("stage.a").reason_codes == [R.INPUT_CHANGES]  # type: ignore[union-attr]
    assert plan.change("stage.a").total_steps == 100  # type: ignore[union-attr]  # rows from the spec, capped


def test_input_changed_since_the_consumer_last_ran(done: State) -> None:
    # a targeted apply re-prepared the dataset (new digest) without rerunning the stages
    outputs = {**done.nodes["dataset.d"].outputs, "digest": "new"}
    from reconciler.fingerprint import output_id

    state = with_record(done, "dataset.d", outputs=outputs, output_id=output_id(done.nodes["dataset.d"].restart_id, outputs))
    plan = plan_for(TOY, state, observed_at_end(state))
    assert plan.change("stage.a").reason_codes == [R.INPUT_CHANGED]  # type: ignore[union-attr]


def test_sandbox_and_image_changes_never_rerun_stages(done: State) -> None:
    text = edited('base: "python:3.12-slim"', 'base: "python:3.12-slim", apt: [git]').replace("sandbox: {}", "sandbox: {workers: 4}")
    plan = plan_for(text, done, observed_at_end(done))
    assert actions(plan) == {"image": "update", "sandbox": "update"}


def test_removed_nodes_are_deleted_last_and_data_is_kept(done: State) -> None:
    text = edited("  b:\n", "  x:\n").replace("models: {mount: /models, protect: true}, ", "")
    text = text.replace('models: {m: {source: "builtin:tiny-qwen2"}}', 'models: {m: {source: "builtin:tiny-qwen2", volume: data}}')
    plan = plan_for(text, done, observed_at_end(done))
    deletes = [c for c in plan.changes if c.action == "delete"]
    assert [c.address for c in deletes] == ["stage.b", "volume.models"]
    assert all(c.reason_codes == [R.REMOVED_FROM_SPEC] for c in deletes)
    assert plan.changes[-2:] == deletes
    assert deletes[0].notes == ["record forgotten; its files stay on volume.checkpoints (--prune deletes volumes only)"]
    assert deletes[1].notes == ["protected volume: kept even with --prune unless --allow-data-loss"]
    assert actions(plan)["stage.x"] == "create" and actions(plan)["model.m"] == "rerun"


def test_blocked_nodes_block_what_needs_them(done: State) -> None:
    plan = plan_for(TOY, None, Observed(), blocked={"sandbox": "placement `service` needs the modal backend"})
    assert actions(plan)["sandbox"] == "blocked" and actions(plan)["stage.b"] == "blocked"
    b = plan.change("stage.b")
    assert b is not None and b.reason_codes == [R.UPSTREAM_BLOCKED]
    assert plan.change("sandbox").reason_codes == [R.BACKEND_CANNOT_RUN]  # type: ignore[union-attr]
    assert b.notes[0] == "would create: not yet created"  # what it would do, in words
    assert plan.total.gpu_hours == pytest.approx(4.0)  # only stage.a runs
    # a blocked node that has nothing to do stays a no-op
    calm = plan_for(TOY, done, observed_at_end(done), blocked={"stage.b": "no GPU"})
    assert actions(calm) == {}


def test_targets_scope_the_plan_to_their_dependencies(done: State) -> None:
    plan = plan_for(TOY, None, Observed(), targets={"stage.a"})
    assert {c.address for c in plan.changes} == {
        "volume.data", "volume.models", "volume.checkpoints", "image", "dataset.d", "model.m", "stage.a"
    }
    with pytest.raises(TerminalError, match="--target: unknown address stage.c"):
        plan_for(TOY, None, targets={"stage.c"})


def test_the_core_plan_has_no_image_opinions() -> None:
    # Image checks belong to the backend that builds images (Modal: tests/runtime/modal/
    # test_modal_apply.py::test_the_plan_warns_about_a_mutable_image_tag); the local backend builds none.
    assert plan_for(TOY).warnings == []
    assert plan_for(edited('"python:3.12-slim"', '"python:latest"')).warnings == []


def test_every_reason_has_its_code_and_a_change_without_one_is_refused(done: State) -> None:
    plan = plan_for(edited("epochs: 2", "epochs: 3"), None, Observed())
    assert all(len(c.reasons) == len(c.reason_codes) for c in plan.changes)
    assert {r.code for c in plan.changes for r in c.why} == {R.NOT_CREATED}
    with pytest.raises(ValueError, match="0 reason code"):
        PlannedChange(address="stage.a", action="create", reasons=["not yet created"])


def test_plan_is_pure(done: State) -> None:
    before = done.model_dump_json()
    first = plan_for(edited("epochs: 2", "epochs: 3"), done, observed_at_end(done))
    second = plan_for(edited("epochs: 2", "epochs: 3"), done, observed_at_end(done))
    assert done.model_dump_json() == before and first == second


# --------------------------------------------------------------------------- views


def test_json_round_trips_and_has_the_documented_shape(done: State) -> None:
    plan = plan_for(edited("epochs: 2", "epochs: 3"), done, observed_at_end(done))
    data = json.loads(plan.to_json())
    assert {"spec", "serial", "changes", "total", "warnings", "has_changes", "summary"} <= set(data)
    change = next(c for c in data["changes"] if c["address"] == "stage.a")
    assert {"address", "action", "reasons", "reason_codes", "diff", "resume_from", "estimate", "fingerprints"} <= set(change)
    assert change["action"] == "resume" and change["resume_from"] == 200
    assert change["reason_codes"] == ["resume_fields_changed"] and len(change["reasons"]) == 1
    assert Plan.from_json(plan.to_json()) == plan
    assert data["summary"] == {"no-op": 7, "resume": 1, "rerun": 1}
    assert Plan.from_json(plan.to_json()) == plan


GOLDEN = Path(__file__).parent / "golden"


def golden_plans() -> dict[str, Plan]:
    text = QWEN.read_text()
    spec = spec_from(text)
    state = succeeded_state(spec)
    state.nodes["stage.old"] = NodeRecord(address="stage.old", kind="stage", status="succeeded", steps_done=10)
    observed = observed_at_end(state)
    mixed = (
        text.replace("epochs: 6", "epochs: 8")
        .replace("- flash-attn==2.8.3", "- flash-attn==2.8.3\n    - numpy")
        .replace("  aime_2025:\n", "  gsm8k:\n    source: hf:openai/gsm8k\n    format: rl\n  aime_2025:\n")
    )
    rerun = text.replace("lr: 1.0e-5,", "lr: 2.0e-5,").replace("experiment: qwen7b-sft", "experiment: qwen7b-sft-lr2")
    blocked = {"stage.dapo": "needs 8 H100s; this backend sees no GPU"}
    return {
        "plan_mixed": make_plan(spec_from(mixed), state, observed, blocked=blocked, spec_path="specs/retool-qwen7b.yaml", created_at=0.0),
        "plan_rerun": make_plan(spec_from(rerun), succeeded_state(spec), observed, spec_path="specs/retool-qwen7b.yaml", created_at=0.0),
        "plan_create": make_plan(spec, None, Observed(), spec_path="specs/retool-qwen7b.yaml", created_at=0.0),
    }


@pytest.mark.parametrize("name", ["plan_mixed", "plan_rerun", "plan_create"])
@pytest.mark.parametrize("fmt", ["txt", "md"])
def test_golden_renderings(name: str, fmt: str) -> None:
    plan = golden_plans()[name]
    rendered = plan_text(plan, width=100) if fmt == "txt" else plan_markdown(plan)
    path = GOLDEN / f"{name}.{fmt}"
    if os.environ.get("RETOOL_UPDATE_GOLDEN"):
        path.write_text(rendered, encoding="utf-8")
    assert rendered == path.read_text(encoding="utf-8"), f"{path} differs (RETOOL_UPDATE_GOLDEN=1 rewrites it)"


def test_text_view_escapes_markup_and_has_no_colour() -> None:
    plan = golden_plans()["plan_mixed"]
    text = plan_text(plan)
    assert "image.pip[2]: (absent) → numpy (update)" in text and "\x1b[" not in text
    assert all(line == line.rstrip() for line in text.splitlines())


# --------------------------------------------------------------------------- start-up cost


HEAVY = "{'torch', 'verl', 'ray', 'modal', 'transformers', 'datasets', 'pandas', 'numpy'}"


@pytest.mark.parametrize("with_changes", [False, True], ids=["fresh", "field-diffs"])
def test_plan_path_imports_no_training_stack(with_changes: bool) -> None:
    """`retool plan` must start fast: none of the training stack, and no deepdiff at all
    unless some node's config changed (then deepdiff without numpy/pandas)."""
    code = (
        "import sys\n"
        "import reconciler.loader, reconciler.graph, reconciler.plan, reconciler.cli.plan_view\n"
        "from reconciler.loader import parse_spec_text\n"
        "from reconciler.plan import Observed, make_plan\n"
        "from reconciler.cli.plan_view import plan_text\n"
        "from tests.plan_helpers import succeeded_state\n"
        f"text = open({str(QWEN)!r}).read()\n"
        f"state = succeeded_state(parse_spec_text(text)) if {with_changes} else None\n"
        "spec = parse_spec_text(text.replace('lr: 1.0e-5,', 'lr: 2.0e-5,'))\n"
        "plan_text(make_plan(spec, state, Observed()))\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}} & {HEAVY}))\n"
        "print('deepdiff' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", str(with_changes)]


# --------------------------------------------------------------------------- state ownership


def test_a_state_recorded_by_another_spec_is_refused(done: State) -> None:
    foreign = done.model_copy(update={"spec_name": "someone-else"})
    with pytest.raises(TerminalError, match="belongs to spec 'someone-else'") as info:
        plan_for(state=foreign)
    assert "state: {key: someone-else}" in info.value.hint
    own = done.model_copy(update={"spec_name": spec_from(TOY).name})
    assert actions(plan_for(state=own)) == {}
    renamed = TOY.replace(f"name: {spec_from(TOY).name}\n", f"name: renamed\nstate: {{key: {spec_from(TOY).name}}}\n", 1)
    assert actions(plan_for(renamed, state=own)) == {}  # a renamed spec keeps its state through state.key


def test_the_reason_codes_doc_lists_every_code_once() -> None:
    doc = (REPO / "docs" / "plan-reasons.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(code.value for code in R) and len(rows) == len(set(rows))
