"""The recipe's rules for a code_interpreter call (docs/recipe.md, "Tool behaviour": the recipe's
`CustomSandboxFusionTool.execute`), as pure functions.

1. If the model's `code` holds a ```python fence, only the first such block runs, with
   surrounding whitespace stripped: `re.findall(r"```python(.*?)```", code, re.DOTALL)[0].strip()`.
   Any other code (```py or bare fences included) is sent as it is. The spec option
   `recipe.lenient_fences` also takes the first ```py or bare ``` block when there is no
   ```python one.
2. From the last line up, lines equal to "" are skipped and the first other line is wrapped
   in `print(...)` unless it starts with `print`, so a trailing expression shows its value.
   The checks are on the raw line, as in the recipe: an indented or whitespace-only last line
   is wrapped too (and then fails to compile, or prints an empty line).
3. The model sees stdout + stderr when the sandbox's `run_result.status` is `Finished`
   (a non-zero exit included), and the fixed text `no stdout here` otherwise (time limit,
   sandbox fault, no answer).
"""

from __future__ import annotations

import re
from typing import Any

NO_OUTPUT = "no stdout here"

_PYTHON_FENCE = re.compile(r"```python(.*?)```", re.DOTALL)
# lenient_fences: a ```py or bare ``` fence line (nothing but spaces after the tag).
_OTHER_FENCE = re.compile(r"```(?:py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(code: str, *, lenient_fences: bool = False) -> str:
    """The first ```python block's body, stripped; or the code as given when there is none."""
    matches = _PYTHON_FENCE.findall(code)
    if matches:
        return matches[0].strip()
    if lenient_fences:
        other = _OTHER_FENCE.findall(code)
        if other:
            return other[0].strip()
    return code


def wrap_last_line(code: str) -> str:
    """Wrap the last line that is not "" in `print(...)` unless it already starts with `print`."""
    lines = code.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] == "":
            continue
        if not lines[i].startswith("print"):
            lines[i] = f"print({lines[i]})"
        break
    return "\n".join(lines)


def prepare_code(code: str, *, lenient_fences: bool = False) -> str:
    """What the sandbox runs for a model-written `code` argument."""
    return wrap_last_line(extract_code(code, lenient_fences=lenient_fences))


def code_argument(parameters: dict[str, Any]) -> str:
    """The `code` argument the way the recipe's tool reads it: a missing key raises KeyError and
    a value that is not a string TypeError, which verl's tool agent loop turns into the text
    the model sees (`Error executing tool 'code_interpreter': ...`)."""
    code = parameters["code"]
    if not isinstance(code, str):
        _PYTHON_FENCE.findall(code)  # raises the recipe's TypeError (its first use of `code`)
        raise TypeError(f"code must be a string, got {type(code).__name__}")  # bytes: unreachable from JSON
    return code


def observation(response: dict[str, Any] | None) -> str:
    """What the model sees of a SandboxFusion `/run_code` response."""
    run = (response or {}).get("run_result") or {}
    if run.get("status") != "Finished":
        return NO_OUTPUT
    return f"{run.get('stdout') or ''}{run.get('stderr') or ''}"
