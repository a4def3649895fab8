"""The recipe's `code_interpreter`, run for the eval tool loop through the spec's sandbox.

Each call gets what RL's tool agent would give it: an unknown function name or arguments
that are not JSON get verl's error text; arguments the recipe's tool cannot read
(`code_argument` raises) get verl's `Error executing tool ...` text; otherwise the recipe's
code rules (`prepare_code`, with the spec's `recipe.lenient_fences`), one sandbox call
(`sandbox_call.execute`, the tool's own client code) and the recipe's `observation`.
A wave's calls run concurrently, at most `rate_limit` at a time (the tool's cap).
"""

from __future__ import annotations

import asyncio
import json

import httpx

from runtime.data.retool_sft import TOOL_NAME
from runtime.eval.toolloop import ToolCall
from runtime.verl.recipe.code import code_argument, observation, prepare_code
from runtime.verl.recipe.sandbox_call import SandboxCallSettings, execute


class SandboxTools:
    """A `ToolRunner` backed by the sandbox at `settings.sandbox_url`."""

    def __init__(self, settings: SandboxCallSettings, *, lenient_fences: bool = False) -> None:
        self.settings = settings
        self.lenient_fences = lenient_fences
        self.calls = 0
        self.sandbox_errors = 0

    def __call__(self, calls: list[ToolCall]) -> list[str]:
        if not calls:
            return []
        return asyncio.run(self._all(calls))

    async def _all(self, calls: list[ToolCall]) -> list[str]:
        limits = httpx.Limits(max_connections=self.settings.num_workers)
        slots = asyncio.Semaphore(self.settings.rate_limit)
        async with httpx.AsyncClient(limits=limits) as client:
            return list(await asyncio.gather(*(self._one(client, slots, c) for c in calls)))

    async def _one(self, client: httpx.AsyncClient, slots: asyncio.Semaphore, call: ToolCall) -> str:
        if call.name != TOOL_NAME:
            return f"Unknown function '{call.name}'. Available tools: {[TOOL_NAME]}"
        try:
            args = json.loads(call.arguments)
        except (json.JSONDecodeError, TypeError) as e:
            return f"Invalid JSON in arguments for '{call.name}': {e}"
        try:
            code = prepare_code(code_argument(args), lenient_fences=self.lenient_fences)
        except Exception as e:  # what verl's agent loop shows for a tool that raises
            return f"Error executing tool '{call.name}': {e}"
        self.calls += 1
        async with slots:
            response = await execute(client, code, self.settings)
        self.sandbox_errors += int(response is None)
        return observation(response)
