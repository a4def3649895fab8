"""The multi-turn hermes tool loop of RL's `tool_agent`, for evaluation.

It follows verl 0.9.1's `ToolAgentLoop` turn by turn, so an eval sample is produced the way
an RL rollout is:

- the prompt is the row's messages rendered with the chat template and the tool schema
  (`runtime.data.retool_sft.TOOLS`, what SFT and RL use), generation prompt added;
- each assistant turn may use what is left of `max_response_length` (all turns, tool
  output included); the loop ends when the budget is spent, after `max_assistant_turns`
  assistant turns or `max_user_turns` tool turns, or when a turn calls no tool;
- tool calls are the `<tool_call>{json}</tool_call>` blocks of the decoded turn (verl's
  hermes parser); only the first runs (verl's `max_parallel_calls: 1`); unknown names and
  non-JSON arguments answer with verl's messages; the `code_interpreter` runs through the
  recipe's code rules and the spec's sandbox (`runtime.verl.recipe.code`, `.sandbox_call`)
  and its output is cut to `max_tool_response_length` characters in the middle;
- a tool turn's tokens are the chat template's rendering of the tool message after a
  synthetic conversation (verl's continuous-token delta), plus the newline Qwen templates
  put after an `<|im_end|>` the model stopped at; a tool turn that would overflow the
  budget ends the loop.

The loop runs many conversations at once, in waves: every live conversation generates one
turn (one engine call for all), then all their tool calls run concurrently.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.eval.engine import Engine

logger = logging.getLogger(__name__)

CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_PARALLEL_CALLS = 1
_SYNTH_SYSTEM = {"role": "system", "content": "continuous token synthetic system"}
_SYNTH_USER = {"role": "user", "content": "continuous token synthetic user"}


@dataclass(frozen=True)
class LoopLimits:
    max_prompt_length: int
    max_response_length: int
    max_assistant_turns: int
    max_user_turns: int
    max_tool_response_length: int


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as verl's parser re-serialises it


@dataclass
class Conversation:
    """One sample in flight."""

    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    assistant_turns: int = 0
    user_turns: int = 0
    truncated: bool = False
    done: bool = False
    pending: list[ToolCall] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        """verl's `num_turns` (what the recipe's reward counts tool calls from)."""
        return self.user_turns + self.assistant_turns + 1


# Runs tool calls: one observation text per call, in order.
ToolRunner = Callable[[list[ToolCall]], list[str]]


def parse_tool_calls(text: str) -> list[ToolCall]:
    """verl's hermes parser: every well-formed `<tool_call>` JSON block with a name and
    arguments; malformed blocks are skipped."""
    if "<tool_call>" not in text or "</tool_call>" not in text:
        return []
    calls: list[ToolCall] = []
    for match in CALL_RE.findall(text):
        try:
            call = json.loads(match)
            calls.append(ToolCall(name=call["name"], arguments=json.dumps(call["arguments"], ensure_ascii=False)))
        except Exception as exc:  # verl logs and skips whatever fails to decode
            logger.debug("skipping a malformed tool call: %s", exc)
    return calls


def truncate_middle(text: str, limit: int) -> str:
    """verl's `tool_response_truncate_side: middle`."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + "...(truncated)..." + text[-half:]


class ToolLoop:
    def __init__(
        self, tokenizer: Any, engine: Engine, tools: list[dict[str, Any]], limits: LoopLimits, run_tools: ToolRunner,
    ) -> None:
        self.tok = tokenizer
        self.engine = engine
        self.tools = tools
        self.limits = limits
        self.run_tools = run_tools
        ids = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
        newline = tokenizer.encode("\n", add_special_tokens=False)
        self._im_end = ids if isinstance(ids, int) else None
        self._newline = newline[0] if len(newline) == 1 else None

    # ------------------------------------------------------------------ rendering

    def _render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(
            messages, tools=self.tools, add_generation_prompt=generation_prompt, tokenize=True,
        )
        if isinstance(out, dict) or hasattr(out, "keys"):  # a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]

    def start(self, messages: list[dict[str, Any]]) -> Conversation:
        ids = self._render(messages, generation_prompt=True)
        if len(ids) > self.limits.max_prompt_length:
            logger.warning("prompt of %d tokens left-truncated to %d", len(ids), self.limits.max_prompt_length)
            ids = ids[-self.limits.max_prompt_length:]
        return Conversation(messages=list(messages), prompt_ids=ids)

    def tool_turn_ids(self, conv: Conversation, tool_messages: list[dict[str, Any]]) -> list[int]:
        calls = [{"type": "function", "function": {"name": c.name, "arguments": {}}} for c in conv.pending]
        prefix: list[dict[str, Any]] = [_SYNTH_SYSTEM, _SYNTH_USER, {"role": "assistant", "content": "", "tool_calls": calls}]
        head = self._render(prefix, generation_prompt=False)
        full = self._render(prefix + tool_messages, generation_prompt=True)
        if full[: len(head)] != head:
            raise ValueError("the chat template renders tool messages by changing what came before them")
        delta = full[len(head):]
        last = conv.response_ids[-1] if conv.response_ids else None
        if self._im_end is not None and last == self._im_end and self._newline is not None:
            delta = [self._newline, *delta]
        return delta

    # ------------------------------------------------------------------ the loop

    def run(self, conversations: Sequence[Conversation]) -> None:
        """Run every conversation to its end (in place)."""
        live = [c for c in conversations if not c.done]
        while live:
            self._generate(live)
            calling = [c for c in live if not c.done and c.pending]
            if calling:
                self._tools(calling)
            live = [c for c in live if not c.done]

    def _generate(self, live: list[Conversation]) -> None:
        lim = self.limits
        budgets = [lim.max_response_length - len(c.response_ids) for c in live]
        outs = self.engine.generate([c.prompt_ids + c.response_ids for c in live], budgets)
        for conv, out in zip(live, outs):
            conv.response_ids += out.token_ids
            conv.assistant_turns += 1
            if len(conv.response_ids) >= lim.max_response_length:
                conv.truncated, conv.done = True, True
                continue
            if out.finish == "length":  # the model's context ran out before the budget
                conv.truncated, conv.done = True, True
                continue
            if conv.assistant_turns >= lim.max_assistant_turns or conv.user_turns >= lim.max_user_turns:
                conv.done = True
                continue
            text = self.tok.decode(out.token_ids)
            conv.pending = parse_tool_calls(text)[:MAX_PARALLEL_CALLS]
            conv.messages.append({"role": "assistant", "content": CALL_RE.sub("", text)})
            if not conv.pending:
                conv.done = True

    def _tools(self, calling: list[Conversation]) -> None:
        flat = [call for c in calling for call in c.pending]
        texts = iter(self.run_tools(flat))
        for conv in calling:
            tool_messages = [
                {"role": "tool", "content": truncate_middle(next(texts), self.limits.max_tool_response_length)}
                for _ in conv.pending
            ]
            delta = self.tool_turn_ids(conv, tool_messages)
            conv.pending = []
            if len(conv.response_ids) + len(delta) >= self.limits.max_response_length:
                conv.truncated, conv.done = True, True
                continue
            conv.messages += tool_messages
            conv.response_ids += delta
            conv.user_turns += 1

    def response_text(self, conv: Conversation) -> str:
        """The response as verl's reward manager decodes it (special tokens skipped)."""
        return self.tok.decode(conv.response_ids[: self.limits.max_response_length], skip_special_tokens=True)
