"""SFT stage -> verl 0.9.1 commands: `torchrun -m verl.trainer.sft_trainer` and the merge
of a checkpoint into a Hugging Face model (`python -m verl.model_merger merge`).

Key names come from verl 0.9.1's `trainer/config/sft_trainer_engine.yaml` (and its
`model/hf_model.yaml`, `engine/fsdp.yaml`, `optim/fsdp.yaml` defaults); tests compose every
rendered command with verl's own hydra config (`--cfg job`), so a wrong key fails there.
"""

from __future__ import annotations

from reconciler.errors import TerminalError
from reconciler.spec import SFTStage
from reconciler.backend import RenderedCommand, StageContext
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

SFT_MODULE = "verl.trainer.sft_trainer"
MERGE_MODULE = "verl.model_merger"


def sft_stage(ctx: StageContext) -> SFTStage:
    stage = stage_spec(ctx)
    if not isinstance(stage, SFTStage):
        raise TerminalError(f"stage.{ctx.stage} is not an SFT stage")
    return stage


def sft_overrides(
    ctx: StageContext, paths: StagePaths, *, cpu: bool, attn_implementation: str | None = None
) -> list[str]:
    """Hydra overrides for verl's SFT trainer, the spec's raw `overrides` last."""
    stage = sft_stage(ctx)
    nnodes, nproc = world(stage)
    opt = stage.optim
    ours = [
        kv("data.train_files", dataset_file(ctx, stage.train)),
        kv("data.val_files", dataset_file(ctx, stage.val) if stage.val else None),
        kv("data.messages_key", "messages"),
        kv("data.tools_key", "tools"),
        kv("data.max_length", stage.max_length),
        kv("data.truncation", stage.truncation),
        kv("data.train_batch_size", stage.train_batch_size),
        kv("data.micro_batch_size_per_gpu", stage.micro_batch_size_per_gpu),
        # The recipe's micro batch is a sample count; verl's token-budget batching would ignore it.
        kv("data.use_dynamic_bsz", False),
        kv("model.path", initial_weights_dir(ctx, stage.model)),
        kv("model.use_remove_padding", stage.use_remove_padding),
        kv("model.enable_gradient_checkpointing", stage.gradient_checkpointing),
        kv("engine.strategy", fsdp_strategy(cpu=cpu)),
        kv("engine.ulysses_sequence_parallel_size", stage.ulysses_sequence_parallel_size),
        kv("engine.seed", stage.seed),
        kv("optim.lr", opt.lr),
        kv("optim.betas", list(opt.betas)),
        kv("optim.weight_decay", opt.weight_decay),
        kv("optim.lr_warmup_steps_ratio", opt.warmup_ratio),
        kv("optim.lr_scheduler_type", opt.lr_scheduler),
        kv("optim.clip_grad", opt.clip_grad),
        # One spare epoch: verl resumes a checkpoint taken at an epoch's last step with an
        # exhausted dataloader, so that epoch yields nothing; total_training_steps still ends
        # the run exactly where the spec says (and drives the LR schedule).
        kv("trainer.total_epochs", stage.epochs + 1 if ctx.total_steps is not None else stage.epochs),
        kv("trainer.total_training_steps", ctx.total_steps),
        kv("trainer.save_freq", stage.save_freq),
        # verl validates at test_freq even without a validation set, and then fails.
        kv("trainer.test_freq", stage.test_freq if stage.val else -1),
        kv("trainer.max_ckpt_to_keep", stage.max_ckpt_to_keep),
        kv("trainer.logger", logger_list(stage.logging)),
        kv("trainer.project_name", stage.logging.project),
        kv("trainer.experiment_name", experiment_name(ctx)),
        kv("trainer.seed", stage.seed),
        kv("trainer.default_local_dir", paths.ckpt_dir),
        kv("trainer.resume_mode", "auto"),
        kv("trainer.nnodes", nnodes),
        kv("trainer.n_gpus_per_node", nproc),
        kv("trainer.device", "cpu" if cpu else "cuda"),
        *tracking.identity_overrides(ctx),
    ]
    if ctx.resume_from is not None:
        # auto mode honours an explicit path: resume exactly where the plan said.
        ours.append(kv("trainer.resume_from_path", f"{paths.ckpt_dir.rstrip('/')}/global_step_{ctx.resume_from}"))
    if cpu:
        ours.append(kv("data.num_workers", 0))  # dataloader workers only compete for the cores
    attn = "sdpa" if cpu else attn_implementation
    if attn:
        ours.append(kv("+model.override_config.attn_implementation", attn))
    return merge_overrides(ours, list(stage.overrides))


def render_sft(
    ctx: StageContext, paths: StagePaths, *, cpu: bool, attn_implementation: str | None = None,
    wandb_key: bool = False,
) -> RenderedCommand:
    """The training command of an SFT stage: `torchrun --standalone` on one node; on N nodes
    `torchrun --nnodes=N`, to which each node adds its `--node_rank` and rank 0's address
    when it starts (runtime.cluster). `wandb_key`: WANDB_API_KEY is in the environment the
    command inherits (else W&B logs offline unless a secret of the stage carries the key)."""
    stage = sft_stage(ctx)
    nnodes, nproc = world(stage)
    dp = max(1, nnodes * nproc // stage.ulysses_sequence_parallel_size)
    per_rank = stage.train_batch_size // dp
    if per_rank % stage.micro_batch_size_per_gpu:
        # verl asserts this inside the first step, after minutes of start-up on a big model
        raise TerminalError(
            f"stage.{ctx.stage}: micro_batch_size_per_gpu {stage.micro_batch_size_per_gpu} does not divide the "
            f"per-process batch {per_rank} (train_batch_size {stage.train_batch_size} over {dp} data-parallel ranks)",
            hint="pick a micro batch that divides train_batch_size / (processes / ulysses_sequence_parallel_size)",
        )
    argv = [
        "torchrun", *(["--standalone", "--nnodes=1"] if nnodes == 1 else [f"--nnodes={nnodes}"]),
        f"--nproc_per_node={nproc}",
        "-m", SFT_MODULE,
        *sft_overrides(ctx, paths, cpu=cpu, attn_implementation=attn_implementation),
    ]
    run = tracking.wandb_run(
        ctx.spec, ctx.stage, ctx.restart_id, key_available=wandb_key or tracking.key_declared(ctx.spec, ctx.stage)
    )
    return RenderedCommand(
        argv=argv,
        # W&B's run first: the image's and the stage's own env still win.
        env={**tracking.wandb_env(run, ctx.stage, stage.kind, paths.stage_dir),
             **base_env(ctx, cpu=cpu, external_modules=(SAVE_MARKER_MODULE,))},
        secret_env=secret_env_names(ctx.spec, stage.secrets),
        description=f"verl SFT of stage.{ctx.stage} on {'CPU' if cpu else 'GPU'} ({nproc} process{'es' if nproc > 1 else ''})",
    )


def render_merge(checkpoint_dir: str, target_dir: str) -> RenderedCommand:
    """Merge one FSDP checkpoint (`.../global_step_N`, or its `actor/` for RL) into a
    Hugging Face model directory."""
    return RenderedCommand(
        argv=[
            "python", "-m", MERGE_MODULE, "merge", "--backend", "fsdp",
            "--local_dir", checkpoint_dir, "--target_dir", target_dir,
        ],
        env={"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        description="merge the checkpoint into a Hugging Face model",
    )
