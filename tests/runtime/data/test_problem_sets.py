"""The builtin problem sets: what `fixed_shape` guarantees, the held-out option, and that
the spec's names and the generator's sets agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pyarrow.parquet as pq
import pytest

from reconciler.spec import Dataset, ProblemSet, ToolCallCheck
from runtime.data import prepare
from runtime.data.builtin import GeneratorOptions, problems_for
from runtime.data.problems import PROBLEM_SETS, generate, is_heldout
from runtime.toolcheck import heldout_prompts

SPEC_DIR = Path(__file__).resolve().parents[3] / "specs"
FIXED = re.compile(r"^What is ([1-9][0-9]) ([+*]) ([1-9][0-9])\?$")


def test_the_spec_names_exactly_the_generator_sets() -> None:
    assert set(get_args(ProblemSet)) == set(PROBLEM_SETS)
    assert ToolCallCheck().problems == "mixed" and GeneratorOptions().problems == "mixed"


def test_fixed_shape_problems_have_two_digit_operands_and_a_three_digit_answer() -> None:
    problems = generate(500, seed=3, problems="fixed_shape")
    assert len({p.text for p in problems}) == 500
    for p in problems:
        m = FIXED.match(p.text)
        assert m is not None, p.text
        a, op, b = int(m[1]), m[2], int(m[3])
        assert p.code == f"print({a} {op} {b})" and p.answer == (a + b if op == "+" else a * b)
        assert 100 <= p.answer <= 999
    # every copied number sits at the same place: the texts differ only in their digits and operator
    assert len({re.sub(r"[0-9+*]", "#", p.text) for p in problems}) == 1


def test_fixed_shape_is_its_own_set_and_asks_for_no_more_than_it_holds() -> None:
    assert not {p.template for p in generate(50, seed=0, problems="fixed_shape")} & {p.template for p in generate(50, seed=0)}
    assert len(generate(5556, seed=0, problems="fixed_shape")) == 5556  # the whole training bucket
    with pytest.raises(ValueError, match="distinct problems"):
        generate(5557, seed=0, problems="fixed_shape")


@pytest.mark.parametrize("problems", ["mixed", "fixed_shape"])
def test_heldout_rows_are_never_training_rows(tmp_path: Path, problems: str) -> None:
    options = {"rows": 64, "seed": 7, "problems": problems}
    test = prepare("t", Dataset(source="builtin:tiny_math", format="rl", options={**options, "heldout": True}), tmp_path / "t", SPEC_DIR)
    texts = [r["prompt"][0]["content"] for r in pq.read_table(test.path).to_pylist()]
    assert len(set(texts)) == 64
    held = problems_for(GeneratorOptions.model_validate({**options, "heldout": True}))
    assert all(is_heldout(p.text) for p in held) and all(t.startswith(p.text) for t, p in zip(texts, held))
    train = problems_for(GeneratorOptions.model_validate({**options, "rows": 4000}))
    assert not {p.text for p in held} & {p.text for p in train}


def test_the_tool_call_check_asks_problems_of_the_set_it_names() -> None:
    prompts = heldout_prompts(20, seed=0, problems="fixed_shape")
    assert all(FIXED.match(p[0]["content"].split("\n")[0].strip()) for p in prompts), prompts[0]
    assert heldout_prompts(20, seed=0) != prompts
