"""Grading: the recipe's own scorer, called exactly as verl's reward manager calls it in RL.

verl decodes the whole response (assistant turns and tool outputs, special tokens skipped)
and calls `compute_score(data_source=, solution_str=, ground_truth=, extra_info=)` with
`extra_info["num_turns"]` from the agent loop. The eval stage does the same, so an eval
sample is correct exactly when RL would have rewarded it as correct; nothing of the
scorer is restated here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Grade(BaseModel):
    model_config = ConfigDict(frozen=True)

    correct: bool
    score: float
    answer: str | None


def grade(
    data_source: str, response: str, ground_truth: str, num_turns: int, *, options: dict[str, Any] | None = None,
) -> Grade:
    """The recipe's verdict on one decoded response; `options` are the spec's `recipe:`
    reward options (`answer_window`, `strip_answer`), passed as RL passes them."""
    from runtime.verl.recipe.reward import compute_score

    result: Any = compute_score(
        data_source=data_source, solution_str=response, ground_truth=ground_truth,
        extra_info={"num_turns": num_turns}, **(options or {}),
    )
    if isinstance(result, dict):
        score = float(result["score"])
        correct = bool(result.get("acc", score > 0))
        pred = result.get("pred")
    else:  # a bare number: positive is correct
        score, correct, pred = float(result), float(result) > 0, None
    answer = str(pred) if pred not in (None, "", "[INVALID]") else None
    return Grade(correct=correct, score=score, answer=answer)
