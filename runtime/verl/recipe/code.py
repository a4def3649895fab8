"""The recipe's rules for a code_interpreter call (RECIPE.md, "Tool behaviour in the recipe").

1. If the model's `code` argument holds a fenced ```python block, only the first one runs.
2. If the last non-empty line does not start with `print`, it is wrapped in `print(...)`,
   so a trailing expression shows its value the way a notebook cell would. The check is on
   the raw line, as in the recipe: an indented last line is wrapped too (and then fails to
   compile, which the model sees as a traceback).
3. The model sees stdout + stderr when the sandbox's `run_result.status` is `Finished`
   (a non-zero exit included), and the fixed text `no stdout here` otherwise (time limit,
   sandbox fault, no run result).
"""

from __future__ import annotations

import re
from typing import Any

NO_OUTPUT = "no stdout here"

# ```python / ```py / ``` fences; the body is everything up to the next closing fence.
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)\n?```", re.DOTALL)


def extract_code(code: str) -> str:
    """The body of the first fenced python block, or the code as given when there is none."""
    match = _FENCE.search(code)
    return match.group(1) if match else code


def wrap_last_line(code: str) -> str:
    """Wrap the last non-empty line in `print(...)` unless it already starts with `print`."""
    lines = code.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip() == "":
            continue
        if not lines[i].startswith("print"):
            lines[i] = f"print({lines[i]})"
        break
    return "\n".join(lines)


def prepare_code(code: str) -> str:
    """What the sandbox runs for a model-written `code` argument."""
    return wrap_last_line(extract_code(code))


def observation(response: dict[str, Any] | None) -> str:
    """What the model sees of a SandboxFusion `/run_code` response."""
    run = (response or {}).get("run_result") or {}
    if run.get("status") != "Finished":
        return NO_OUTPUT
    return f"{run.get('stdout') or ''}{run.get('stderr') or ''}"
