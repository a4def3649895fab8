"""PPO's critic without FlashAttention: runtime.verl.value_model replaces verl 0.9.1's loader,
which hard-codes flash_attention_2 (and so fails wherever flash_attn is not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from runtime.verl import rl


def test_verls_loader_fails_without_flash_attn_and_ours_loads_a_value_head(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed: verl's own loader works here")
    import verl.utils.model as verl_model

    from runtime.verl import value_model  # what VERL_USE_EXTERNAL_MODULES does in every verl process

    try:
        assert (value_model.MODULE, value_model.ENV_ATTN) == (rl.VALUE_MODEL_MODULE, rl.ENV_VALUE_MODEL_ATTN)
        assert verl_model.load_valuehead_model is value_model.load_valuehead_model
        config = AutoConfig.from_pretrained(tiny_model_dir)
        config.num_labels = 1
        with pytest.raises(RuntimeError, match="not a value head model"):
            value_model.VERL_LOADER(str(tiny_model_dir), torch.float32, config, False)
        monkeypatch.setenv(rl.ENV_VALUE_MODEL_ATTN, "sdpa")
        model = verl_model.load_valuehead_model(str(tiny_model_dir), torch.float32, config, False)
        assert type(model).__name__ == "Qwen2ForTokenClassification"
        assert model.config._attn_implementation == "sdpa" and model.score.out_features == 1
    finally:
        verl_model.load_valuehead_model = value_model.VERL_LOADER  # leave this process as verl made it
