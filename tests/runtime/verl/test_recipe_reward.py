"""The recipe's reward on the real AIME 2024 rows, called the way verl calls it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.data.rl_rows import aime_row
from runtime.verl.recipe import REWARD_FUNCTION, REWARD_MODULE
from runtime.verl.recipe.reward import compute_score, tool_calls_of

AIME = Path(__file__).resolve().parents[3] / "specs" / "data" / "aime_2024.jsonl"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = [json.loads(line) for line in AIME.read_text().splitlines() if line.strip()]
    return [aime_row(r, i, "aime_2024") for i, r in enumerate(lines)]


def _score(row: dict, response: str, num_turns: int | None = 2) -> dict:
    extra = dict(row["extra_info"], num_turns=num_turns)
    return compute_score(row["data_source"], response, row["reward_model"]["ground_truth"], extra)


def test_every_aime_answer_scores_plus_one_when_boxed(rows: list[dict]) -> None:
    assert len(rows) == 30
    for row in rows:
        truth = row["reward_model"]["ground_truth"]
        out = _score(row, f"Some reasoning.\nSo the answer is \\boxed{{{truth}}}.")
        assert out["score"] == 1.0 and out["acc"] == 1.0 and out["pred"] == truth


def test_wrong_answer_without_tools_scores_minus_one(rows: list[dict]) -> None:
    row = rows[0]
    wrong = str(int(row["reward_model"]["ground_truth"]) + 1)
    out = _score(row, f"The answer is \\boxed{{{wrong}}}", num_turns=2)
    assert out == {"score": -1.0, "acc": 0.0, "pred": wrong, "tool_calls": 0}


def test_wrong_answer_earns_a_tenth_per_tool_call_capped(rows: list[dict]) -> None:
    row = rows[1]
    assert _score(row, "\\boxed{0}", num_turns=4)["score"] == pytest.approx(-0.9)
    assert _score(row, "\\boxed{0}", num_turns=6)["score"] == pytest.approx(-0.8)
    assert _score(row, "no box at all", num_turns=8)["score"] == pytest.approx(-0.7)
    assert _score(row, "\\boxed{0}", num_turns=10)["score"] == pytest.approx(-0.6)
    assert _score(row, "\\boxed{0}", num_turns=30)["score"] == pytest.approx(-0.6)
    assert _score(row, "\\boxed{0}", num_turns=30)["tool_calls"] == 14


def test_correct_answer_with_tools_is_plain_plus_one(rows: list[dict]) -> None:
    row = rows[2]
    truth = row["reward_model"]["ground_truth"]
    assert _score(row, f"\\boxed{{{truth}}}", num_turns=8)["score"] == 1.0


def test_only_the_last_box_in_the_final_300_characters_counts(rows: list[dict]) -> None:
    row = rows[3]
    truth = row["reward_model"]["ground_truth"]
    assert _score(row, f"\\boxed{{{truth}}} then I changed my mind: \\boxed{{7}}")["score"] == -1.0
    assert _score(row, f"\\boxed{{7}} no wait \\boxed{{{truth}}}")["score"] == 1.0
    early = f"\\boxed{{{truth}}}" + " filler" * 60  # pushed out of the final 300 characters
    assert _score(row, early)["score"] == -1.0 and _score(row, early)["pred"] == ""


def test_box_contents_match_exactly_modulo_surrounding_spaces() -> None:
    assert compute_score("x", "\\boxed{ 204 }", "204")["score"] == 1.0
    assert compute_score("x", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")["score"] == 1.0
    assert compute_score("x", "\\boxed{204.0}", "204")["score"] == -1.0


def test_unknown_turn_count_gives_no_tool_bonus() -> None:
    assert compute_score("x", "\\boxed{1}", "2", extra_info={})["score"] == -1.0
    assert tool_calls_of(None) == 0 and tool_calls_of(2) == 0 and tool_calls_of(5) == 1


def test_verl_loads_it_from_the_config_it_is_rendered_with(rows: list[dict]) -> None:
    from omegaconf import OmegaConf

    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": REWARD_MODULE, "name": REWARD_FUNCTION, "reward_kwargs": {}}}}
    )
    fn = get_custom_reward_fn(config)
    row = rows[4]
    truth = row["reward_model"]["ground_truth"]
    # verl's reward manager passes keyword arguments only, num_turns inside extra_info.
    out = fn(data_source="aime_2024", solution_str=f"\\boxed{{{truth}}}", ground_truth=truth,
             extra_info={"num_turns": 4})
    assert out["score"] == 1.0
    out = fn(data_source="aime_2024", solution_str="\\boxed{x}", ground_truth=truth, extra_info={"num_turns": 4})
    assert out["score"] == pytest.approx(-0.9)
