"""Math problems -> verl RL rows (docs/recipe.md, "RL rows")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.data.rl_rows import (
    ANSWER_FORMAT,
    RowFormatError,
    aime_row,
    dapo_row,
    last_boxed,
    rl_passthrough_row,
    to_rl_row,
)

REPO = Path(__file__).resolve().parents[3]


def test_to_rl_row_shape() -> None:
    # the ground truth is str(answer) as the recipe writes it: its reward compares verbatim
    assert to_rl_row("What is 1+1?", " 2 ", "aime_2024", 7) == {
        "data_source": "aime_2024",
        "prompt": [
            {"role": "user", "content": "What is 1+1?\nThe answer format must be: \\boxed{'The final answer goes here.'}"}
        ],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": " 2 "},
        "agent_name": "tool_agent",
        "extra_info": {
            "index": 7,
            "need_tools_kwargs": True,
            "tools_kwargs": {"code_interpreter": {"create_kwargs": {"ground_truth": " 2 "}}},
            "problem": "What is 1+1?",
            "answer": " 2 ",
        },
    }


def test_aime_2024_hugging_face_fields() -> None:
    row = aime_row({"ID": "2024-I-1", "Problem": "Find x.", "Solution": "long text", "Answer": 204}, 0, "aime_2024")
    assert row["reward_model"]["ground_truth"] == "204"
    assert row["prompt"][0]["content"] == "Find x." + ANSWER_FORMAT


def test_aime_2025_fields() -> None:
    row = aime_row({"problem": "Find y.", "answer": "70"}, 3, "aime_2025")
    assert (row["data_source"], row["reward_model"]["ground_truth"], row["extra_info"]["index"]) == ("aime_2025", "70", 3)


def test_local_aime_2024_jsonl_answers_come_from_boxed_solutions() -> None:
    lines = (REPO / "specs" / "data" / "aime_2024.jsonl").read_text().splitlines()
    rows = [aime_row(json.loads(line), i, "aime_2024") for i, line in enumerate(lines)]
    assert len(rows) == 30
    assert rows[0]["reward_model"]["ground_truth"] == "204"  # AIME 2024 I problem 1
    assert all(r["reward_model"]["ground_truth"].isdigit() for r in rows)


def test_dapo_row_keeps_prompt_text_and_appends_format() -> None:
    source = {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Solve the following math problem step by step. What is 6*7?"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": "a0f3-uuid"},
    }
    row = dapo_row(source, 5)
    assert row["prompt"] == [
        {"role": "user", "content": "Solve the following math problem step by step. What is 6*7?" + ANSWER_FORMAT}
    ]
    assert (row["data_source"], row["reward_model"]["ground_truth"], row["extra_info"]["index"]) == ("math_dapo", "42", 5)


def test_rl_passthrough_keeps_prompt_and_fills_defaults() -> None:
    row = rl_passthrough_row(
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         "reward_model": {"ground_truth": 4}},
        2, "mine",
    )
    assert row["prompt"][1] == {"role": "user", "content": "2+2?"}
    assert (row["data_source"], row["agent_name"], row["reward_model"]["ground_truth"]) == ("mine", "tool_agent", "4")


@pytest.mark.parametrize(
    "row",
    [{"Problem": "x"}, {"problem": "x", "solution": "no box here"}, {"answer": "1"}],
)
def test_aime_rows_without_problem_or_answer_raise(row: dict) -> None:
    with pytest.raises(RowFormatError):
        aime_row(row, 0, "aime_2024")


def test_dapo_row_without_ground_truth_raises() -> None:
    with pytest.raises(RowFormatError):
        dapo_row({"prompt": [{"role": "user", "content": "x"}], "reward_model": {}}, 0)


def test_last_boxed_handles_nesting_and_takes_the_last() -> None:
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("none") is None
    assert last_boxed("\\boxed{unclosed") is None
