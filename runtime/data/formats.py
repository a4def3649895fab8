"""Source rows -> output rows for each dataset `format`, and the parquet schema of each kind.

Two kinds of output:
- `sft` (formats `retool_sft`, `messages`): columns `messages` and `tools`, what verl's
  `MultiTurnSFTDataset` reads (`data.messages_key=messages`, `data.tools_key=tools`).
  Messages are parquet structs (`tool_calls[].function.arguments` a struct with `code`),
  so pandas hands verl dicts, which the chat template serialises with `tojson`.
- `rl` (formats `dapo_math`, `aime_2024`, `aime_2025`, `rl`): verl RL rows (`rl_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from runtime.data.retool_sft import TOOLS, SolutionFormatError, convert_solution, extract_question, tool_call
from runtime.data.rl_rows import RowFormatError, aime_row, dapo_row, rl_passthrough_row

Kind = Literal["sft", "rl"]
SFT_FORMATS: tuple[str, ...] = ("retool_sft", "messages")
RL_FORMATS: tuple[str, ...] = ("dapo_math", "aime_2024", "aime_2025", "rl")


def kind_of(fmt: str) -> Kind:
    if fmt in SFT_FORMATS:
        return "sft"
    if fmt in RL_FORMATS:
        return "rl"
    raise ValueError(f"unknown dataset format {fmt!r}")


def schema(kind: Kind) -> Any:
    """The pyarrow schema of an output kind (explicit, so every file has the same types)."""
    import pyarrow as pa

    if kind == "sft":
        call = pa.struct(
            [
                ("type", pa.string()),
                ("function", pa.struct([("name", pa.string()), ("arguments", pa.struct([("code", pa.string())]))])),
            ]
        )
        message = pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_calls", pa.list_(call))])
        prop = pa.struct([("type", pa.string()), ("description", pa.string())])
        params = pa.struct(
            [("type", pa.string()), ("properties", pa.struct([("code", prop)])), ("required", pa.list_(pa.string()))]
        )
        tool = pa.struct(
            [
                ("type", pa.string()),
                ("function", pa.struct([("name", pa.string()), ("description", pa.string()), ("parameters", params)])),
            ]
        )
        return pa.schema([("messages", pa.list_(message)), ("tools", pa.list_(tool))])
    chat = pa.struct([("role", pa.string()), ("content", pa.string())])
    tools_kwargs = pa.struct(
        [("code_interpreter", pa.struct([("create_kwargs", pa.struct([("ground_truth", pa.string())]))]))]
    )
    extra = pa.struct(
        [
            ("index", pa.int64()),
            ("need_tools_kwargs", pa.bool_()),
            ("tools_kwargs", tools_kwargs),
            ("problem", pa.string()),
            ("answer", pa.string()),
        ]
    )
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(chat)),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            ("agent_name", pa.string()),
            ("extra_info", extra),
        ]
    )


# --------------------------------------------------------------------------- SFT


def retool_sft_row(row: Mapping[str, Any], *, lenient_fences: bool = False) -> dict[str, Any]:
    """One ReTool-SFT source row -> messages+tools.

    Accepts the Hugging Face layout (`messages`: a user turn holding the question after
    `*user question:*`, then one assistant turn with the tagged solution) or plain
    `question`/`problem` + `solution`/`response` text columns. `lenient_fences` as in
    runtime.data.retool_sft.code_of.
    """
    if "messages" in row and row["messages"] is not None:
        turns = list(row["messages"])
        user = next((m for m in turns if m.get("role") == "user"), None)
        assistant = next((m for m in turns if m.get("role") == "assistant"), None)
        if user is None or assistant is None:
            raise RowFormatError("ReTool-SFT row needs a user and an assistant message")
        question, solution = extract_question(str(user["content"])), str(assistant["content"])
    else:
        question = _first(row, "question", "problem", "prompt")
        solution = _first(row, "solution", "response")
    return {"messages": convert_solution(question, solution, lenient_fences=lenient_fences), "tools": TOOLS}


def _first(row: Mapping[str, Any], *names: str) -> str:
    for name in names:
        if row.get(name) is not None:
            return str(row[name])
    raise RowFormatError(f"row has none of the fields {', '.join(names)} (it has {', '.join(sorted(row))})")


def messages_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """An already-converted row: messages (tool-call arguments may be JSON strings) and tools
    (a list or a JSON string; missing -> the code_interpreter schema)."""
    raw = row.get("messages")
    if raw is None:
        raise RowFormatError("messages rows need a `messages` column")
    if isinstance(raw, str):
        raw = json.loads(raw)
    messages = [normalise_message(m) for m in list(raw)]
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    return {"messages": messages, "tools": list(tools) if tools else TOOLS}


def normalise_message(message: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": str(message["role"]), "content": str(message.get("content") or "")}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = []
        for call in list(calls):
            fn = call.get("function") or call
            args = fn.get("arguments")
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(args, Mapping) or not isinstance(args.get("code"), str) or set(args) - {"code"}:
                raise RowFormatError(f"tool call arguments must be {{'code': str}} (got {args!r})")
            if fn.get("name") != tool_call("")["function"]["name"]:
                raise RowFormatError(f"only code_interpreter tool calls are supported (got {fn.get('name')!r})")
            out["tool_calls"].append(tool_call(args["code"]))
    return out


# --------------------------------------------------------------------------- mapping


def map_rows(
    fmt: str, rows: Iterable[Mapping[str, Any]], *, default_source: str, lenient_fences: bool = False
) -> tuple[list[dict[str, Any]], list[str]]:
    """Output rows for `fmt`, and one message per source row that could not be converted
    (`lenient_fences`: the dataset option, format retool_sft)."""
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i, row in enumerate(rows):
        try:
            out.append(_map_one(fmt, row, len(out), default_source, lenient_fences))
        except (RowFormatError, SolutionFormatError, KeyError, TypeError, json.JSONDecodeError) as exc:
            skipped.append(f"row {i}: {type(exc).__name__}: {exc}")
    return out, skipped


def _map_one(fmt: str, row: Mapping[str, Any], index: int, default_source: str, lenient_fences: bool) -> dict[str, Any]:
    if fmt == "retool_sft":
        return retool_sft_row(row, lenient_fences=lenient_fences)
    if fmt == "messages":
        return messages_row(row)
    if fmt == "dapo_math":
        return dapo_row(row, index)
    if fmt in ("aime_2024", "aime_2025"):
        return aime_row(row, index, fmt)
    if fmt == "rl":
        return rl_passthrough_row(row, index, default_source)
    raise ValueError(f"unknown dataset format {fmt!r}")
