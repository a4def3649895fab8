"""The tool-call check: parsing hermes calls, held-out prompts, greedy decoding of a real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.data.problems import generate, is_heldout
from runtime.data.retool_sft import TOOLS
from runtime.toolcheck import heldout_prompts, parse_tool_call, tool_call_rate


def call(name: str = "code_interpreter", arguments: object = None) -> str:
    args = {"code": "print(1 + 2)"} if arguments is None else arguments
    return "Let me compute.\n<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        (call(), ""),
        (call(arguments=json.dumps({"code": "x = 2\nprint(x)"})), ""),
        ("The answer is 3.", "no <tool_call>"),
        ("<tool_call>\n{\"name\": \"code_interpreter\"", "no </tool_call>"),
        ("<tool_call>{name: code_interpreter}</tool_call>", "call is not JSON"),
        ("<tool_call>[1, 2]</tool_call>", "call is not a JSON object"),
        (call(name="python"), "name is 'python'"),
        (call(arguments=["print(1)"]), "arguments is not an object"),
        (call(arguments={"code": "  "}), "arguments.code is not a non-empty string"),
        (call(arguments={"code": "print(1 + )"}), "code does not compile"),
    ],
)
def test_parse_tool_call(completion: str, reason: str) -> None:
    got = parse_tool_call(completion)
    assert got == "" if reason == "" else got.startswith(reason), got


def test_heldout_prompts_are_deterministic_distinct_and_never_in_training_sets() -> None:
    prompts = heldout_prompts(50, seed=0)
    assert prompts == heldout_prompts(50, seed=0)
    texts = [p[0]["content"] for p in prompts]
    assert len(set(texts)) == 50 and all(p[0]["role"] == "user" for p in prompts)
    problems = [t.split("\n")[0] for t in texts]
    assert all(is_heldout(t) for t in problems)
    training = {p.text for seed in (0, 1, 2) for p in generate(2000, seed)}
    assert not training & set(problems)


def test_untrained_model_makes_no_tool_calls(tiny_model_dir: Path) -> None:
    prompts = heldout_prompts(6, seed=3)
    result = tool_call_rate(tiny_model_dir, prompts, TOOLS, max_new_tokens=24, batch_size=4)
    assert (result.n, result.ok, result.rate) == (6, 0, 0.0)
    assert result.examples and all(not e.ok and e.reason for e in result.examples)
    assert [e.prompt for e in result.examples] == [p[0]["content"] for p in prompts][: len(result.examples)]


# The learnability claim (≥ 80% well-formed tool calls after the tiny spec's SFT) is asserted
# through the real pipeline — verl's trainer, the merge, this check — in tests/e2e/test_tiny_spec_e2e.py.
