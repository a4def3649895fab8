"""A stage's `expect:` in status: expected vs reached, from the metrics the run reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import RetoolError
from reconciler.loader import LoadedSpec, load_spec
from reconciler.plan import Observed, ObservedNode
from reconciler.spec import Expectation
from reconciler.status import StatusReport
from tests.fakes.pipeline import load, spec_dict, write_spec
from tests.reconciler.test_status import applied, render, row, status_of

METRIC = "val-core/aime_2024/acc/mean@30"
EXPECT = [
    {"metric": METRIC, "at_least": 0.4, "at_step": 150, "source": "verl docs/algo/baseline.md"},
    {"metric": "response_length/mean", "at_most": 8000, "source": "a budget we set ourselves"},
]


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedSpec:
    return load(tmp_path, **{"stages.rl.expect": EXPECT})


def test_nothing_measured_before_the_run(loaded: LoadedSpec) -> None:
    rl = row(status_of(loaded, None, Observed()), "stage.rl")
    assert [(e.metric, e.expected, e.reached, e.verdict) for e in rl.expectations] == [
        (METRIC, ">= 0.4", None, "not measured"), ("response_length/mean", "<= 8000", None, "not measured"),
    ]
    assert row(status_of(loaded, None, Observed()), "stage.sft").expectations == []


def test_a_running_stage_below_its_expectation_so_far(loaded: LoadedSpec) -> None:
    store, _ = applied(loaded)
    state = store.read()
    assert state is not None
    state.nodes["stage.rl"].status = "running"
    seen = Observed(nodes={"stage.rl": ObservedNode(run_state="running", step=2, metrics={
        METRIC: 0.233, "response_length/mean": 5000.0, "critic/score/mean": -0.2})})
    report = status_of(loaded, state, seen)
    rl = row(report, "stage.rl")
    assert [(e.reached, e.verdict) for e in rl.expectations] == [(0.233, "below"), (5000.0, "met")]
    text = render(report, 200)
    assert f"stage.rl  {METRIC} >= 0.4 (at step 150) · reached 0.233 · below so far" in text
    assert "source: verl docs/algo/baseline.md" in text
    assert StatusReport.model_validate_json(report.model_dump_json()) == report  # --json carries them


def test_a_finished_stage_compares_what_finalize_recorded(loaded: LoadedSpec) -> None:
    store, _ = applied(loaded)
    state = store.read()
    assert state is not None
    state.nodes["stage.rl"].outputs["final_metrics"] = {METRIC: 0.4333, "response_length/mean": 9100.0}
    report = status_of(loaded, state, Observed())
    rl = row(report, "stage.rl")
    assert [(e.reached, e.verdict) for e in rl.expectations] == [(0.4333, "met"), (9100.0, "below")]
    text = render(report, 200)
    assert "reached 0.4333 · met" in text and "reached 9100 · below\n" in text  # finished: not "so far"


def test_an_expectation_needs_a_bound_and_a_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at_least` or `at_most"):
        Expectation(metric=METRIC, source="x")
    with pytest.raises(ValueError, match="above at_most"):
        Expectation(metric=METRIC, at_least=0.5, at_most=0.4, source="x")
    assert Expectation(metric=METRIC, at_least=0.4, at_most=0.6, source="x").bound_text() == "0.4..0.6"
    path = write_spec(tmp_path, spec_dict(**{"stages.rl.expect": [{"metric": METRIC, "at_least": 0.4}]}))
    with pytest.raises(RetoolError) as err:
        load_spec(path)
    assert "demo.yaml:" in str(err.value.detail) and "stages.rl.expect[0].source: required field is missing" in str(err.value.detail)
