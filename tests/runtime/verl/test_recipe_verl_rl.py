"""render_rl: the RL stage's main_ppo command carries the recipe, and composes with verl
0.9.1's own hydra config (`--cfg job`; a misspelt key fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import TerminalError
from reconciler.loader import parse_spec_text
from reconciler.spec import Spec
from reconciler.backend import StageContext
from runtime.verl.recipe import ENV_SANDBOX_URL, ENV_TOOL_RATE_LIMIT, ENV_TOOL_TIMEOUT_S, TOOL_CONFIG_PATH
from runtime.verl.rollout import PLUGIN_MODULE
from runtime.verl.common import StagePaths, compose_config, entry_point
from runtime.verl.rl import choose_rollout, render_rl

SPECS = Path(__file__).resolve().parents[3] / "specs"
RID = "5e" * 32
PATHS = StagePaths(stage_dir="/vol/c/rl/5e5e", ckpt_dir="/vol/c/rl/5e5e", merged_dir="/vol/c/rl/5e5e/merged")
URL = "http://127.0.0.1:8123"


def tiny_ctx(edit: dict | None = None, **ctx) -> StageContext:
    text = (SPECS / "retool-tiny.yaml").read_text()
    spec = parse_spec_text(text)
    if edit:
        data = spec.model_dump(mode="json", exclude_unset=True)
        data["stages"]["rl"].update(edit)
        spec = Spec.model_validate(data)
    inputs = {
        "dataset.tiny_math": {"path": "/vol/data/datasets/tiny_math/train.parquet"},
        "dataset.aime_2024": {"path": "/vol/data/datasets/aime_2024"},
        "stage.sft": {"model_path": "/vol/c/sft/ab/merged", "final_step": 64},
    }
    return StageContext(spec=spec, spec_dir=str(SPECS), stage="rl", restart_id=RID, total_steps=2,
                        inputs=inputs, **ctx)


def args_of(argv: list[str]) -> dict[str, str]:
    _, overrides = entry_point(argv)
    keys = [o.split("=", 1)[0] for o in overrides]
    assert len(keys) == len(set(keys)), "an override key appears twice"
    return dict(o.split("=", 1) for o in overrides)


def test_cpu_command_composes_with_the_recipe_wired_in() -> None:
    (cmd,) = render_rl(tiny_ctx(), sandbox_url=URL, cpu=True, paths=PATHS)
    assert cmd.argv[:3] == ["python", "-m", "verl.trainer.main_ppo"]
    env = cmd.env
    assert env["VERL_USE_EXTERNAL_MODULES"].split(",") == [
        "runtime.verl.cpu_platform", PLUGIN_MODULE, "runtime.verl.save_marker",
    ]
    assert env["VERL_PLATFORM"] == "cpu" and env["RAY_AUTH_MODE"] == "disabled"
    assert env[ENV_SANDBOX_URL] == URL and env[ENV_TOOL_TIMEOUT_S] == "10.0" and env[ENV_TOOL_RATE_LIMIT] == "4"

    cfg = compose_config(cmd.argv, env)
    arr, data, trainer, algo = cfg["actor_rollout_ref"], cfg["data"], cfg["trainer"], cfg["algorithm"]
    actor, rollout = arr["actor"], arr["rollout"]
    assert algo["adv_estimator"] == "grpo" and algo["use_kl_in_reward"] is False and actor["use_kl_loss"] is False
    assert (actor["clip_ratio_low"], actor["clip_ratio_high"], actor["clip_ratio_c"]) == (0.2, 0.28, 10.0)
    assert actor["loss_agg_mode"] == "token-mean" and actor["strategy"] == "fsdp2"
    assert actor["optim"]["lr"] == 1e-6 and actor["optim"]["lr_scheduler_type"] == "constant"
    assert actor["ppo_mini_batch_size"] == 4 and actor["use_dynamic_bsz"] is True
    assert actor["ppo_max_token_len_per_gpu"] == 4096
    assert data["train_files"] == "/vol/data/datasets/tiny_math/train.parquet"
    assert data["val_files"] == ["/vol/data/datasets/aime_2024/train.parquet"]
    assert (data["max_prompt_length"], data["max_response_length"], data["train_batch_size"]) == (512, 256, 4)
    assert data["filter_overlong_prompts"] is True and data["truncation"] == "error"
    assert arr["model"]["path"] == "/vol/c/sft/ab/merged"
    assert rollout["name"] == "transformers" and rollout["n"] == 4 and rollout["calculate_log_probs"] is True
    mt = rollout["multi_turn"]
    assert mt["enable"] is True and mt["format"] == "hermes" and mt["max_assistant_turns"] == 4
    assert mt["max_tool_response_length"] == 256 and mt["tool_config_path"] == str(TOOL_CONFIG_PATH)
    assert rollout["agent"]["default_agent_loop"] == "tool_agent"
    assert rollout["val_kwargs"]["top_p"] == 0.6 and rollout["val_kwargs"]["do_sample"] is True
    assert cfg["reward"]["custom_reward_function"] == {"path": "pkg://runtime.verl.recipe.reward", "name": "compute_score"}
    assert trainer["total_training_steps"] == 2 and trainer["save_freq"] == 1
    assert trainer["default_local_dir"] == PATHS.ckpt_dir and trainer["resume_mode"] == "auto"
    assert trainer["device"] == "cpu" and trainer["n_gpus_per_node"] == 1 and trainer["val_before_train"] is False
    assert cfg["ray_kwargs"]["ray_init"]["num_gpus"] == 1
    # full precision on CPU, so the actor's log-probs match the float32 rollout's
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    assert actor["fsdp_config"]["mixed_precision"] == fp32 and arr["ref"]["fsdp_config"]["mixed_precision"] == fp32


def test_a_misspelt_raw_override_fails_composition() -> None:
    (cmd,) = render_rl(tiny_ctx({"overrides": ["actor_rollout_ref.rollout.temperatur=0.5"]}),
                       sandbox_url=URL, cpu=True, paths=PATHS)
    with pytest.raises(TerminalError) as err:
        compose_config(cmd.argv, cmd.env)
    assert "temperatur" in err.value.detail


def test_raw_overrides_win_and_resume_names_the_checkpoint() -> None:
    ctx = tiny_ctx({"overrides": ["actor_rollout_ref.rollout.n=2", "trainer.save_freq=5"]}, resume_from=1)
    (cmd,) = render_rl(ctx, sandbox_url=URL, cpu=True, paths=PATHS)
    args = args_of(cmd.argv)
    assert args["actor_rollout_ref.rollout.n"] == "2" and args["trainer.save_freq"] == "5"
    assert args["trainer.resume_from_path"] == f"{PATHS.ckpt_dir}/global_step_1"
    # verl's PPO trainer reads resume_from_path only in resume_path mode (auto follows the tracker)
    assert args["trainer.resume_mode"] == "resume_path"
    assert list(args)[-2:] == ["actor_rollout_ref.rollout.n", "trainer.save_freq"]


def test_without_validation_sets_it_never_validates() -> None:
    (cmd,) = render_rl(tiny_ctx({"val": []}), sandbox_url=URL, cpu=True, paths=PATHS)
    args = args_of(cmd.argv)
    assert args["data.val_files"] == args["data.train_files"]
    assert args["trainer.test_freq"] == "-1" and args["trainer.val_before_train"] == "false"


def test_gpu_command_for_the_real_spec_composes() -> None:
    spec = parse_spec_text((SPECS / "retool-qwen7b.yaml").read_text())
    ctx = StageContext(spec=spec, spec_dir=str(SPECS), stage="dapo", restart_id=RID, total_steps=400, inputs={
        "dataset.dapo_math": {"path": "/data/datasets/dapo_math/train.parquet"},
        "dataset.aime_2024": {"path": "/data/datasets/aime_2024/train.parquet"},
        "dataset.aime_2025": {"path": "/data/datasets/aime_2025/train.parquet"},
        "stage.sft": {"model_path": "/checkpoints/sft/x/merged"},
    })
    (cmd,) = render_rl(ctx, sandbox_url=URL, cpu=False, paths=PATHS, rollout="vllm")
    assert "VERL_PLATFORM" not in cmd.env and PLUGIN_MODULE not in cmd.env.get("VERL_USE_EXTERNAL_MODULES", "")
    assert cmd.secret_env == ["WANDB_API_KEY", "HF_TOKEN"] and "WANDB_API_KEY" not in cmd.env
    args = args_of(cmd.argv)
    assert "+ray_kwargs.ray_init.num_gpus" not in args
    cfg = compose_config(cmd.argv, cmd.env)
    arr = cfg["actor_rollout_ref"]
    assert arr["rollout"]["name"] == "vllm" and arr["rollout"]["tensor_model_parallel_size"] == 4
    assert arr["rollout"]["n"] == 16 and arr["rollout"]["val_kwargs"]["n"] == 30
    assert arr["rollout"]["multi_turn"]["max_assistant_turns"] == 16
    assert arr["actor"]["ulysses_sequence_parallel_size"] == 4 and arr["actor"]["fsdp_config"]["param_offload"] is True
    assert arr["ref"]["log_prob_max_token_len_per_gpu"] == 73728
    assert cfg["data"]["max_response_length"] == 16384 and len(cfg["data"]["val_files"]) == 2
    assert cfg["trainer"]["n_gpus_per_node"] == 8 and cfg["trainer"]["test_freq"] == 10
    assert cfg["trainer"]["val_before_train"] is True and cfg["trainer"]["logger"] == ["console", "wandb"]


def test_rollout_choice() -> None:
    assert choose_rollout("auto", cpu=True) == "transformers"
    assert choose_rollout("transformers", cpu=False) == "transformers"
    assert choose_rollout("vllm", cpu=False) == "vllm"
    with pytest.raises(TerminalError):
        choose_rollout("sglang", cpu=True)
