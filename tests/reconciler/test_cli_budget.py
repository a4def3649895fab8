"""The spend guard through the CLI (CliRunner, in-memory runtime, real local state store).

The pipeline spec (tests/fakes/pipeline.py) is CPU-only at $1 per second of run time:
its plan costs $122.00 (stage.sft $32, stage.rl $90)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from reconciler.backends import set_runtime_override
from reconciler.cli.main import EXIT_CHANGES, EXIT_NO_CHANGES, EXIT_OVER_BUDGET, app
from reconciler.state.local import LocalStore
from tests.fakes.memory_runtime import MemoryRuntime
from tests.fakes.pipeline import spec_dict, write_spec


@pytest.fixture
def rt() -> Iterator[MemoryRuntime]:
    runtime = MemoryRuntime()
    set_runtime_override(lambda spec, state_dir: runtime)
    yield runtime
    set_runtime_override(None)


def invoke(*args: Any, input: str | None = None) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], input=input, env={"COLUMNS": "200"}, catch_exceptions=False)


def budgeted(tmp_path: Path, budget: dict[str, Any]) -> Path:
    return write_spec(tmp_path, spec_dict(budget=budget))


READ_ONLY = frozenset({"blocked_reason", "discover_checkpoints", "poll_stage"})


def changed(rt: MemoryRuntime) -> list[str]:
    """The runtime calls that change something (the plan's refresh only reads)."""
    return [f"{c.method} {c.address}" for c in rt.calls if c.method not in READ_ONLY]


def state_of(spec: Path) -> Any:
    return LocalStore(spec.parent / ".retool").read()


def test_plan_exit_codes_within_and_over_budget(tmp_path: Path, rt: MemoryRuntime) -> None:
    within = budgeted(tmp_path / "a", {"usd": 200})
    assert invoke("plan", within, "--detailed-exitcode").exit_code == EXIT_CHANGES
    over = budgeted(tmp_path / "b", {"usd": 100, "stages": {"rl": {"usd": 95}}})
    result = invoke("plan", over, "--detailed-exitcode")
    assert result.exit_code == EXIT_OVER_BUDGET == 3
    out = result.stdout
    assert "Budget for the spec: spent $0.00 + plan $122.00 = $122.00 of $100.00 — OVER" in out
    assert "Budget for stage.rl: spent $0.00 + plan $90.00 = $90.00 of $95.00 — within" in out
    assert "over budget: the spec" in out  # marked under stage.rl, the change that crosses the cap
    assert "`retool apply --approve-cost 122.00`" in out
    data = json.loads(invoke("plan", over, "--json").stdout)
    assert data["budget"]["amount_usd"] == 122.0 and data["budget"]["scopes"][0]["exceeded"] == ["usd"]
    assert {c["address"]: c["over_budget"] for c in data["changes"] if c["over_budget"]} == {"stage.rl": ["spec"]}
    markdown = invoke("plan", over, "--format", "markdown").stdout
    assert "**Over budget** · cost of this plan **$122.00**" in markdown and "create **over budget**" in markdown


def test_apply_refuses_until_the_exact_amount_is_approved(tmp_path: Path, rt: MemoryRuntime) -> None:
    spec = budgeted(tmp_path, {"usd": 100})
    refused = invoke("apply", spec, "--yes")
    assert refused.exit_code == 3
    assert "error: Over budget: nothing was applied" in refused.stderr
    assert "--approve-cost 122.00" in refused.stderr and "Traceback" not in refused.stderr
    assert state_of(spec) is None and not changed(rt)  # nothing ran, nothing recorded

    wrong = invoke("apply", spec, "--yes", "--approve-cost", "120")
    assert wrong.exit_code == 3 and "--approve-cost $120.00 does not match the plan's estimate $122.00" in wrong.stderr
    assert state_of(spec) is None

    bad = invoke("apply", spec, "--yes", "--approve-cost", "lots")
    assert bad.exit_code == 1 and "is not an amount" in bad.stderr

    done = invoke("apply", spec, "--yes", "--approve-cost", "$122.00")
    assert done.exit_code == 0, done.stderr
    state = state_of(spec)
    assert state.nodes["stage.rl"].status == "succeeded"
    assert [(a.usd, a.projected_usd) for a in state.cost_approvals] == [(122.0, {"spec": 122.0})]
    assert invoke("plan", spec, "--detailed-exitcode").exit_code == EXIT_NO_CHANGES


def test_an_approved_pipeline_continues_without_asking_again(tmp_path: Path, rt: MemoryRuntime) -> None:
    """--no-wait launches sft and returns; the next apply (the GitOps schedule) finishes it
    and starts rl, all within what was approved."""
    spec = budgeted(tmp_path, {"usd": 100})
    assert invoke("apply", spec, "--yes", "--no-wait", "--approve-cost", "122").exit_code == 0
    assert state_of(spec).nodes["stage.sft"].status == "running"
    follow = invoke("apply", spec, "--yes")
    assert follow.exit_code == 0, follow.stdout + follow.stderr
    assert state_of(spec).nodes["stage.rl"].status == "succeeded"


def test_raising_an_estimate_after_approval_asks_again(tmp_path: Path, rt: MemoryRuntime) -> None:
    spec = budgeted(tmp_path, {"usd": 100, "stages": {"rl": {"usd": 80}}})
    assert invoke("apply", spec, "--yes", "--no-wait", "--approve-cost", "122").exit_code == 0
    data = spec_dict(budget={"usd": 100, "stages": {"rl": {"usd": 80}}}, **{"stages.rl.seconds_per_step": 40})
    write_spec(tmp_path, data)  # rl now estimated at $120: beyond the $90 approved for it
    result = invoke("apply", spec, "--yes")
    assert result.exit_code == 3 and "stage.rl: $120.00 projected > $90.00 approved" in result.stderr


def test_a_saved_plan_carries_its_cost(tmp_path: Path, rt: MemoryRuntime) -> None:
    spec = budgeted(tmp_path, {"gpu_hours": 1, "usd": 50})
    saved = tmp_path / "plan.json"
    assert invoke("plan", spec, "--out", saved, "--detailed-exitcode").exit_code == 3
    assert json.loads(saved.read_text())["budget"]["amount_usd"] == 122.0
    refused = invoke("apply", saved)
    assert refused.exit_code == 3 and "--approve-cost 122.00" in refused.stderr
    assert state_of(spec) is None
    done = invoke("apply", saved, "--approve-cost", "122.00")
    assert done.exit_code == 0, done.stderr


def test_status_shows_measured_spend_against_the_budget(tmp_path: Path, rt: MemoryRuntime) -> None:
    spec = budgeted(tmp_path, {"usd": 1000, "stages": {"sft": {"usd": 40}}})
    assert invoke("apply", spec, "--yes").exit_code == 0
    state = state_of(spec)
    spent = {a: r.spent_usd for a, r in state.nodes.items() if r.kind == "stage"}
    assert spent["stage.sft"] > 0 and spent["stage.rl"] > 0  # the runtime's elapsed seconds at $1/s
    assert spent["stage.sft"] != 32.0  # measured, not the $32 estimate
    report = json.loads(invoke("status", spec, "--json").stdout)
    lines = {b["scope"]: b for b in report["budget"]}
    assert lines["spec"]["spent_usd"] == round(sum(spent.values()), 2) and lines["spec"]["limit_usd"] == 1000
    assert lines["stage.sft"]["spent_usd"] == round(spent["stage.sft"], 2)
    assert lines["stage.sft"]["over"] is (spent["stage.sft"] > 40)
    text = invoke("status", spec).stdout
    assert f"budget spec: spent ${sum(spent.values()):,.2f} of $1,000.00" in text


def test_a_rerun_keeps_what_the_old_run_spent(tmp_path: Path, rt: MemoryRuntime) -> None:
    spec = budgeted(tmp_path, {"usd": 10_000})
    assert invoke("apply", spec, "--yes").exit_code == 0
    first = state_of(spec).nodes["stage.sft"]
    assert first.spent_usd == first.cost_usd > 0 and first.spent_gpu_seconds == first.gpu_seconds
    assert invoke("apply", spec, "--yes", "--replace", "stage.sft").exit_code == 0
    again = state_of(spec).nodes["stage.sft"]
    assert again.cost_usd > 0  # the new identity's own runs
    assert again.spent_usd == round(first.cost_usd + again.cost_usd, 4)  # the budget counts both
