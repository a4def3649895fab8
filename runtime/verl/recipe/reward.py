"""The recipe's reward (docs/recipe.md, "Reward"), loaded by verl as
`reward.custom_reward_function.path=pkg://runtime.verl.recipe.reward`, `.name=compute_score`.

verl's reward manager calls `compute_score(data_source=, solution_str=, ground_truth=,
extra_info=)` per trajectory, plus the `reward.custom_reward_function.reward_kwargs` retool
renders (the spec's `recipe:` options); `solution_str` is the decoded response (assistant
turns and tool outputs), and `extra_info["num_turns"]` is the agent loop's turn count: 2 for
a single answer, +2 per tool call (assistant turn + tool turn).

By default this is the recipe's `retool.py` `compute_score`: verl's own
`math_dapo.compute_score(solution_str, ground_truth, strict_box_verify=True)` (the last
`\\boxed{...}` in the final 100 characters, compared verbatim: +1 / -1), then a wrong
answer earns the tool bonus `min(-0.6, score + (num_turns - 2) / 2 * 0.1)`. The options
(`answer_window`, `strip_answer`) change only how the answer is read, with the same verl
helpers; the bonus is the same.
"""

from __future__ import annotations

from typing import Any

from verl.utils.reward_score import math_dapo

RECIPE_WINDOW = 100  # math_dapo's strict box check reads the final 100 characters
TOOL_BONUS = 0.1
WRONG_CAP = -0.6


def tool_calls_of(num_turns: Any) -> int:
    """Tool calls in a trajectory from verl's turn count (0 when unknown)."""
    if num_turns is None:
        return 0
    return max(0, (int(num_turns) - 2) // 2)


def _read_answer(solution_str: str, ground_truth: str, window: int, strip: bool) -> dict[str, Any]:
    """math_dapo's strict box check with another window and/or whitespace stripping."""
    boxed = math_dapo.last_boxed_only_string(solution_str[-window:])
    pred = math_dapo.remove_boxed(boxed) if boxed is not None else None
    truth = ground_truth
    if strip:
        pred = pred.strip() if pred is not None else None
        truth = ground_truth.strip()
    correct = pred == truth
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
    answer_window: int = RECIPE_WINDOW,
    strip_answer: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """verl's custom reward entry point; `score` is the reward, the rest land in the logs."""
    if answer_window == RECIPE_WINDOW and not strip_answer:
        # verl 0.9.1 annotates math_dapo.compute_score `-> float`; it returns this dict.
        result: dict[str, Any] = math_dapo.compute_score(  # type: ignore[assignment]
            solution_str, ground_truth, strict_box_verify=True
        )
    else:
        result = _read_answer(solution_str, ground_truth, int(answer_window), bool(strip_answer))
    # The recipe reads extra_info["num_turns"] unconditionally; without it there is no bonus here.
    num_turns = (extra_info or {}).get("num_turns")
    if result["score"] < 0 and num_turns is not None:
        tool_call_reward = (num_turns - 2) / 2 * TOOL_BONUS
        result["score"] = min(WRONG_CAP, result["score"] + tool_call_reward)
    if result["pred"] is None:
        result["pred"] = ""
    result["tool_calls"] = tool_calls_of(num_turns)
    return result
