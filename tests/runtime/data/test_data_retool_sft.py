"""ReTool-SFT solution text -> chat messages (docs/recipe.md, "SFT preprocessing")."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.data.retool_sft import (
    TOOLS,
    SolutionFormatError,
    code_of,
    convert_solution,
    extract_question,
    solution_text,
    strip_fences,
    tool_call,
)

TWO_CALLS = """We need the sum of squares first.
<code>
```python
s = sum(i * i for i in range(10))
print(s)
```
</code>
<interpreter>
285
</interpreter>
Now check divisibility by 7.
<code>
print(285 % 7)
</code>
<interpreter>
5
</interpreter>
So the remainder is 5.
<answer>
\\boxed{5}
</answer>"""


def test_two_calls_become_alternating_assistant_and_tool_messages() -> None:
    assert convert_solution("  What is it?\n", TWO_CALLS) == [
        {"role": "user", "content": "What is it?"},
        {
            "role": "assistant",
            "content": "We need the sum of squares first.",
            "tool_calls": [tool_call("s = sum(i * i for i in range(10))\nprint(s)")],
        },
        {"role": "tool", "content": "285"},
        # unfenced code is kept verbatim, newlines included, as the recipe's preprocessing does
        {"role": "assistant", "content": "Now check divisibility by 7.", "tool_calls": [tool_call("\nprint(285 % 7)\n")]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "So the remainder is 5.\n\n\\boxed{5}"},
    ]


def test_tool_call_shape_is_openai_function_with_dict_arguments() -> None:
    assert tool_call("print(1)") == {
        "type": "function",
        "function": {"name": "code_interpreter", "arguments": {"code": "print(1)"}},
    }


def test_tools_schema_has_one_required_string_parameter_code() -> None:
    (tool,) = TOOLS
    assert tool["type"] == "function"
    assert tool["function"]["name"] == "code_interpreter"
    params = tool["function"]["parameters"]
    assert params["required"] == ["code"]
    assert params["properties"]["code"]["type"] == "string"


def test_answer_only_solution_is_one_assistant_message() -> None:
    assert convert_solution("Q", "Easy. <answer>\\boxed{3}</answer>") == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "Easy. \\boxed{3}"},
    ]


def test_missing_answer_keeps_trailing_prose_as_final_message() -> None:
    messages = convert_solution("Q", "<code>print(2)</code><interpreter>2</interpreter>It is 2.")
    assert messages[-1] == {"role": "assistant", "content": "It is 2."}
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]


@pytest.mark.parametrize(
    "text",
    [
        "<code>print(1)</code><answer>1</answer>",  # code without interpreter before the answer
        "<interpreter>1</interpreter><answer>1</answer>",  # interpreter without code
        "<code>print(1)</code><code>print(2)</code>",  # two codes in a row
        "<code>print(1)</code>",  # ends after a code block
        "<code>print(1)</code><interpreter>1</interpreter>",  # nothing after the last output
    ],
)
def test_malformed_solutions_raise(text: str) -> None:
    with pytest.raises(SolutionFormatError):
        convert_solution("Q", text)


def test_code_follows_the_recipes_fence_rule_unless_lenient() -> None:
    """The recipe's SFT preprocessing: the first ```python block's body, stripped; any other
    code (```py and bare fences included) verbatim. `lenient_fences` unwraps those too."""
    cases = {
        "\n```python\nx = 1\nprint(x)\n```\n": ("x = 1\nprint(x)", "x = 1\nprint(x)"),
        "\n```py\nprint(1)\n```\n": ("\n```py\nprint(1)\n```\n", "print(1)"),
        "```\nprint(2)\n```": ("```\nprint(2)\n```", "print(2)"),
        "  print(3)  \n": ("  print(3)  \n", "print(3)"),
        "```\nbare()\n```\n```python\nfirst_python()\n```": ("first_python()", "bare()"),
    }
    for block, (recipe, lenient) in cases.items():
        assert code_of(block) == recipe, block
        assert code_of(block, lenient_fences=True) == lenient, block
    text = "Try.\n<code>\n```py\nprint(1)\n```\n</code>\n<interpreter>\n1\n</interpreter>\n<answer>1</answer>"
    assert convert_solution("Q", text)[1]["tool_calls"] == [tool_call("\n```py\nprint(1)\n```\n")]
    assert convert_solution("Q", text, lenient_fences=True)[1]["tool_calls"] == [tool_call("print(1)")]


def test_strip_fences() -> None:
    assert strip_fences("\n```python\nx = 1\nprint(x)\n```\n") == "x = 1\nprint(x)"
    assert strip_fences("```\nprint(2)\n```") == "print(2)"
    assert strip_fences("  print(3)  ") == "print(3)"


def test_extract_question_from_retool_sft_user_turn() -> None:
    content = "Solve with tools. Put the final answer in <answer></answer>.\n*user question:*\nWhat is 2+2?<answer></answer>"
    assert extract_question(content) == "What is 2+2?"
    assert extract_question("Plain question?") == "Plain question?"


prose = st.text(alphabet=st.characters(blacklist_characters="<>`", blacklist_categories=("Cs",)), min_size=1).filter(
    lambda s: s.strip() != ""
)


@given(prose, prose, prose, prose)
def test_generated_solution_round_trips(question: str, intro: str, code: str, output: str) -> None:
    messages = convert_solution(question, solution_text(intro, code, output, "\\boxed{1}"))
    assert messages[0] == {"role": "user", "content": question.strip()}
    assert messages[1]["content"] == intro.strip()
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"code": code.strip()}
    assert messages[2] == {"role": "tool", "content": output.strip()}
    assert messages[3] == {"role": "assistant", "content": "\\boxed{1}"}
