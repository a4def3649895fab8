"""PPO's value model (the critic) without FlashAttention 2.

verl 0.9.1 loads the critic through `verl.utils.model.load_valuehead_model`, which hard-codes
`attn_implementation="flash_attention_2"` (the actor honours
`model.override_config.attn_implementation`), so a critic cannot be built where flash_attn is
not installed: on CPU, or on a GPU image without it. Named in VERL_USE_EXTERNAL_MODULES (which
runtime.verl.rl does for a PPO stage that runs without FlashAttention), this module replaces
that loader in every verl process with one that uses the attention implementation in
RETOOL_VALUE_MODEL_ATTN. verl's FSDP engine imports the loader at call time, so replacing the
module attribute is enough. Models with a token-classification head (Qwen2 and the like) only:
verl's TRL fallback for other architectures is not reproduced.
"""

from __future__ import annotations

import os
from typing import Any

MODULE = "runtime.verl.value_model"
ENV_ATTN = "RETOOL_VALUE_MODEL_ATTN"


def load_valuehead_model(local_path: str, torch_dtype: Any, model_config: Any, trust_remote_code: bool) -> Any:
    """verl's loader, with the attention implementation from the environment."""
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(
        pretrained_model_name_or_path=local_path,
        torch_dtype=torch_dtype,
        config=model_config,
        attn_implementation=os.environ.get(ENV_ATTN, "sdpa"),
        trust_remote_code=trust_remote_code,
    )


def install() -> Any:
    """Replace verl's loader; returns verl's own (kept for tests and for undoing it)."""
    import verl.utils.model as verl_model

    original = verl_model.load_valuehead_model
    if original is not load_valuehead_model:
        verl_model.load_valuehead_model = load_valuehead_model
    return original


VERL_LOADER = install()
