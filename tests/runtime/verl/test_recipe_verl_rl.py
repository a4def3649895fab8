"""render_rl: the RL stage's main_ppo command carries the recipe, and composes with verl
0.9.1's own hydra config (`--cfg job`; a misspelt key fails)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from reconciler.errors import TerminalError
from reconciler.loader import parse_spec_text
from reconciler.spec import Spec
from reconciler.backend import StageContext
from runtime.verl.recipe import ENV_SANDBOX_URL, ENV_TOOL_RATE_LIMIT, ENV_TOOL_TIMEOUT_S, TOOL_CONFIG_PATH
from runtime.verl.rollout import PLUGIN_MODULE
from runtime.verl.common import StagePaths, compose_config, entry_point
from runtime.verl.recipe.differences import DIFFERENCES
from runtime.verl.rl import (
    CPU_VLLM_FORCED, ENV_VALUE_MODEL_ATTN, ENV_VLLM_CPU_KVCACHE, VALUE_MODEL_MODULE, choose_rollout, render_rl,
)

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
    (cmd,) = render_rl(tiny_ctx(), sandbox_url=URL, cpu=True, paths=PATHS, rollout="transformers")
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
    # verl's default, as in the recipe: the agent loop samples validation at val_kwargs' temperature anyway
    assert rollout["val_kwargs"]["top_p"] == 0.6 and rollout["val_kwargs"]["do_sample"] is False
    # the actor's old-log-prob pass has the actor's token budget (the recipe's 4x is the reference model's)
    assert rollout["log_prob_max_token_len_per_gpu"] == actor["ppo_max_token_len_per_gpu"]
    assert "critic_warmup" in trainer and cfg["critic"]["enable"] is None  # GRPO: no critic rendered
    assert "reward_kwargs" not in cfg["reward"]["custom_reward_function"]  # the recipe's reward, unparameterised
    assert env["RETOOL_TOOL_LENIENT_FENCES"] == "false"
    assert env["RETOOL_TOOL_QUEUE_TIMEOUT_S"] == "300.0"  # the spec's tool.queue_timeout_s default
    assert VALUE_MODEL_MODULE not in env["VERL_USE_EXTERNAL_MODULES"] and ENV_VALUE_MODEL_ATTN not in env
    assert cfg["reward"]["custom_reward_function"] == {"path": "pkg://runtime.verl.recipe.reward", "name": "compute_score"}
    assert trainer["total_training_steps"] == 2 and trainer["save_freq"] == 4  # the tiny spec's
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


def test_gpu_command_for_the_real_spec() -> None:
    """The 7B spec on GPU: no CPU machinery. Its values, composed with verl, are compared with the
    recipe's flag by flag in test_recipe_flags.py."""
    spec = parse_spec_text((SPECS / "retool-qwen7b.yaml").read_text())
    ctx = StageContext(spec=spec, spec_dir=str(SPECS), stage="dapo", restart_id=RID, total_steps=400, inputs={
        "dataset.dapo_math": {"path": "/data/datasets/dapo_math/train.parquet"},
        "dataset.aime_2024": {"path": "/data/datasets/aime_2024/train.parquet"},
        "dataset.aime_2025": {"path": "/data/datasets/aime_2025/train.parquet"},
        "stage.sft": {"model_path": "/checkpoints/sft/x/merged"},
    })
    (cmd,) = render_rl(ctx, sandbox_url=URL, cpu=False, paths=PATHS, rollout="vllm")
    assert "VERL_PLATFORM" not in cmd.env and PLUGIN_MODULE not in cmd.env.get("VERL_USE_EXTERNAL_MODULES", "")
    assert VALUE_MODEL_MODULE not in cmd.env.get("VERL_USE_EXTERNAL_MODULES", "")
    assert cmd.secret_env == ["WANDB_API_KEY", "HF_TOKEN"] and "WANDB_API_KEY" not in cmd.env
    args = args_of(cmd.argv)
    assert "+ray_kwargs.ray_init.num_gpus" not in args and "ray_kwargs.ray_init.num_cpus" not in args
    assert args["actor_rollout_ref.rollout.name"] == "vllm" and args["trainer.n_gpus_per_node"] == "8"
    # the recipe's FSDP1 on GPUs (fsdp2 only where CPU forces it) and its 0.6.1-default sequence cap
    assert args["actor_rollout_ref.actor.strategy"] == "fsdp" and args["actor_rollout_ref.rollout.max_num_seqs"] == "1024"


def qwen7b_ctx() -> StageContext:
    spec = parse_spec_text((SPECS / "retool-qwen7b.yaml").read_text())
    return StageContext(spec=spec, spec_dir=str(SPECS), stage="dapo", restart_id=RID, total_steps=400, inputs={
        "dataset.dapo_math": {"path": "/data/datasets/dapo_math/train.parquet"},
        "dataset.aime_2024": {"path": "/data/datasets/aime_2024/train.parquet"},
        "dataset.aime_2025": {"path": "/data/datasets/aime_2025/train.parquet"},
        "stage.sft": {"model_path": "/checkpoints/sft/x/merged"},
    })


def test_vllm_on_cpu_renders_the_gpu_rollout_flags_except_what_cpu_forces() -> None:
    """The 7B spec's rollout through verl's vLLM rollout on CPU: every `rollout.*` flag is the GPU
    command's except the CPU-forced ones (listed in runtime.verl.recipe.differences), and the
    command composes with verl's config."""
    (gpu,) = render_rl(qwen7b_ctx(), sandbox_url=URL, cpu=False, paths=PATHS, rollout="vllm")
    (cpu,) = render_rl(qwen7b_ctx(), sandbox_url=URL, cpu=True, paths=PATHS, rollout="vllm")
    prefix = "actor_rollout_ref.rollout."
    on_gpu = {k.lstrip("+"): v for k, v in args_of(gpu.argv).items() if k.lstrip("+").startswith(prefix)}
    on_cpu = {k.lstrip("+"): v for k, v in args_of(cpu.argv).items() if k.lstrip("+").startswith(prefix)}
    changed = {k for k in on_gpu.keys() | on_cpu.keys() if on_gpu.get(k) != on_cpu.get(k)}
    # agent.num_workers: the CPU launch's one helper process of each kind (every CPU rollout's)
    assert changed == {k.lstrip("+") for k in CPU_VLLM_FORCED} | {prefix + "agent.num_workers"}
    assert on_cpu[prefix + "enable_sleep_mode"] == "false" and on_cpu[prefix + "name"] == "vllm"
    assert cpu.env["VERL_USE_EXTERNAL_MODULES"].split(",") == [
        "runtime.verl.cpu_platform", "runtime.verl.save_marker", "runtime.verl.vllm_cpu",
    ]
    assert cpu.env[ENV_VLLM_CPU_KVCACHE] == "1" and ENV_VLLM_CPU_KVCACHE not in gpu.env
    assert "runtime.verl.vllm_cpu" not in gpu.env.get("VERL_USE_EXTERNAL_MODULES", "")
    every_difference = " ".join(f"{d.recipe} {d.ours}" for d in DIFFERENCES)
    assert all(k.lstrip("+").removeprefix(prefix) in every_difference for k in CPU_VLLM_FORCED)
    assert ENV_VLLM_CPU_KVCACHE in every_difference
    # the tiny spec's, composed with verl (its stage env may size the KV cache itself)
    (tiny,) = render_rl(tiny_ctx({"env": {ENV_VLLM_CPU_KVCACHE: "3"}}), sandbox_url=URL, cpu=True, paths=PATHS,
                        rollout="vllm")
    assert tiny.env[ENV_VLLM_CPU_KVCACHE] == "3"
    rollout = compose_config(tiny.argv, tiny.env)["actor_rollout_ref"]["rollout"]
    assert rollout["name"] == "vllm" and rollout["mode"] == "async" and rollout["enable_sleep_mode"] is False


def test_rollout_choice() -> None:
    # auto on CPU: vLLM's CPU build where it is installed (the `vllm` extra), else retool's own
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert choose_rollout("auto", cpu=True) == ("vllm" if has_vllm else "transformers")
    assert choose_rollout("transformers", cpu=False) == "transformers"
    assert choose_rollout("vllm", cpu=False) == "vllm"
    with pytest.raises(TerminalError):
        choose_rollout("sglang", cpu=True)


def test_ppo_stage_with_recipe_options_composes_on_cpu() -> None:
    """`adv_estimator: gae` with a `critic:` block: verl's critic gets the recipe's PPO values, and
    the budget verl 0.9.1 really reads for it (ppo_infer_max_token_len_per_gpu). The `recipe:`
    options reach the reward (reward_kwargs) and the tool (environment)."""
    edit = {"algorithm": {"adv_estimator": "gae", "gamma": 0.99, "lam": 0.95},
            "critic": {"lr": 3e-6, "warmup_steps": 2, "ppo_max_token_len_per_gpu": 2048,
                       "ulysses_sequence_parallel_size": 1},
            "recipe": {"lenient_fences": True, "strip_answer": True, "answer_window": 300}}
    (cmd,) = render_rl(tiny_ctx(edit), sandbox_url=URL, cpu=True, paths=PATHS)
    assert "PPO" in cmd.description and cmd.env["RETOOL_TOOL_LENIENT_FENCES"] == "true"
    # verl hard-codes FlashAttention 2 for the critic: on CPU runtime.verl.value_model loads it with sdpa
    assert VALUE_MODEL_MODULE in cmd.env["VERL_USE_EXTERNAL_MODULES"].split(",")
    assert cmd.env[ENV_VALUE_MODEL_ATTN] == "sdpa"
    cfg = compose_config(cmd.argv, cmd.env)
    assert cfg["reward"]["custom_reward_function"]["reward_kwargs"] == {"answer_window": 300, "strip_answer": True}
    critic, algo = cfg["critic"], cfg["algorithm"]
    assert algo["adv_estimator"] == "gae" and (algo["gamma"], algo["lam"]) == (0.99, 0.95)
    assert critic["strategy"] == "fsdp2" and critic["optim"]["lr"] == 3e-6
    assert critic["model"]["path"] == "/vol/c/sft/ab/merged"  # the actor's initial weights, as in the recipe
    assert critic["ppo_max_token_len_per_gpu"] == 2048 and critic["ppo_infer_max_token_len_per_gpu"] == 2048
    assert critic["fsdp"]["ulysses_sequence_parallel_size"] == 1
    assert critic["fsdp"]["mixed_precision"]["param_dtype"] == "fp32"
    assert cfg["trainer"]["critic_warmup"] == 2


def test_critic_needs_gae_and_gae_needs_a_critic() -> None:
    with pytest.raises(ValueError, match="critic"):
        tiny_ctx({"algorithm": {"adv_estimator": "gae"}})
    with pytest.raises(ValueError, match="only used with adv_estimator gae"):
        tiny_ctx({"critic": {}})


def test_32b_stages_compose_with_the_recipes_values() -> None:
    """The 32B spec's stages (2 nodes each) carry the recipe's 32B values, and the PPO one
    composes with verl."""
    from runtime.verl.rl import rl_overrides
    from runtime.verl.sft import sft_overrides

    spec = parse_spec_text((SPECS / "retool-qwen32b.yaml").read_text())
    inputs = {
        "dataset.dapo_math": {"path": "/data/datasets/dapo_math/train.parquet"},
        "dataset.aime_2025": {"path": "/data/datasets/aime_2025/train.parquet"},
        "dataset.retool_sft": {"path": "/data/datasets/retool_sft/train.parquet"},
        "model.qwen32b": {"path": "/models/models/qwen32b"},
        "stage.sft": {"model_path": "/checkpoints/sft/x/merged"},
    }

    def ctx(stage: str, total: int) -> StageContext:
        return StageContext(spec=spec, spec_dir=str(SPECS), stage=stage, restart_id=RID, total_steps=total, inputs=inputs)

    def composed(module: str, overrides: list[str]) -> dict:
        return compose_config(["python", "-m", module, *overrides], {})

    ppo = composed("verl.trainer.main_ppo", rl_overrides(ctx("ppo", 250), PATHS, cpu=False, rollout="vllm"))
    arr, critic = ppo["actor_rollout_ref"], ppo["critic"]
    assert ppo["algorithm"]["adv_estimator"] == "gae" and ppo["trainer"]["critic_warmup"] == 20
    assert (ppo["data"]["train_batch_size"], arr["actor"]["ppo_mini_batch_size"], arr["rollout"]["n"]) == (1024, 256, 1)
    assert arr["actor"]["ppo_max_token_len_per_gpu"] == 36864 and critic["ppo_max_token_len_per_gpu"] == 73728
    assert critic["optim"]["lr"] == 2e-6 and critic["fsdp"]["param_offload"] is True
    assert arr["rollout"]["multi_turn"]["max_assistant_turns"] == 8 and ppo["trainer"]["nnodes"] == 2

    grpo = args_of(["python", "-m", "verl.trainer.main_ppo", *rl_overrides(ctx("grpo", 150), PATHS, cpu=False, rollout="vllm")])
    a, r = "actor_rollout_ref.actor.", "actor_rollout_ref.rollout."
    assert (grpo["data.train_batch_size"], grpo[a + "ppo_mini_batch_size"], grpo[r + "n"]) == ("512", "64", "16")
    assert grpo[a + "ulysses_sequence_parallel_size"] == "8" and grpo[a + "ppo_max_token_len_per_gpu"] == "18432"
    assert grpo["actor_rollout_ref.ref.log_prob_max_token_len_per_gpu"] == "73728"
    assert grpo["trainer.log_val_generations"] == "100" and grpo["trainer.test_freq"] == "5"
    assert not any(k.startswith(("critic.", "+critic.")) for k in grpo)

    sft = args_of(["torchrun", "-m", "verl.trainer.sft_trainer", *sft_overrides(ctx("sft", 372), PATHS, cpu=False)])
    assert (sft["trainer.nnodes"], sft["trainer.n_gpus_per_node"], sft["trainer.total_training_steps"]) == ("2", "8", "372")
    assert sft["model.path"] == "/models/models/qwen32b" and sft["engine.ulysses_sequence_parallel_size"] == "4"
