"""Does a model call the code_interpreter tool? Greedy decoding on held-out prompts.

Used after the tiny SFT stage (spec `tool_call_check`): the merged model is asked the
held-out generated problems with the code_interpreter schema in its system prompt, and a
completion counts when its first `<tool_call>…</tool_call>` block (hermes format, what
verl's tool parser reads) holds JSON with `name == "code_interpreter"` and
`arguments.code` a non-empty string that compiles as Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reconciler.errors import TerminalError
from reconciler.spec import ProblemSet
from runtime.data.retool_sft import TOOL_NAME

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
MAX_EXAMPLES = 8


class ToolCallExample(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt: str
    completion: str
    ok: bool
    reason: str = Field(description="Why the completion does not count ('' when it does).")


class ToolCheckResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    rate: float = Field(description="Fraction of prompts whose completion holds a well-formed call.")
    n: int
    ok: int
    examples: list[ToolCallExample] = Field(description="Some failures first, then some successes.")


def parse_tool_call(completion: str) -> str:
    """'' when the completion's first tool call is well formed, else the reason it is not."""
    start = completion.find(CALL_START)
    if start == -1:
        return "no <tool_call>"
    end = completion.find(CALL_END, start)
    if end == -1:
        return "no </tool_call>"
    try:
        call = json.loads(completion[start + len(CALL_START):end])
    except json.JSONDecodeError as exc:
        return f"call is not JSON ({exc.msg})"
    if not isinstance(call, dict):
        return "call is not a JSON object"
    if call.get("name") != TOOL_NAME:
        return f"name is {call.get('name')!r}"
    args = call.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return "arguments is a string that is not JSON"
    if not isinstance(args, dict):
        return "arguments is not an object"
    code = args.get("code")
    if not isinstance(code, str) or not code.strip():
        return "arguments.code is not a non-empty string"
    try:
        compile(code, "<tool_call>", "exec")
    except (SyntaxError, ValueError) as exc:
        return f"code does not compile ({type(exc).__name__}: {exc})"
    return ""


def heldout_prompts(n: int, seed: int, problems: ProblemSet = "mixed") -> list[list[dict[str, Any]]]:
    """`n` generated prompts of the set `problems` from the held-out bucket: never in any
    builtin training set."""
    from runtime.data.builtin import user_content
    from runtime.data.problems import generate

    return [[{"role": "user", "content": user_content(p)}] for p in generate(n, seed, heldout=True, problems=problems)]


def generate_completions(
    model_dir: Path, prompts: list[list[dict[str, Any]]], tools: list[dict[str, Any]] | None,
    *, max_new_tokens: int, batch_size: int,
) -> list[str]:
    """Greedy completions (special tokens kept, cut at the end-of-turn token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    schemas: list[dict[Any, Any] | Callable[..., Any]] | None = list(tools) if tools is not None else None
    texts = [tok.apply_chat_template(p, tools=schemas, add_generation_prompt=True, tokenize=False) for p in prompts]
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            # transformers types AutoModelForCausalLM's models so that generate's `self` does not bind
            gen = model.generate(  # type: ignore[misc]
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
        for row in gen[:, batch["input_ids"].shape[1]:]:
            text = tok.decode(row, skip_special_tokens=False)
            if not isinstance(text, str):  # one row decodes to one string
                raise TypeError(f"the tokenizer decoded one row to {type(text).__name__}")
            end = text.find(tok.eos_token) if tok.eos_token else -1
            out.append(text[:end] if end != -1 else text.replace(tok.pad_token or "\0", ""))
    return out


def tool_call_rate(
    model_dir: Path, prompts: list[list[dict[str, Any]]], tools: list[dict[str, Any]],
    max_new_tokens: int = 128, batch_size: int = 16,
) -> ToolCheckResult:
    """Fraction of `prompts` for which greedy decoding emits a well-formed code_interpreter call."""
    if not prompts:
        raise ValueError("tool_call_rate needs at least one prompt")
    completions = generate_completions(model_dir, prompts, tools, max_new_tokens=max_new_tokens, batch_size=batch_size)
    results = [
        ToolCallExample(prompt=p[-1]["content"], completion=c, ok=not reason, reason=reason)
        for p, c in zip(prompts, completions)
        for reason in (parse_tool_call(c),)
    ]
    ok = sum(r.ok for r in results)
    failures = [r for r in results if not r.ok][: MAX_EXAMPLES // 2]
    successes = [r for r in results if r.ok][: MAX_EXAMPLES - len(failures)]
    return ToolCheckResult(rate=ok / len(results), n=len(results), ok=ok, examples=failures + successes)


def measure(model_dir: Path, prompts: int, problems: ProblemSet = "mixed") -> ToolCheckResult:
    """The spec's `tool_call_check`: the rate on `prompts` held-out generated problems of the
    set `problems`, with the recipe's code_interpreter schema (every backend's finalize runs this)."""
    from runtime.data.retool_sft import TOOLS

    return tool_call_rate(model_dir, heldout_prompts(prompts, seed=0, problems=problems), TOOLS)


def require_rate(stage: str, min_rate: float, rate: float, n: int, model_dir: str, examples: str = "") -> str:
    """The check's verdict: its one-line summary, or TerminalError when `rate` < `min_rate`."""
    if rate >= min_rate:
        return f"tool-call rate {rate:.2f} ({round(rate * n)}/{n}, need ≥ {min_rate:.2f})"
    raise TerminalError(
        f"stage.{stage}: the merged model emits a well-formed tool call on {rate:.0%} of "
        f"{n} held-out prompts, below the required {min_rate:.0%}",
        examples,
        f"train longer (raise `epochs` or `max_steps`: the run resumes) or adjust the data; the merged model is at {model_dir}",
    )
