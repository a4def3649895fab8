"""ReTool-SFT solution text -> chat messages with tool calls (docs/recipe.md, "SFT preprocessing").

A ReTool solution interleaves prose with `<code>` blocks, the `<interpreter>` output of each,
and a final `<answer>`. It becomes:

- the user turn (the question);
- per `<code>` block, an assistant message holding the prose before it as `content` and one
  `code_interpreter` tool call whose `arguments` is `{"code": ...}` (a dict, not a JSON string:
  the chat template serialises it, and parquet stores it as a struct). The code follows the
  recipe's preprocessing: the block's first ```python fence, its body stripped, else the block
  verbatim; `lenient_fences` (the dataset option) unwraps a ```py or bare fence too and strips
  the code always;
- per `<interpreter>` block, a `tool` message;
- the `<answer>` block as the final assistant message, tags removed (prose around it kept);
- a solution without `<answer>` ends with its trailing prose as the final assistant message.
"""

from __future__ import annotations

import re
from typing import Any

from runtime.verl.recipe.code import extract_code

TOOL_NAME = "code_interpreter"

# The tool schema rendered into the system prompt (OpenAI function format, as verl expects):
# the recipe's (its sandbox_fusion_tool_config.yaml `tool_schema`, which its SFT preprocessing
# also writes into the `tools` column), used for the SFT data and by the RL tool alike.
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": "A tool for executing code.",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "description": "The code to execute."},
                },
                "required": ["code"],
            },
        },
    }
]

# The marker the original ReTool-SFT rows put before the question inside their long user turn.
QUESTION_MARKER = "*user question:*"

_PYTHON_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n?(.*?)```", re.DOTALL)
_TAG = re.compile(r"<(code|interpreter|answer)>(.*?)</\1>", re.DOTALL)


class SolutionFormatError(ValueError):
    """A solution text whose tags are not in the ReTool layout."""


def strip_fences(code: str) -> str:
    """`lenient_fences`: the first fenced block's body (```python, ```py or bare) if the code is
    fenced, else the code itself; trimmed either way."""
    match = _PYTHON_FENCE.search(code)
    return (match.group(1) if match else code).strip()


def code_of(block: str, *, lenient_fences: bool = False) -> str:
    """The tool call's code for a `<code>` block's text: the recipe's rule (its SFT preprocessing
    applies the tool's: the first ```python block, stripped, else the text as it is), or
    `strip_fences` with the option."""
    return strip_fences(block) if lenient_fences else extract_code(block)


def tool_call(code: str) -> dict[str, Any]:
    """One `code_interpreter` call in the chat-message format."""
    return {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"code": code}}}


def extract_question(user_content: str) -> str:
    """The question from an original ReTool-SFT user turn (text after the marker, if any)."""
    i = user_content.find(QUESTION_MARKER)
    question = user_content[i + len(QUESTION_MARKER):] if i != -1 else user_content
    return question.replace("<answer>", "").replace("</answer>", "").strip()


def convert_solution(question: str, solution_text: str, *, lenient_fences: bool = False) -> list[dict[str, Any]]:
    """Messages for one ReTool solution: user, (assistant+call, tool)*, final assistant."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question.strip()}]
    pending = ""  # prose seen since the last tag; it belongs to the next assistant message
    expect_tool = False
    pos = 0
    for match in _TAG.finditer(solution_text):
        tag, body = match.group(1), match.group(2)
        pending += solution_text[pos:match.start()]
        pos = match.end()
        if tag == "code":
            if expect_tool:
                raise SolutionFormatError("a <code> block follows another without an <interpreter> in between")
            messages.append({"role": "assistant", "content": pending.strip(), "tool_calls": [tool_call(code_of(body, lenient_fences=lenient_fences))]})
            expect_tool = True
        elif tag == "interpreter":
            if not expect_tool:
                raise SolutionFormatError("an <interpreter> block without a <code> block before it")
            if pending.strip():
                raise SolutionFormatError("text between </code> and <interpreter>")
            messages.append({"role": "tool", "content": body.strip()})
            expect_tool = False
        else:
            if expect_tool:
                raise SolutionFormatError("<answer> follows a <code> block that has no <interpreter>")
            # Prose after </answer> (rare) stays with the answer rather than being dropped.
            messages.append({"role": "assistant", "content": (pending + body + solution_text[pos:]).strip()})
            return messages
        pending = ""
    tail = (pending + solution_text[pos:]).strip()
    if expect_tool:
        raise SolutionFormatError("the solution ends after a <code> block without its <interpreter>")
    if not tail:
        raise SolutionFormatError("the solution has no <answer> and no final text")
    messages.append({"role": "assistant", "content": tail})
    return messages


def solution_text(prose: str, code: str, output: str, answer_text: str) -> str:
    """A one-call ReTool solution in the original tag layout (used by the builtin generator)."""
    return (
        f"{prose}\n<code>\n```python\n{code}\n```\n</code>\n"
        f"<interpreter>\n{output}\n</interpreter>\n"
        f"<answer>\n{answer_text}\n</answer>"
    )
