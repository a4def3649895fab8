"""The issue's scenario table on the real spec: with a recorded state in which every node
succeeded, each edit gives exactly these actions. The same rows are written to
tests/reconciler/golden/scenarios.md (copied into docs/change-policy.md, which must hold it verbatim)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest

from reconciler.plan import Plan, make_plan
from tests.plan_helpers import QWEN, observed_at_end, spec_from, succeeded_state

TEXT = QWEN.read_text()
SPEC = spec_from(TEXT)
STATE = succeeded_state(SPEC)
OBSERVED = observed_at_end(STATE)


def edit(*pairs: tuple[str, str]) -> str:
    text = TEXT
    for old, new in pairs:
        assert text.count(old) == 1, f"edit target {old!r} must occur exactly once"
        text = text.replace(old, new)
    return text


def without_stages(*names: str) -> str:
    """The spec with these stages' blocks cut out (a block ends at the next two-space line)."""
    lines = TEXT.splitlines(keepends=True)
    out, skipping, in_stages = [], False, False
    for line in lines:
        in_stages = in_stages or line.startswith("stages:")
        if in_stages and line.startswith("  ") and not line.startswith("   "):
            skipping = line.strip().rstrip(":") in names
        if not skipping:
            out.append(line)
    return "".join(out)


def eval_edit(stage: str, old: str, new: str) -> str:
    """Replace `old` inside one eval stage's block only (the eval stages share their values)."""
    start = TEXT.index(f"  {stage}:\n")
    end = TEXT.find("\n  eval_", start + 1)
    end = len(TEXT) if end < 0 else end
    block = TEXT[start:end]
    assert block.count(old) == 1, f"edit target {old!r} must occur exactly once in {stage}"
    return TEXT[:start] + block.replace(old, new) + TEXT[end:]


class Scenario(NamedTuple):
    edit: str  # what the user changed (table column 1)
    text: str
    expected: dict[str, str]  # address -> action, every node not listed is a no-op
    resume_from: dict[str, int] = {}


# An SFT change reruns everything downstream of it; the base model's evaluation stays.
SFT_DOWNSTREAM = {"stage.sft": "rerun", "stage.dapo": "rerun", "stage.eval_sft": "rerun", "stage.eval_dapo": "rerun"}

SCENARIOS: list[Scenario] = [
    Scenario("no edit", TEXT, {}),
    Scenario("reordered keys", edit(
        ("    kind: sft\n    model: model.qwen7b\n    train: dataset.retool_sft\n",
         "    train: dataset.retool_sft\n    model: model.qwen7b\n    kind: sft\n"),
        ("optim: {lr: 1.0e-5, betas: [0.9, 0.95],", "optim: {betas: [0.9, 0.95], lr: 1.0e-5,"),
    ), {}),
    Scenario("comment changed", edit(("# A budget choice, not a recipe value", "# A budget choice, not the recipe's")), {}),
    Scenario("number rewritten (`1.0e-5` → `0.00001`)", edit(("lr: 1.0e-5,", "lr: 0.00001,")), {}),
    Scenario("default written explicitly (`seed: 42`, `nodes: 1`)", edit(
        ("    epochs: 6\n", "    epochs: 6\n    seed: 42\n"),
        ("memory_mb: 262144, timeout_hours: 24}", "memory_mb: 262144, timeout_hours: 24, nodes: 1}"),
    ), {}),
    Scenario("RL lr `1e-6` → `2e-6`", edit(("optim: {lr: 1.0e-6}", "optim: {lr: 2.0e-6}")), {"stage.dapo": "rerun", "stage.eval_dapo": "rerun"}),
    Scenario("SFT lr `1e-5` → `2e-5`", edit(("lr: 1.0e-5,", "lr: 2.0e-5,")), SFT_DOWNSTREAM),
    Scenario("SFT epochs 6 → 8", edit(("epochs: 6", "epochs: 8")),
             {**SFT_DOWNSTREAM, "stage.sft": "resume"}, {"stage.sft": 372}),
    Scenario("RL max_steps 400 → 600", edit(("max_steps: 400", "max_steps: 600")),
             {"stage.dapo": "resume", "stage.eval_dapo": "rerun"}, {"stage.dapo": 400}),
    Scenario("RL max_steps 400 → 300 (below the reached step)", edit(("max_steps: 400", "max_steps: 300")), {}),
    Scenario("RL loggers `[console, wandb]` → `[console]`", edit(
        ("logging: {backends: [console, wandb], project: retool, experiment: qwen7b-dapo}",
         "logging: {backends: [console], project: retool, experiment: qwen7b-dapo}"),
    ), {"stage.dapo": "update"}),
    Scenario("SFT experiment name", edit(("experiment: qwen7b-sft", "experiment: qwen7b-sft-v2")), {"stage.sft": "update"}),
    Scenario("SFT save_freq 62 → 31", edit(("save_freq: 62", "save_freq: 31")), {"stage.sft": "update"}),
    Scenario("RL GPUs per node 8 → 4", edit(
        ("resources: {gpu: H100, gpus_per_node: 8, cpu: 32, memory_mb: 327680",
         "resources: {gpu: H100, gpus_per_node: 4, cpu: 32, memory_mb: 327680"),
    ), {"stage.dapo": "rerun", "stage.eval_dapo": "rerun"}),
    Scenario("SFT GPUs per node 8 → 4", edit(
        ("resources: {gpu: H100, gpus_per_node: 8, cpu: 32, memory_mb: 262144",
         "resources: {gpu: H100, gpus_per_node: 4, cpu: 32, memory_mb: 262144"),
    ), SFT_DOWNSTREAM),
    Scenario("image package added", edit(("- flash-attn==2.8.3\n", "- flash-attn==2.8.3\n    - numpy==2.2.6\n")),
             {"image": "update"}),
    Scenario("sandbox memory limit", edit(("  memory_limit_mb: 1024\n", "  memory_limit_mb: 2048\n")), {"sandbox": "update"}),
    Scenario("RL validation data changed", edit(("val: [dataset.aime_2024, dataset.aime_2025]", "val: [dataset.aime_2024]")),
             {"stage.dapo": "rerun", "stage.eval_dapo": "rerun"}),
    Scenario("eval samples 30 → 40", eval_edit("eval_dapo", "samples: 30", "samples: 40"),
             {"stage.eval_dapo": "resume"}, {"stage.eval_dapo": 30}),
    Scenario("eval samples 30 → 20 (below the drawn samples)", eval_edit("eval_dapo", "samples: 30", "samples: 20"), {}),
    Scenario("eval datasets changed", eval_edit("eval_sft", "[dataset.aime_2024, dataset.aime_2025]", "[dataset.aime_2025]"),
             {"stage.eval_sft": "rerun"}),
    Scenario("eval expectation changed", eval_edit("eval_dapo", "at_least: 0.40", "at_least: 0.45"), {"stage.eval_dapo": "update"}),
    Scenario("RL stage and its eval removed", without_stages("dapo", "eval_dapo"),
             {"stage.dapo": "delete", "stage.eval_dapo": "delete"}),
]


def plan_of(s: Scenario) -> Plan:
    return make_plan(spec_from(s.text), STATE, OBSERVED, spec_path="specs/retool-qwen7b.yaml", created_at=0.0)


def changed(plan: Plan) -> dict[str, str]:
    return {c.address: c.action for c in plan.changes if c.action != "no-op"}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.edit for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    if scenario.edit != "no edit":
        assert scenario.text != TEXT
    plan = plan_of(scenario)
    assert changed(plan) == scenario.expected
    for address, step in scenario.resume_from.items():
        change = plan.change(address)
        assert change is not None and change.resume_from == step


def test_removed_stage_keeps_its_data() -> None:
    plan = plan_of(SCENARIOS[-1])
    change = plan.change("stage.dapo")
    assert change is not None and change.notes == ["record forgotten; its files stay on volume.checkpoints (--prune deletes volumes only)"]


def test_sft_logging_change_does_not_rerun_rl() -> None:
    plan = plan_of(next(s for s in SCENARIOS if s.edit == "SFT experiment name"))
    assert plan.change("stage.dapo").action == "no-op"  # type: ignore[union-attr]


def test_resume_below_reached_step_says_so() -> None:
    plan = plan_of(next(s for s in SCENARIOS if s.edit.startswith("RL max_steps 400 → 300")))
    assert plan.change("stage.dapo").notes == ["already at step 400: the new total 300 needs no more steps"]  # type: ignore[union-attr]


def test_fewer_eval_samples_say_so() -> None:
    plan = plan_of(next(s for s in SCENARIOS if s.edit.startswith("eval samples 30 → 20")))
    assert plan.change("stage.eval_dapo").notes == [  # type: ignore[union-attr]
        "already 30 samples per problem: 20 need no new draws (the recorded results keep all 30)"]


def describe(plan: Plan) -> str:
    parts = []
    for c in plan.changes:
        if c.action == "no-op":
            continue
        text = f"`{c.action} {c.address}`"
        if c.action == "resume" and c.resume_from is not None:
            text += f" from step {c.resume_from}"
        if c.action == "delete":
            text += " (data kept)"
        parts.append(text)
    notes = [n for c in plan.changes for n in c.notes if n.startswith("already ")]
    return ", ".join(parts) or ("all `no-op`" + (f" ({notes[0]})" if notes else ""))


def why(plan: Plan) -> str:
    return "; ".join(f"{c.address}: {', '.join(c.reasons)}" for c in plan.changes if c.action != "no-op")


def scenario_table() -> str:
    lines = [
        "| Edit to `specs/retool-qwen7b.yaml` (after a successful apply) | Plan | Why |",
        "|---|---|---|",
    ]
    for s in SCENARIOS:
        plan = plan_of(s)
        reasons = why(plan).replace("|", "\\|")
        lines.append(f"| {s.edit} | {describe(plan)} | {reasons} |")
    return "\n".join(lines) + "\n"


def test_scenario_table_is_current() -> None:
    path = Path(__file__).parent / "golden" / "scenarios.md"
    table = scenario_table()
    if os.environ.get("RETOOL_UPDATE_GOLDEN"):
        path.write_text(table, encoding="utf-8")
    assert table == path.read_text(encoding="utf-8"), f"{path} differs (RETOOL_UPDATE_GOLDEN=1 rewrites it)"


def test_the_docs_hold_the_scenario_table() -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "change-policy.md"
    assert scenario_table() in page.read_text(encoding="utf-8"), f"{page}'s scenario table is stale: paste scenario_table()"
