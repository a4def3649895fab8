"""The spend guard's arithmetic (reconciler/budget.py) through `make_plan`: spent from the
state's records, planned from the plan's estimates, caps, approvals, and the marks.

The spec below prices an H100 at $4/GPU-h: stage.sft runs 10 steps × 360 s on 2 GPUs
(2 GPU-h, $8), stage.rl 5 steps × 720 s on 4 GPUs (4 GPU-h, $16); the plan costs $24.
"""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.budget import (
    BudgetExceededError, approval_problem, approval_record, parse_amount, record_spend, require_approval,
)
from reconciler.errors import TerminalError
from reconciler.plan import Observed, Plan, make_plan
from reconciler.spec import Resources, Spec
from reconciler.state.base import LocalRun, NodeRecord, RunHandle, State
from tests.plan_helpers import succeeded_state

NOW = 1_000_000.0

BASE: dict[str, Any] = {
    "name": "budgeted",
    "pricing": {"gpu_hour_usd": {"H100": 4.0}},
    "volumes": {"data": {"mount": "/data"}, "checkpoints": {"mount": "/ck"}, "models": {"mount": "/m"}},
    "sandbox": {},
    "datasets": {
        "sft_data": {"source": "builtin:tiny_sft", "format": "messages", "options": {"rows": 80}},
        "rl_data": {"source": "builtin:tiny_math", "format": "rl", "options": {"rows": 40}},
    },
    "models": {"base": {"source": "builtin:tiny-qwen2"}},
    "stages": {
        "sft": {
            "kind": "sft", "model": "model.base", "train": "dataset.sft_data", "epochs": 1, "train_batch_size": 8,
            "micro_batch_size_per_gpu": 1, "ulysses_sequence_parallel_size": 1, "seconds_per_step": 360,
            "resources": {"gpu": "H100", "gpus_per_node": 2},
        },
        "rl": {
            "kind": "rl", "model": "stage.sft", "train": "dataset.rl_data", "max_steps": 5, "train_batch_size": 4,
            "ppo_mini_batch_size": 4, "ulysses_sequence_parallel_size": 1, "seconds_per_step": 720,
            "rollout": {"tensor_parallel_size": 1}, "resources": {"gpu": "H100", "gpus_per_node": 4},
        },
    },
}


def spec(budget: dict[str, Any] | None = None, **stage_edits: dict[str, Any]) -> Spec:
    data = {**BASE, "stages": {k: {**v, **stage_edits.get(k, {})} for k, v in BASE["stages"].items()}}
    if budget is not None:
        data["budget"] = budget
    return Spec.model_validate(data)


def plan(s: Spec, state: State | None = None) -> Plan:
    return make_plan(s, state, Observed(refreshed=False), created_at=NOW)


def test_no_budget_no_check() -> None:
    p = plan(spec())
    assert p.budget is None and not p.over_budget
    assert all(not c.over_budget for c in p.changes)


def test_within_budget_counts_spent_plus_planned() -> None:
    p = plan(spec({"usd": 24, "gpu_hours": 6}))
    assert p.budget is not None and not p.over_budget
    line = p.budget.scope("spec")
    assert line is not None
    assert (line.planned_usd, line.planned_gpu_hours, line.spent_usd, line.projected_usd) == (24.0, 6.0, 0.0, 24.0)
    assert p.budget.amount_usd == p.total.usd == 24.0


def test_dollar_cap_marks_the_change_that_crosses_it_and_those_after() -> None:
    p = plan(spec({"usd": 10}))
    assert p.over_budget and p.budget is not None
    assert p.budget.scopes[0].exceeded == ["usd"]
    marked = {c.address: c.over_budget for c in p.changes if c.over_budget}
    assert marked == {"stage.rl": ["spec"]}  # sft ($8) fits under $10; rl takes it to $24


def test_gpu_hour_cap_alone() -> None:
    p = plan(spec({"gpu_hours": 1.5}))
    assert p.budget is not None and p.budget.scopes[0].exceeded == ["gpu_hours"]
    assert [c.address for c in p.changes if c.over_budget] == ["stage.sft", "stage.rl"]


def test_per_stage_cap_marks_only_that_stage() -> None:
    p = plan(spec({"stages": {"rl": {"usd": 15}, "sft": {"gpu_hours": 2}}}))
    assert p.budget is not None
    assert [s.scope for s in p.budget.scopes] == ["stage.rl", "stage.sft"]
    rl, sft = p.budget.scopes
    assert rl.exceeded == ["usd"] and rl.projected_usd == 16.0 and not sft.exceeded  # 2 GPU-h is the cap: not over
    assert {c.address: c.over_budget for c in p.changes if c.over_budget} == {"stage.rl": ["stage.rl"]}


def test_spent_comes_from_the_records_not_the_estimate() -> None:
    s = spec({"usd": 30})
    state = succeeded_state(s)
    # sft really took 3 h on 2 GPUs (6 GPU-h, $24), twice its estimate; then rl is replaced.
    state.nodes["stage.sft"] = state.nodes["stage.sft"].model_copy(
        update={"gpu_seconds": 6 * 3600.0, "cost_usd": 24.0, "spent_gpu_seconds": 6 * 3600.0, "spent_usd": 24.0}
    )
    p = make_plan(s, state, Observed(refreshed=False), replace={"stage.rl"}, created_at=NOW)
    line = p.budget.scope("spec") if p.budget else None
    assert line is not None
    assert (line.spent_usd, line.spent_gpu_hours, line.planned_usd) == (24.0, 6.0, 16.0)
    assert line.exceeded == ["usd"] and p.budget is not None and p.budget.amount_usd == 16.0


def test_record_spend_keeps_reruns_and_counts_the_running_attempt() -> None:
    res = Resources(gpu="H100", gpus_per_node=4)
    old = NodeRecord(address="stage.rl", kind="stage", gpu_seconds=100.0, cost_usd=1.0)  # before the lifetime tally
    assert record_spend(old, res, 16.0, NOW) == (1.0, round(100 / 3600, 4))
    rerun = NodeRecord(address="stage.rl", kind="stage", gpu_seconds=0.0, cost_usd=0.0,
                       spent_gpu_seconds=7200.0, spent_usd=8.0)
    assert record_spend(rerun, res, 16.0, NOW) == (8.0, 2.0)
    running = rerun.model_copy(update={
        "status": "running", "run": RunHandle(ref=LocalRun(pid=1, log_path="/r/log"), started_at=NOW - 1800),
    })
    # half an hour on 4 GPUs at $16/h for the allocation: 2 GPU-h and $8 more
    assert record_spend(running, res, 16.0, NOW) == (16.0, 4.0)
    accounted = running.model_copy(update={"run": running.run.model_copy(update={"accounted_s": 1800.0})})  # type: ignore[union-attr]
    assert record_spend(accounted, res, 16.0, NOW) == (8.0, 2.0)


def test_a_stage_without_an_estimate_exceeds_a_capped_scope() -> None:
    p = plan(spec({"usd": 1000}, rl={"seconds_per_step": None}))
    assert p.budget is not None and p.budget.scopes[0].exceeded == ["unknown cost"]
    assert p.budget.scopes[0].unknown == ["stage.rl"]
    assert [c.address for c in p.changes if c.over_budget] == ["stage.rl"]


def test_an_approved_unpriced_stage_is_not_asked_about_again() -> None:
    s = spec({"usd": 1000}, rl={"seconds_per_step": None})
    first = plan(s)
    assert first.budget is not None
    state = State(spec_name=s.name, cost_approvals=[approval_record(first.budget, by="bob", now=NOW)])
    assert state.cost_approvals[0].unpriced == ["stage.rl"]
    again = plan(s, state)
    assert not again.over_budget and again.budget is not None and again.budget.scopes[0].unknown == []


def test_a_plan_that_adds_nothing_is_not_over_even_when_spend_is() -> None:
    s = spec({"usd": 1})
    state = succeeded_state(s)
    state.nodes["stage.rl"] = state.nodes["stage.rl"].model_copy(update={"spent_usd": 50.0})
    p = plan(s, state)
    assert not p.has_changes and not p.over_budget
    line = p.budget.scope("spec") if p.budget else None
    assert line is not None and line.spent_usd == 50.0


def test_removed_stages_still_count_as_spent() -> None:
    s = spec({"usd": 100})
    state = succeeded_state(s)
    state.nodes["stage.old"] = NodeRecord(address="stage.old", kind="stage", status="succeeded", spent_usd=70.0)
    line = plan(s, state).budget.scope("spec")  # type: ignore[union-attr]
    assert line is not None and line.spent_usd == 70.0


# --------------------------------------------------------------------------- approval


def test_approval_must_name_the_plans_amount_to_the_cent() -> None:
    p = plan(spec({"usd": 10}))
    assert p.budget is not None
    assert "exceeds the budget" in (approval_problem(p.budget, None) or "")
    assert "does not match the plan's estimate $24.00" in (approval_problem(p.budget, 23.99) or "")
    assert approval_problem(p.budget, 24.0) is None
    with pytest.raises(BudgetExceededError) as info:
        require_approval(p.budget, 25.0)
    assert info.value.exit_code == 3 and "--approve-cost 24.00" in info.value.hint
    require_approval(p.budget, 24.0)
    assert approval_problem(plan(spec({"usd": 100})).budget, None) is None  # within budget: nothing to approve


def test_an_approval_raises_the_ceiling_to_what_it_accepted() -> None:
    s = spec({"usd": 10, "stages": {"rl": {"gpu_hours": 1}}})
    first = plan(s)
    assert first.budget is not None and first.over_budget
    state = State(spec_name=s.name, cost_approvals=[approval_record(first.budget, by="alice@ci", now=NOW)])
    approval = state.cost_approvals[0]
    assert approval.usd == 24.0 and approval.projected_usd == {"spec": 24.0}
    assert approval.projected_gpu_hours == {"stage.rl": 4.0}
    again = plan(s, state)
    assert not again.over_budget  # the same projection: approved already
    spec_line = again.budget.scope("spec") if again.budget else None
    assert spec_line is not None and spec_line.ceiling_usd == 24.0
    dearer = plan(spec({"usd": 10, "stages": {"rl": {"gpu_hours": 1}}}, rl={"seconds_per_step": 900}), state)
    assert dearer.over_budget  # the estimate grew past what was approved: asks again
    assert dearer.budget is not None and "$28.00 projected > $24.00 approved" in (approval_problem(dearer.budget, None) or "")


@pytest.mark.parametrize(("text", "value"), [("16000", 16000.0), ("16,000.00", 16000.0), ("$16,000.005", 16000.0),
                                             (" $0 ", 0.0), ("24.5", 24.5)])
def test_parse_amount(text: str, value: float) -> None:
    assert parse_amount(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-5", "nan", "inf", "1e400"])
def test_parse_amount_refuses_what_is_not_an_amount(text: str) -> None:
    with pytest.raises(TerminalError, match="is not an amount"):
        parse_amount(text)


def test_the_budget_travels_with_a_plans_json() -> None:
    p = plan(spec({"usd": 10}))
    again = Plan.from_json(p.to_json())
    assert again.budget == p.budget and again.over_budget
    assert [c.over_budget for c in again.changes] == [c.over_budget for c in p.changes]
