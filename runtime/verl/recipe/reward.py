"""The recipe's reward (RECIPE.md item 4), loaded by verl as
`reward.custom_reward_function.path=pkg://runtime.verl.recipe.reward`, `.name=compute_score`.

verl's reward manager calls `compute_score(data_source=, solution_str=, ground_truth=,
extra_info=)` per trajectory; `solution_str` is the decoded response (assistant turns and
tool outputs), and `extra_info["num_turns"]` is the agent loop's turn count: 2 for a single
answer, +2 per tool call (assistant turn + tool turn).

Score: the last `\\boxed{...}` in the final 300 characters, exact match to the ground truth
(surrounding whitespace ignored) -> +1, else -1. A wrong answer earns +0.1 per tool call,
capped at -0.6: `score = min(-0.6, score + (num_turns - 2) / 2 * 0.1)`.
"""

from __future__ import annotations

from typing import Any

from runtime.data.rl_rows import last_boxed

TAIL_CHARS = 300
TOOL_BONUS = 0.1
WRONG_CAP = -0.6


def tool_calls_of(num_turns: Any) -> int:
    """Tool calls in a trajectory from verl's turn count (0 when unknown)."""
    if num_turns is None:
        return 0
    return max(0, (int(num_turns) - 2) // 2)


def score_answer(solution_str: str, ground_truth: str, num_turns: Any = None) -> tuple[float, bool, str]:
    """(score, correct, extracted answer) for one response."""
    pred = last_boxed(solution_str[-TAIL_CHARS:])
    correct = pred is not None and pred == str(ground_truth).strip()
    if correct:
        return 1.0, True, pred or ""
    score = -1.0
    if num_turns is not None:
        score = min(WRONG_CAP, score + (int(num_turns) - 2) / 2 * TOOL_BONUS)
    return score, False, pred or ""


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    **_: Any,
) -> dict[str, Any]:
    """verl's custom reward entry point; `score` is the reward, the rest land in the logs."""
    num_turns = (extra_info or {}).get("num_turns")
    score, correct, pred = score_answer(solution_str, ground_truth, num_turns)
    return {"score": score, "acc": float(correct), "pred": pred, "tool_calls": tool_calls_of(num_turns)}
