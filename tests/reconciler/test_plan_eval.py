"""Eval stages in the plan: what reruns, resumes or updates, and the spec's reference checks.

    model.m ──> stage.sft ──> stage.rl
       │            │             │
       ▼            ▼             ▼
  stage.eval_base  stage.eval_sft  stage.eval_rl     (each also reads dataset.aime)
"""

from __future__ import annotations

import pytest

from reconciler.errors import SpecError
from reconciler.graph import build_graph
from reconciler.plan import Observed, ObservedNode, Plan, ReasonCode, make_plan
from reconciler.spec import EvalStage
from tests.plan_helpers import observed_at_end, spec_from, succeeded_state

BASE = """
name: evals
volumes: {data: {mount: /data}, models: {mount: /models}, checkpoints: {mount: /checkpoints}}
sandbox: {placement: sidecar}
datasets:
  sft_data: {source: builtin:tiny_sft, format: messages, options: {rows: 64}}
  math: {source: builtin:tiny_math, format: rl, options: {rows: 64}}
  aime: {source: path:aime.jsonl, format: aime_2024, expected_rows: 30}
models:
  m: {source: builtin:tiny-qwen2}
stages:
  sft: {kind: sft, model: model.m, train: dataset.sft_data, optim: {lr: 1.0e-5}, train_batch_size: 16}
  rl: {kind: rl, model: stage.sft, train: dataset.math, train_batch_size: 4, ppo_mini_batch_size: 4, max_steps: 2}
  eval_base: {kind: eval, model: model.m, datasets: [dataset.aime], samples: 4}
  eval_sft: {kind: eval, model: stage.sft, datasets: [dataset.aime, dataset.math], samples: 4, temperature: 1.0}
  eval_rl: {kind: eval, model: stage.rl, datasets: [dataset.aime], samples: 4}
"""
SPEC = spec_from(BASE)
STATE = succeeded_state(SPEC)
OBSERVED = observed_at_end(STATE)


def plan_for(text: str, observed: Observed = OBSERVED) -> Plan:
    return make_plan(spec_from(text), STATE, observed, spec_path="spec.yaml", created_at=0.0)


def changed(plan: Plan) -> dict[str, str]:
    return {c.address: c.action for c in plan.changes if c.action != "no-op"}


def test_graph_edges_and_steps() -> None:
    graph = build_graph(SPEC)
    assert set(graph.nodes["stage.eval_sft"].deps) == {
        "stage.sft", "dataset.aime", "dataset.math", "volume.checkpoints", "image", "sandbox",
    }
    assert graph.dependents("stage.sft") >= {"stage.rl", "stage.eval_sft", "stage.eval_rl"}
    assert "stage.eval_base" not in graph.dependents("stage.sft")
    assert STATE.nodes["stage.eval_sft"].steps_done == 4  # steps are sample rounds
    assert make_plan(SPEC, STATE, OBSERVED).has_changes is False


def test_changing_sft_reruns_only_the_evals_downstream_of_it() -> None:
    plan = plan_for(BASE.replace("optim: {lr: 1.0e-5}", "optim: {lr: 2.0e-5}"))
    assert changed(plan) == {"stage.sft": "rerun", "stage.rl": "rerun", "stage.eval_sft": "rerun", "stage.eval_rl": "rerun"}
    assert plan.change("stage.eval_sft").reason_codes == [ReasonCode.INPUT_CHANGES]  # type: ignore[union-attr]


def test_more_samples_resume_from_the_rounds_drawn() -> None:
    plan = plan_for(BASE.replace("model: stage.sft, datasets: [dataset.aime, dataset.math], samples: 4",
                                 "model: stage.sft, datasets: [dataset.aime, dataset.math], samples: 16"))
    assert changed(plan) == {"stage.eval_sft": "resume"}
    change = plan.change("stage.eval_sft")
    assert change is not None and change.resume_from == 4 and change.total_steps == 16
    assert change.reason_codes == [ReasonCode.RESUME_FIELDS_CHANGED]


def test_fewer_samples_is_a_noop_with_a_note() -> None:
    plan = plan_for(BASE.replace("model: stage.rl, datasets: [dataset.aime], samples: 4",
                                 "model: stage.rl, datasets: [dataset.aime], samples: 2"))
    assert changed(plan) == {}
    assert plan.change("stage.eval_rl").notes == [  # type: ignore[union-attr]
        "already 4 samples per problem: 2 need no new draws (the recorded results keep all 4)"
    ]


@pytest.mark.parametrize(("old", "new", "action"), [
    ("samples: 4, temperature: 1.0}", "samples: 4, temperature: 0.6}", "rerun"),
    ("datasets: [dataset.aime, dataset.math]", "datasets: [dataset.aime]", "rerun"),
    ("samples: 4, temperature: 1.0}", "samples: 4, temperature: 1.0, max_response_length: 512}", "rerun"),
    ("samples: 4, temperature: 1.0}", "samples: 4, temperature: 1.0, batch_size: 8, engine: transformers}", "update"),
    ("samples: 4, temperature: 1.0}", "samples: 4, temperature: 1.0, resources: {gpu: H100, gpus_per_node: 8}}", "update"),
    ("samples: 4, temperature: 1.0}", "samples: 4, temperature: 1.0, tool: {timeout_s: 5}}", "update"),
])
def test_eval_field_policies(old: str, new: str, action: str) -> None:
    assert changed(plan_for(BASE.replace(old, new))) == {"stage.eval_sft": action}


def test_an_unfinished_eval_resumes_from_its_complete_rounds() -> None:
    observed = Observed(nodes={**OBSERVED.nodes, "stage.eval_rl": ObservedNode(run_state="lost", latest_valid_checkpoint=1)})
    state = STATE.model_copy(deep=True)
    state.nodes["stage.eval_rl"].status = "running"
    plan = make_plan(SPEC, state, observed, spec_path="spec.yaml", created_at=0.0)
    change = plan.change("stage.eval_rl")
    assert change is not None and (change.action, change.resume_from) == ("resume", 1)


@pytest.mark.parametrize(("old", "new", "message"), [
    ("model: stage.rl, datasets", "model: stage.eval_base, datasets", "stage.eval_base is an eval stage: it produces no model"),
    ("datasets: [dataset.aime]", "datasets: [dataset.sft_data]", "dataset.sft_data has format 'messages': evaluation needs"),
    ("datasets: [dataset.aime]", "datasets: [dataset.aimee]", "unknown reference 'dataset.aimee'"),
    ("sandbox: {placement: sidecar}\n", "", "an RL stage calls the code sandbox"),
])
def test_reference_errors(old: str, new: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from(BASE.replace(old, new, 1))
    assert any(message in p for p in info.value.problems), info.value.problems


def test_eval_alone_needs_the_sandbox() -> None:
    text = BASE.split("stages:")[0].replace("sandbox: {placement: sidecar}\n", "")
    text += "stages:\n  e: {kind: eval, model: model.m, datasets: [dataset.aime], samples: 2}\n"
    with pytest.raises(SpecError) as info:
        spec_from(text)
    assert any("an eval stage calls the code sandbox" in p for p in info.value.problems), info.value.problems


def test_defaults_are_the_recipes_validation_sampling() -> None:
    stage = SPEC.stages["eval_base"]
    assert isinstance(stage, EvalStage)
    assert (stage.temperature, stage.top_p, stage.max_response_length, stage.max_assistant_turns) == (1.0, 0.6, 16384, 16)
