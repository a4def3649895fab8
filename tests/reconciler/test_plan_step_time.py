"""Where a stage's step time comes from, as the plan prints it: the spec's
`seconds_per_step_basis` (measured / derived / guess, with a range priced like the
estimate), or this stage's own run once it measured one (elapsed / steps)."""

from __future__ import annotations

import pytest

from reconciler.cli.plan_view import plan_text
from reconciler.errors import SpecError
from reconciler.plan import Observed, Plan, make_plan
from reconciler.state.base import State
from tests.plan_helpers import observed_at_end, spec_from, succeeded_state

TOY = """\
name: toy
image: {base: "python:3.12-slim"}
volumes: {data: {mount: /data}, models: {mount: /models}, checkpoints: {mount: /ckpt}}
sandbox: {}
datasets: {d: {source: "builtin:tiny_math", format: rl, expected_rows: 1000}}
models: {m: {source: "builtin:tiny-qwen2"}}
stages:
  a:
    kind: sft
    model: model.m
    train: dataset.d
    train_batch_size: 10
    epochs: 1
    ulysses_sequence_parallel_size: 1
    resources: {gpu: H100, gpus_per_node: 2}
    seconds_per_step: 36
    seconds_per_step_basis: {source: derived, detail: "python bench/step_costs.py (H200, 2026-12-07)", low: 18, high: 72}
  e:
    kind: eval
    model: stage.a
    datasets: [dataset.d]
    samples: 10
    resources: {gpu: H100, gpus_per_node: 1}
    seconds_per_step: 90
"""


def plan_of(text: str = TOY, state: State | None = None, observed: Observed | None = None) -> Plan:
    return make_plan(spec_from(text), state, observed or Observed(), spec_path="toy.yaml", created_at=0.0)


def test_a_derived_step_time_prints_its_basis_and_priced_range() -> None:
    plan = plan_of()
    a = plan.change("stage.a")
    assert a is not None and a.estimate.basis == "derived" and (a.estimate.low_s, a.estimate.high_s) == (18, 72)
    text = plan_text(plan)
    # 100 steps × 36 s on 2 H100s at $3.95/h = $7.90; the range halves and doubles it
    assert "100 steps × 36 s/step (derived) on H100:2" in text
    assert "step time: python bench/step_costs.py (H200, 2026-12-07); 18–72 s/step ≈ $3.95–$15.80" in text


def test_a_step_time_without_basis_is_a_spec_guess() -> None:
    text = plan_text(plan_of())
    assert "10 steps × 90 s/step (spec guess) on H100:1" in text


def test_a_measured_step_time_replaces_the_estimate_and_says_how_far_off_it_was() -> None:
    spec = spec_from(TOY)
    state = succeeded_state(spec, seconds_per_step={"stage.a": 54.0})
    more = TOY.replace("epochs: 1", "epochs: 2")
    plan = plan_of(more, state, observed_at_end(state))
    a = plan.change("stage.a")
    assert a is not None and a.action == "resume" and a.estimate.source == "measured"
    assert a.estimate.gpu_hours == pytest.approx(100 * 54 * 2 / 3600)  # the rest of the stage, at the measured pace
    text = plan_text(plan)
    assert "100 steps × 54 s/step (measured on H100:2 by this stage's run)" in text
    assert "step time: measured 54 s/step (elapsed / steps of the last attempt); the spec's derived 36 s was +50% off" in text


@pytest.mark.parametrize(("old", "new", "message"), [
    ("    seconds_per_step: 36\n", "", "seconds_per_step_basis describes a seconds_per_step, but none is set"),
    ("seconds_per_step: 36", "seconds_per_step: 80", "seconds_per_step 80 is above seconds_per_step_basis.high 72"),
    ("seconds_per_step: 36", "seconds_per_step: 10", "seconds_per_step 10 is below seconds_per_step_basis.low 18"),
    ("low: 18, high: 72", "low: 80, high: 72", "low 80 is above high 72"),
    ("source: derived", "source: estimated", "'measured', 'derived' or 'guess'"),
])
def test_a_basis_that_does_not_fit_its_figure_is_a_spec_error(old: str, new: str, message: str) -> None:
    assert TOY.count(old) == 1
    with pytest.raises(SpecError) as info:
        spec_from(TOY.replace(old, new))
    problems = "\n".join(info.value.problems)
    assert message in problems and "stages.a" in problems
