"""PPO's critic without FlashAttention: verl 0.9.1's loader hard-codes flash_attention_2 (and so
fails wherever flash_attn is not installed); the environment retool renders for a PPO stage
makes every verl process load the value head with another attention implementation."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from runtime.verl.rl import render_rl
from tests.runtime.verl.test_recipe_verl_rl import PATHS, URL, tiny_ctx

PPO = {"algorithm": {"adv_estimator": "gae"}, "critic": {"ulysses_sequence_parallel_size": 1}}


def import_fresh(name: str) -> None:
    """What VERL_USE_EXTERNAL_MODULES does in a new verl process: run the module's top level."""
    if name in sys.modules:
        importlib.reload(sys.modules[name])
    else:
        importlib.import_module(name)


@pytest.mark.parametrize(("cpu", "attn"), [(True, "sdpa"), (False, "eager")], ids=["cpu", "gpu-without-flash-attn"])
def test_the_rendered_ppo_environment_loads_a_value_head_where_verls_loader_fails(
    cpu: bool, attn: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU retool renders sdpa; on a GPU without flash-attn, the attention the backend chose
    (here eager): the loaded critic must use exactly that one."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed: verl's own loader works here")
    import verl.utils.model as verl_model

    engine = {} if cpu else {"rollout": "transformers", "attn_implementation": attn}
    (grpo,) = render_rl(tiny_ctx(), sandbox_url=URL, cpu=cpu, paths=PATHS, **engine)
    (ppo,) = render_rl(tiny_ctx(PPO), sandbox_url=URL, cpu=cpu, paths=PATHS, **engine)
    # What the critic adds to the trainer's environment: modules verl imports in every process,
    # and the settings they read.
    added_modules = [m for m in ppo.env["VERL_USE_EXTERNAL_MODULES"].split(",")
                     if m not in grpo.env["VERL_USE_EXTERNAL_MODULES"].split(",")]
    added_env = {k: v for k, v in ppo.env.items() if k not in grpo.env}
    assert added_modules and added_env

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    verls_loader = verl_model.load_valuehead_model
    with pytest.raises(RuntimeError, match="not a value head model"):
        verls_loader(str(tiny_model_dir), torch.float32, config, False)
    try:
        for key, value in added_env.items():
            monkeypatch.setenv(key, value)
        for name in added_modules:
            import_fresh(name)
        assert verl_model.load_valuehead_model is not verls_loader
        model = verl_model.load_valuehead_model(str(tiny_model_dir), torch.float32, config, False)
        assert type(model).__name__ == "Qwen2ForTokenClassification"
        assert model.config._attn_implementation == attn and model.score.out_features == 1
    finally:
        verl_model.load_valuehead_model = verls_loader  # leave this process as verl made it
