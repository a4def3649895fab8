"""The `code_interpreter` tool as a verl native tool.

verl's tool agent loop (`verl.experimental.agent_loop.tool_agent_loop`) builds it from
`tool_config.yaml` through `actor_rollout_ref.rollout.multi_turn.tool_config_path`, calls
`create`, `execute(instance_id, {"code": ...})` and `release` for every call, and truncates
the returned text to `multi_turn.max_tool_response_length` itself. Calls are independent:
no state is kept between turns, as in the recipe.

`execute` is the recipe's `CustomSandboxFusionTool.execute`: the `code` argument read as the
recipe reads it (a missing or non-string one raises, and verl shows the model the error), the
recipe's code rules (`runtime.verl.recipe.code`), one sandbox call, stdout + stderr or
`no stdout here`; no tool reward (None). Deliberate differences (docs/fidelity.md, "Differences from
the official recipe"): model-supplied `timeout`/`language` arguments are ignored, and
`rate_limit` caps concurrent calls per agent-loop worker rather than cluster-wide.

The schema shown to the model is the one the SFT data was rendered with
(`runtime.data.retool_sft.TOOLS`), so the RL prompt's system block matches what SFT taught.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from runtime.data.retool_sft import TOOL_NAME, TOOLS
from pydantic import BaseModel, ConfigDict

from runtime.verl.recipe.code import code_argument, observation, prepare_code
from runtime.verl.recipe.sandbox_call import SandboxCallSettings, execute
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

logger = logging.getLogger(__name__)


def tool_schema() -> OpenAIFunctionToolSchema:
    """The code_interpreter schema, in verl's model."""
    (schema,) = [t for t in TOOLS if t["function"]["name"] == TOOL_NAME]
    return OpenAIFunctionToolSchema.model_validate(schema)


class RecipeToolOptions(BaseModel):
    """The spec's `recipe:` options the tool honours (tool_config.yaml, from the environment)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    lenient_fences: bool = False


class CodeInterpreterTool(BaseTool):
    """Runs the model's code in the SandboxFusion-compatible sandbox, with the recipe's rules."""

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None = None):
        self.settings = SandboxCallSettings.model_validate(config)
        self.options = RecipeToolOptions.model_validate(config)
        super().__init__(config, tool_schema if tool_schema is not None else self.get_openai_tool_schema())
        # Created on first use, inside the agent loop worker's event loop.
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None

    def get_openai_tool_schema(self) -> OpenAIFunctionToolSchema:
        return tool_schema()

    def _connection(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._client is None or self._slots is None:
            limits = httpx.Limits(max_connections=self.settings.num_workers)
            self._client = httpx.AsyncClient(limits=limits)
            self._slots = asyncio.Semaphore(self.settings.rate_limit)
        return self._client, self._slots

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float | None, dict[str, Any]]:
        code = prepare_code(code_argument(parameters), lenient_fences=self.options.lenient_fences)
        client, slots = self._connection()
        async with slots:
            response = await execute(client, code, self.settings)
        if response is None:
            logger.warning("code_interpreter: sandbox gave no answer; the model sees the no-output text")
        # The recipe's tool gives no reward; the metrics are ours (verl's agent loop drops them).
        return ToolResponse(text=observation(response)), None, {"sandbox_error": int(response is None)}
