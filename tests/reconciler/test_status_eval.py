"""`retool status`'s evaluation table: model × dataset × metric from recorded eval results,
expected values beside reached ones, everything in --json."""

from __future__ import annotations

import io
import json

from rich.console import Console

from reconciler.evaluations import eval_table
from reconciler.plan import make_plan
from reconciler.status import compute_status, render_status
from tests.plan_helpers import observed_at_end, spec_from, succeeded_state
from tests.reconciler.test_plan_eval import BASE

RESULT = {
    "dataset": "aime", "problems": 30, "samples_per_problem": 4, "mean_at_n": 0.375,
    "pass_at_k": {"1": 0.375, "2": 0.5, "4": 0.625}, "maj_at_n": 0.4, "mean_tool_calls": 1.5,
    "mean_response_tokens": 812.25, "truncated_share": 0.05,
}


def _state():  # type: ignore[no-untyped-def]
    spec = spec_from(BASE)
    state = succeeded_state(spec)
    state.nodes["stage.eval_sft"].outputs.update(
        samples=4, results={"aime": RESULT, "math": {**RESULT, "dataset": "math", "mean_at_n": 0.9}},
    )
    return spec, state


def test_rows_cover_every_metric_and_the_whole_pass_curve() -> None:
    spec, state = _state()
    table = eval_table(spec, state)
    assert table.stages() == ["stage.eval_sft"]  # the other evals recorded no results
    assert table.datasets("stage.eval_sft") == ["aime", "math"]
    assert table.pass_curve("stage.eval_sft", "aime") == [(1, 0.375), (2, 0.5), (4, 0.625)]
    row = table.row("stage.eval_sft", "math", "mean@n")
    assert row is not None and row.value == 0.9 and row.model == "stage.sft" and row.samples == 4
    assert {r.metric for r in table.rows} == {
        "mean@n", "pass@1", "pass@2", "pass@4", "maj@n", "tool_calls", "response_length", "truncated",
    }


def test_status_shows_the_table_and_json_has_it() -> None:
    spec, state = _state()
    observed = observed_at_end(state)
    report = compute_status(make_plan(spec, state, observed), spec, state, observed, now=10.0)
    data = json.loads(report.model_dump_json())
    assert len(data["evaluations"]["rows"]) == 2 * 8
    buf = io.StringIO()
    render_status(report, Console(file=buf, width=200, no_color=True))
    text = buf.getvalue()
    assert "evaluation" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("stage.eval_sft") and " aime " in ln)
    for cell in ("stage.sft", "0.375", "4: 0.625", "0.400", "1.500", "812.2", "0.050"):
        assert cell in line, (cell, line)


def test_expectations_sit_beside_the_reached_values() -> None:
    spec, state = _state()
    data = spec.model_dump(mode="json")
    data["stages"]["eval_sft"]["expect"] = [
        {"metric": "aime/mean@4", "at_least": 0.4, "source": "a paper"},  # @4 is this stage's n
        {"metric": "math/pass@2", "at_least": 0.4, "source": "a paper"},
        {"metric": "aime/pass@64", "at_least": 0.1, "source": "never recorded"},
    ]
    spec = type(spec).model_validate(data)
    table = eval_table(spec, state)
    mean = table.row("stage.eval_sft", "aime", "mean@n")
    assert mean is not None and (mean.expected, mean.met, mean.source) == (">= 0.4", False, "a paper")
    assert table.row("stage.eval_sft", "math", "pass@2").met is True  # type: ignore[union-attr]
    assert table.unmatched == ["stage.eval_sft: aime/pass@64"]
    buf = io.StringIO()
    observed = observed_at_end(state)
    render_status(compute_status(make_plan(spec, state, observed), spec, state, observed, now=10.0), Console(file=buf, width=220, no_color=True))
    assert "0.375 (>= 0.4 ✗)" in buf.getvalue() and "expected metric not recorded: stage.eval_sft: aime/pass@64" in buf.getvalue()


def test_a_narrow_terminal_gets_every_value_unclipped() -> None:
    spec, state = _state()
    data = spec.model_dump(mode="json")
    data["stages"]["eval_sft"]["expect"] = [{"metric": "aime/mean@4", "at_least": 0.4, "source": "a paper"}]
    spec = type(spec).model_validate(data)
    observed = observed_at_end(state)
    report = compute_status(make_plan(spec, state, observed), spec, state, observed, now=10.0)
    for width, soft_wrap in ((80, False), (60, False), (80, True)):  # the CLI's console soft-wraps
        buf = io.StringIO()
        render_status(report, Console(file=buf, width=width, no_color=True, soft_wrap=soft_wrap))
        text = buf.getvalue()
        shown = " ".join(text[text.index("evaluation"):].split())  # wrapped lines joined
        assert "…" not in shown
        assert "stage.eval_sft · aime · stage.sft · n 4" in shown
        for cell in ("mean@n 0.375 (>= 0.4 ✗)", "pass@4 0.625", "maj@n 0.400", "tool_calls 1.500",
                     "response_length 812.2", "truncated 0.050"):
            assert cell in shown, (cell, shown)
