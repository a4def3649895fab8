"""Math problems -> verl RL rows (docs/recipe.md, "RL rows").

One row per problem, in the shape verl's `RLHFDataset` and its `tool_agent` loop read:

- `prompt`: one user message, the problem followed by the recipe's answer-format line;
- `reward_model`: `{style: rule, ground_truth: str(answer)}` (the reward scores `\\boxed{}`
  against it);
- `data_source` (the reward function may branch on it), `ability`;
- `agent_name: tool_agent`, so verl runs the multi-turn tool agent loop on it;
- `extra_info`: `index` (verl copies it into the batch), `need_tools_kwargs` and
  `tools_kwargs` (`{code_interpreter: {create_kwargs: {ground_truth}}}`, what a stateful
  verl `BaseTool` receives in `create`; function tools ignore it), and the raw problem and
  answer for inspection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime.data.retool_sft import TOOL_NAME

ANSWER_FORMAT = "\nThe answer format must be: \\boxed{'The final answer goes here.'}"
AGENT_NAME = "tool_agent"


class RowFormatError(ValueError):
    """A source row that lacks the fields its dataset format needs."""


def to_rl_row(problem: str, answer: str, data_source: str, index: int) -> dict[str, Any]:
    """The verl RL row for one problem (`problem` is used verbatim, then the format line; the
    ground truth is `str(answer)` as the recipe writes it, whitespace included: the recipe's
    reward compares verbatim)."""
    truth = str(answer)
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": problem + ANSWER_FORMAT}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": truth},
        "agent_name": AGENT_NAME,
        "extra_info": {
            "index": int(index),
            "need_tools_kwargs": True,
            "tools_kwargs": {TOOL_NAME: {"create_kwargs": {"ground_truth": truth}}},
            "problem": problem,
            "answer": truth,
        },
    }


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def _field(row: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise RowFormatError(f"row has none of the fields {', '.join(names)} (it has {', '.join(sorted(row))})")


def _answer_of(row: Mapping[str, Any]) -> str:
    try:
        return str(_field(row, "answer", "Answer"))
    except RowFormatError:
        solution = str(_field(row, "solution", "Solution"))
        boxed = last_boxed(solution)
        if boxed is None:
            raise RowFormatError("row has no answer field and its solution has no \\boxed{...}") from None
        return boxed


def aime_row(row: Mapping[str, Any], index: int, data_source: str) -> dict[str, Any]:
    """AIME 2024/2025: `Problem`/`Answer` (Maxwell-Jia/AIME_2024), `problem`/`answer`
    (yentinglin/aime_2025), or `problem` with a `\\boxed{N}` `solution` (specs/data)."""
    return to_rl_row(str(_field(row, "problem", "Problem")), _answer_of(row), data_source, index)


def dapo_row(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """DAPO-Math-17k: its user prompt text is kept whole (as the recipe does) and the
    answer-format line appended; the ground truth comes from `reward_model`."""
    prompt = _field(row, "prompt")
    if isinstance(prompt, str):
        problem = prompt
    else:
        users = [m for m in list(prompt) if m.get("role") == "user"]
        if not users:
            raise RowFormatError("dapo_math row has no user message in `prompt`")
        problem = str(users[-1]["content"])
    reward = _field(row, "reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, Mapping) else None
    if truth is None:
        raise RowFormatError("dapo_math row has no reward_model.ground_truth")
    return to_rl_row(problem, str(truth), str(row.get("data_source") or "math_dapo"), index)


def rl_passthrough_row(row: Mapping[str, Any], index: int, default_source: str) -> dict[str, Any]:
    """Rows already in verl RL shape: `prompt` kept as is (no format line added),
    missing `agent_name`/`data_source` filled, `extra_info` normalised to ours."""
    prompt = _field(row, "prompt")
    if isinstance(prompt, str):
        raise RowFormatError("rl rows need `prompt` as a list of messages, not a string")
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(prompt)]
    reward = _field(row, "reward_model")
    truth = reward.get("ground_truth") if isinstance(reward, Mapping) else None
    if truth is None:
        raise RowFormatError("rl row has no reward_model.ground_truth")
    out = to_rl_row("", str(truth), str(row.get("data_source") or default_source), index)
    users = [m["content"] for m in messages if m["role"] == "user"]
    out["prompt"] = messages
    out["agent_name"] = str(row.get("agent_name") or AGENT_NAME)
    out["ability"] = str(row.get("ability") or "math")
    out["extra_info"]["problem"] = users[-1] if users else ""
    return out
