"""The eval grader is the recipe's scorer: same verdict, score and answer on every response."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.eval.grader import grade
from runtime.verl.recipe.reward import compute_score

ROOT = Path(__file__).resolve().parents[3]


def _aime() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (ROOT / "specs" / "data" / "aime_2024.jsonl").read_text().splitlines() if line.strip()]
    return [(str(r.get("problem") or r.get("Problem")), str(r.get("answer") or r.get("Answer") or "")) for r in rows][:10]


def _responses(truth: str) -> list[str]:
    other = str(int(truth) + 1) if truth.isdigit() else truth + "1"
    return [
        f"The answer is \\boxed{{{truth}}}.",
        f"The answer is \\boxed{{{other}}}.",
        f"\\boxed{{{truth}}} first, then I changed my mind: \\boxed{{{other}}}",
        f"\\boxed{{{other}}} then \\boxed{{{truth}}}",
        f"\\boxed{{ {truth} }}",
        f"\\boxed{{{truth}}}" + " padding" * 40,  # the box falls out of the scored tail
        "no box at all",
        f"<tool_call>x</tool_call> tool output {truth}\n\\boxed{{{truth}}}",
        f"\\boxed{{\\frac{{{truth}}}{{1}}}}",
        "",
    ]


@pytest.mark.parametrize("num_turns", [2, 4, 6, 12, 34])
def test_grade_equals_the_recipe_scorer(num_turns: int) -> None:
    cases = 0
    for source in ("aime_2024", "math_dapo"):
        for _, truth in _aime():
            for response in _responses(truth):
                got = grade(source, response, truth, num_turns)
                want = compute_score(
                    data_source=source, solution_str=response, ground_truth=truth, extra_info={"num_turns": num_turns}
                )
                assert got.score == pytest.approx(float(want["score"]))
                assert got.correct == bool(want["acc"])
                assert got.answer == (want["pred"] or None if want["pred"] != "[INVALID]" else None)
                cases += 1
    assert cases == 2 * 10 * 10


def test_grade_sees_correct_and_wrong() -> None:
    assert grade("aime_2024", "so \\boxed{204}", "204", 2).correct
    wrong = grade("aime_2024", "so \\boxed{205}", "204", 6)
    assert not wrong.correct and wrong.answer == "205" and wrong.score < 0


def test_the_specs_recipe_options_reach_the_scorer() -> None:
    padded = "\\boxed{ 204 }"
    assert not grade("aime_2024", padded, "204", 2).correct  # the recipe: inner whitespace counts
    assert grade("aime_2024", padded, "204", 2, options={"strip_answer": True, "answer_window": 100}).correct
    far = "\\boxed{204}" + " x" * 100
    assert not grade("aime_2024", far, "204", 2).correct
    assert grade("aime_2024", far, "204", 2, options={"answer_window": 400, "strip_answer": False}).correct
