"""The ReTool recipe's run-time pieces that verl loads inside its workers.

- `runtime.verl.recipe.code`: the recipe's code extraction and print-wrapping, and what the model
  sees of a sandbox result (pure functions, no verl).
- `runtime.verl.recipe.sandbox_call`: one `/run_code` call through `sandbox.client`.
- `runtime.verl.recipe.tool`: the `code_interpreter` tool as a verl native tool (`BaseTool`),
  declared in `tool_config.yaml` (`actor_rollout_ref.rollout.multi_turn.tool_config_path`).
- `runtime.verl.recipe.reward`: the recipe's reward (`reward.custom_reward_function`).

The tool reads the sandbox URL and limits from environment variables that `runtime.verl.rl`
sets on the trainer process; Ray hands the driver's environment to every worker.
"""

from __future__ import annotations

from pathlib import Path

TOOL_CONFIG_PATH = Path(__file__).with_name("tool_config.yaml")
REWARD_MODULE = "pkg://runtime.verl.recipe.reward"  # verl's load_module accepts `pkg://<module>`
REWARD_FUNCTION = "compute_score"

# Environment read by the tool (through tool_config.yaml's `${oc.env:...}` interpolations).
ENV_SANDBOX_URL = "RETOOL_SANDBOX_URL"
ENV_TOOL_TIMEOUT_S = "RETOOL_TOOL_TIMEOUT_S"
ENV_TOOL_QUEUE_TIMEOUT_S = "RETOOL_TOOL_QUEUE_TIMEOUT_S"
ENV_TOOL_MEMORY_MB = "RETOOL_TOOL_MEMORY_MB"
ENV_TOOL_RATE_LIMIT = "RETOOL_TOOL_RATE_LIMIT"
ENV_TOOL_NUM_WORKERS = "RETOOL_TOOL_NUM_WORKERS"
ENV_TOOL_LENIENT_FENCES = "RETOOL_TOOL_LENIENT_FENCES"
