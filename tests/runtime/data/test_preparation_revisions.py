"""A dataset's identity carries its format's preparation revision (reconciler.spec
PREPARATION_REVISIONS): what preparation writes for fixed inputs is pinned here per revision,
so changing it (the tool schema, how fences are unwrapped, the message layout) fails until the
revision is bumped, and every dataset of that format is then prepared again and what consumed
it reruns: SFT data rendered by older code never meets a newer RL stage's tool."""

from __future__ import annotations

import pytest

from reconciler.fingerprint import digest
from reconciler.graph import PREPARATION_KEY, build_graph
from reconciler.plan import ReasonCode, make_plan
from reconciler.spec import PREPARATION_REVISIONS
from runtime.data.formats import map_rows
from tests.plan_helpers import QWEN, observed_at_end, spec_from, succeeded_state
from tests.runtime.data.test_data_retool_sft import TWO_CALLS

SOURCE_ROWS = {
    "retool_sft": [
        {"messages": [{"role": "user", "content": "*user question:*\nWhat is 285 mod 7?"},
                      {"role": "assistant", "content": TWO_CALLS}]},
        {"question": "What is 285 mod 7?", "solution": TWO_CALLS.replace("```python\n", "```py\n")},
    ],
    "dapo_math": [
        {"prompt": [{"role": "user", "content": "Find 2+2."}], "reward_model": {"ground_truth": " 4\n"},
         "data_source": "math_dapo"},
    ],
    "aime_2024": [{"Problem": "Find 7*6.", "Answer": 42}, {"Problem": "Find 3.", "Answer": "003 "}],
    "aime_2025": [{"problem": "Find 1+1.", "answer": " 2"}],
    "rl": [{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2 "}}],
    "messages": [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]},
        {"messages": '[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2",'
                     ' "tool_calls": [{"type": "function", "function": {"name": "code_interpreter",'
                     ' "arguments": "{\\"code\\": \\"print(1+1)\\"}"}}]}]'},
    ],
}

# digest of map_rows(format, SOURCE_ROWS[format]) at each revision the format had
WRITTEN = {
    ("retool_sft", 2): "5596a361c5c3fb0c0ea41259953bc206a189bc1ffff9f451a06e58e2edf3418c",
    ("retool_sft", 3): "ce66b591d8d4eb819a562c7f521ba6bbc083ba59e6d0215c0ea458b44e83252b",
    ("messages", 2): "5d915134832a7e7683008faba5c0ce2fb4df9eec4b7dc3299fb7f372979938ec",
    ("dapo_math", 2): "66e85c344f8b3600dd74ec2d887692046bc5d1207a195f3fd5388fccf530fad6",
    ("aime_2024", 2): "ea91527c6989a9ae92ba60e3d9aba71180a8f7575046cdf3188b5d64125111d9",
    ("aime_2025", 2): "73d2d5531293dffe068ffdb4740413424edcbac69bcd2efb62f422ee1ff19d52",
    ("rl", 2): "6fa023b6099d7646081a8cf237068d60b0790438bf695ed0ef285fcdf7397f2b",
}


@pytest.mark.parametrize("fmt", sorted(PREPARATION_REVISIONS))
def test_what_preparation_writes_is_pinned_to_the_revision(fmt: str) -> None:
    rows, skipped = map_rows(fmt, SOURCE_ROWS[fmt], default_source="pin")
    assert not skipped and len(rows) == len(SOURCE_ROWS[fmt])
    revision = PREPARATION_REVISIONS[fmt]
    assert digest(rows) == WRITTEN.get((fmt, revision)), (
        f"format {fmt}: what preparation writes changed: bump PREPARATION_REVISIONS[{fmt!r}] in reconciler/spec.py "
        f"(to {revision + 1}) and record the new digest here, so prepared datasets are prepared again"
    )


def test_lenient_fences_writes_what_revision_2_wrote() -> None:
    """Revision 3 made the recipe's fence rule the default; the option keeps revision 2's rows."""
    rows, _ = map_rows("retool_sft", SOURCE_ROWS["retool_sft"], default_source="pin", lenient_fences=True)
    assert digest(rows) == WRITTEN[("retool_sft", 2)]


def test_a_dataset_prepared_by_an_older_revision_is_prepared_again_and_its_consumers_rerun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = spec_from(QWEN.read_text())
    monkeypatch.setattr("reconciler.graph.PREPARATION_REVISIONS", {})  # the state an older retool recorded
    state = succeeded_state(spec)
    observed = observed_at_end(state)
    assert PREPARATION_KEY not in state.nodes["dataset.retool_sft"].config
    monkeypatch.undo()
    plan = make_plan(spec, state, observed)
    actions = {c.address: c.action for c in plan.changes if c.action != "no-op"}
    datasets = {"dataset.retool_sft", "dataset.dapo_math", "dataset.aime_2024", "dataset.aime_2025"}
    assert actions == {**{d: "rerun" for d in datasets}, "stage.sft": "rerun", "stage.dapo": "rerun",
                       "stage.eval_base": "rerun", "stage.eval_sft": "rerun", "stage.eval_dapo": "rerun"}
    change = plan.change("dataset.retool_sft")
    assert change is not None and change.reason_codes == [ReasonCode.RESTART_FIELDS_CHANGED]
    assert change.reasons == ["changed: datasets.retool_sft.preparation_revision"]  # the README quotes this line
    assert change.notes == ["retool prepares format retool_sft differently since this was prepared (revision 1 → 3): "
                            "prepared again, so what consumes it sees the rows retool writes now"]
    assert build_graph(spec).nodes["dataset.dapo_math"].config[PREPARATION_KEY] == 2


def test_the_option_off_keeps_a_datasets_identity() -> None:
    """`lenient_fences: false` is left out of the identity, so no dataset of a format whose
    rows did not change (`messages`) reruns because the option was added."""
    spec = spec_from(QWEN.read_text().replace("    format: retool_sft\n", "    format: retool_sft\n    lenient_fences: true\n"))
    assert build_graph(spec).nodes["dataset.retool_sft"].config["lenient_fences"] is True
    assert "lenient_fences" not in build_graph(spec).nodes["dataset.aime_2024"].config


def test_a_recorded_state_at_the_current_revision_plans_nothing() -> None:
    spec = spec_from(QWEN.read_text())
    state = succeeded_state(spec)
    assert state.nodes["dataset.retool_sft"].config[PREPARATION_KEY] == PREPARATION_REVISIONS["retool_sft"]
    assert not make_plan(spec, state, observed_at_end(state)).has_changes
