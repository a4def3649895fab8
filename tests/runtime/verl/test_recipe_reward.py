"""The reward is the recipe's: same scores as the recipe's `compute_score` on generated
responses, and on the real AIME 2024 rows, called the way verl calls it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runtime.data.rl_rows import aime_row
from runtime.verl.recipe import REWARD_FUNCTION, REWARD_MODULE
from runtime.verl.recipe.reward import compute_score, tool_calls_of
from verl.utils.reward_score import math_dapo

AIME = Path(__file__).resolve().parents[3] / "specs" / "data" / "aime_2024.jsonl"


def recipe_compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict, **kwargs: Any) -> dict:
    """The recipe's `retool.py` `compute_score` (verl-recipe retool/, verl v0.6.1), line for line."""
    result = math_dapo.compute_score(solution_str, ground_truth, strict_box_verify=True)
    num_turns = extra_info["num_turns"]
    if result["score"] < 0:
        tool_call_reward = (num_turns - 2) / 2 * 0.1
        result["score"] = min(-0.6, result["score"] + tool_call_reward)
    if result["pred"] is None:
        result["pred"] = ""
    return result


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = [json.loads(line) for line in AIME.read_text().splitlines() if line.strip()]
    return [aime_row(r, i, "aime_2024") for i, r in enumerate(lines)]


def _filler(n: int) -> str:
    text = " and so the computation above is complete, double-checked with the code output."
    return (text * (n // len(text) + 1))[:n]


def generated_responses(truths: list[str]) -> list[tuple[str, str]]:
    """(response, ground truth) pairs: the answer at many distances from the end, inner
    whitespace, nested and multiple boxes, malformed and missing boxes, tool output around it."""
    out: list[tuple[str, str]] = []
    for i, truth in enumerate(truths):
        wrong = str(int(truth) + 1) if truth.isdigit() else truth + "1"
        for tail in (0, 1, 17, 60, 85, 92, 93, 94, 99, 100, 101, 120, 200, 290, 299, 300, 301, 500):
            box = f"\\boxed{{{truth}}}"
            out.append((f"Reasoning for problem {i}.\n{box}{_filler(tail)}", truth))
        out += [
            (f"The answer is \\boxed{{ {truth} }}.", truth),
            (f"The answer is \\boxed{{{truth} }}", truth),
            (f"The answer is \\boxed{{\n{truth}\n}}", truth),
            (f"\\boxed{{{truth}}} then I changed my mind: \\boxed{{{wrong}}}", truth),
            (f"\\boxed{{{wrong}}} no wait, \\boxed{{{truth}}}", truth),
            (f"\\boxed{{{truth}}}" + _filler(150) + f"\\boxed{{{wrong}}}", truth),
            (f"\\boxed{{\\boxed{{{truth}}}}}", truth),
            (f"\\boxed{{\\text{{{truth}}}}}", truth),
            (f"\\boxed{{{truth}", truth),
            (f"boxed{{{truth}}}", truth),
            (f"\\fbox{{{truth}}}", truth),
            (f"The answer is {truth}.", truth),
            ("", truth),
            (f"<tool_response>\n{truth}\n</tool_response>\nSo \\boxed{{{truth}}}", truth),
            (f"\\boxed{{{truth}}}\n<|im_end|>", truth),
        ]
    out += [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("so \\boxed{\\frac12}", "\\frac{1}{2}"),
        ("so \\boxed{x^2 + 1}", "x^2+1"),
        ("so \\boxed{x^2+1}", "x^2+1"),
        ("so \\boxed{204.0}", "204"),
        ("so \\boxed{0204}", "204"),
    ]
    return out


def test_scores_match_the_recipes_on_generated_responses(rows: list[dict]) -> None:
    truths = [r["reward_model"]["ground_truth"] for r in rows[:10]]
    cases = generated_responses(truths)
    compared = outcomes = 0
    seen_scores: set[float] = set()
    for n, (response, truth) in enumerate(cases):
        # every turn count 0..40 for the first responses, then a cycling one for the rest
        turns = range(41) if n < 40 else [n % 41]
        for num_turns in turns:
            want = recipe_compute_score("aime_2024", response, truth, {"num_turns": num_turns})
            got = compute_score(data_source="aime_2024", solution_str=response, ground_truth=truth,
                                extra_info={"num_turns": num_turns})
            assert {k: got[k] for k in want} == want, (response, truth, num_turns)
            assert type(got["score"]) is type(want["score"])
            compared += 1
            outcomes += want["score"] == 1.0
            seen_scores.add(round(want["score"], 6))
    assert len(cases) >= 200 and compared == 40 * 41 + len(cases) - 40
    # the generated set exercises every branch: correct, wrong at each bonus level, capped, no box
    assert outcomes > 100 and {1.0, -1.1, -1.0, -0.9, -0.8, -0.7, -0.6} <= seen_scores


def test_the_recipes_window_and_raw_comparison() -> None:
    """The examples that differ from a 300-character, whitespace-stripping reader."""
    far = "\\boxed{204}" + _filler(120)
    assert compute_score("x", far, "204", {"num_turns": 2})["score"] == -1.0
    assert compute_score("x", "\\boxed{ 204 }", "204", {"num_turns": 2})["score"] == -1.0
    assert compute_score("x", "\\boxed{ 204 }", "204", {"num_turns": 2})["pred"] == " 204 "


def test_options_widen_the_window_and_strip_whitespace() -> None:
    far = "\\boxed{204}" + _filler(120)
    assert compute_score("x", far, "204", {"num_turns": 2}, answer_window=300)["score"] == 1.0
    assert compute_score("x", far, "204", {"num_turns": 2}, answer_window=300)["acc"] is True
    assert compute_score("x", "\\boxed{ 204 }", "204", {"num_turns": 2}, strip_answer=True)["score"] == 1.0
    assert compute_score("x", "\\boxed{ 204 }", "204", {"num_turns": 2}, strip_answer=True)["pred"] == "204"
    # a wrong answer still earns the recipe's tool bonus, capped
    assert compute_score("x", "\\boxed{7}", "204", {"num_turns": 6}, strip_answer=True)["score"] == pytest.approx(-0.8)
    assert compute_score("x", "no box", "204", {"num_turns": 40}, answer_window=300) == {
        "score": -0.6, "acc": False, "pred": "", "tool_calls": 19,
    }


def test_every_aime_answer_scores_plus_one_when_boxed(rows: list[dict]) -> None:
    assert len(rows) == 30
    for row in rows:
        truth = row["reward_model"]["ground_truth"]
        out = compute_score(row["data_source"], f"Some reasoning.\nSo the answer is \\boxed{{{truth}}}.", truth,
                            dict(row["extra_info"], num_turns=2))
        assert out["score"] == 1.0 and out["acc"] is True and out["pred"] == truth


def test_unknown_turn_count_gives_no_tool_bonus() -> None:
    assert compute_score("x", "\\boxed{1}", "2", extra_info={})["score"] == -1.0
    assert tool_calls_of(None) == 0 and tool_calls_of(2) == 0 and tool_calls_of(5) == 1


def test_verl_loads_it_from_the_config_it_is_rendered_with(rows: list[dict]) -> None:
    from omegaconf import OmegaConf

    from verl.trainer.ppo.reward import get_custom_reward_fn

    def loaded(kwargs: dict):
        config = OmegaConf.create({"reward": {"custom_reward_function": {
            "path": REWARD_MODULE, "name": REWARD_FUNCTION, "reward_kwargs": kwargs}}})
        return get_custom_reward_fn(config)

    truth = rows[4]["reward_model"]["ground_truth"]
    fn = loaded({})
    # verl's reward manager passes keyword arguments only, num_turns inside extra_info.
    out = fn(data_source="aime_2024", solution_str=f"\\boxed{{{truth}}}", ground_truth=truth, extra_info={"num_turns": 4})
    assert out["score"] == 1.0
    out = fn(data_source="aime_2024", solution_str="\\boxed{x}", ground_truth=truth, extra_info={"num_turns": 4})
    assert out["score"] == pytest.approx(-0.9)
    # the spec's recipe options arrive as reward_kwargs (runtime.verl.rl renders them)
    spaced = f"\\boxed{{ {truth} }}"
    assert fn(data_source="a", solution_str=spaced, ground_truth=truth, extra_info={"num_turns": 2})["score"] == -1.0
    stripping = loaded({"strip_answer": True})
    assert stripping(data_source="a", solution_str=spaced, ground_truth=truth, extra_info={"num_turns": 2})["score"] == 1.0
