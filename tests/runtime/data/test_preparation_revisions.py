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
    ("messages", 2): "5d915134832a7e7683008faba5c0ce2fb4df9eec4b7dc3299fb7f372979938ec",
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
    assert actions == {"dataset.retool_sft": "rerun", "stage.sft": "rerun", "stage.dapo": "rerun",
                       "stage.eval_sft": "rerun", "stage.eval_dapo": "rerun"}
    change = plan.change("dataset.retool_sft")
    assert change is not None and change.reason_codes == [ReasonCode.RESTART_FIELDS_CHANGED]
    assert change.reasons == ["changed: datasets.retool_sft.preparation_revision"]  # the README quotes this line
    assert change.notes == ["retool prepares format retool_sft differently since this was prepared (revision 1 → 2): "
                            "prepared again, so what consumes it sees the current tool schema"]
    # the RL data's format has no revision yet: its identity is what it was before revisions existed
    assert PREPARATION_KEY not in build_graph(spec).nodes["dataset.dapo_math"].config


def test_a_recorded_state_at_the_current_revision_plans_nothing() -> None:
    spec = spec_from(QWEN.read_text())
    state = succeeded_state(spec)
    assert state.nodes["dataset.retool_sft"].config[PREPARATION_KEY] == PREPARATION_REVISIONS["retool_sft"]
    assert not make_plan(spec, state, observed_at_end(state)).has_changes
