"""Rendered verl commands compose with verl 0.9.1's own hydra config (`--cfg job`).

Each composition runs the real entry module in a subprocess (a few seconds each), so the
checks below are grouped to keep the number of compositions small.
"""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.errors import TerminalError
from reconciler.spec import Spec
from reconciler.backend import StageContext
from runtime.verl.common import (
    StagePaths,
    base_env,
    compose_config,
    entry_point,
    hydra_value,
    merge_overrides,
    override_key,
)
from runtime.verl.sft import render_merge, render_sft

RID = "c3" * 32
PATHS = StagePaths(stage_dir="/vol/ckpt/sft/x", ckpt_dir="/vol/ckpt/sft/x", merged_dir="/vol/ckpt/sft/x/merged")


def make_spec(**sft: Any) -> Spec:
    stage = {
        "kind": "sft", "model": "model.tiny", "train": "dataset.train", "resources": {"processes_per_node": 2},
        "max_length": 512, "train_batch_size": 16, "micro_batch_size_per_gpu": 2,
        "optim": {"lr": 3.0e-3, "betas": [0.8, 0.9], "weight_decay": 0.05, "warmup_ratio": 0.2,
                  "lr_scheduler": "constant", "clip_grad": 0.5},
        "ulysses_sequence_parallel_size": 1, "use_remove_padding": False, "gradient_checkpointing": False,
        "epochs": 3, "save_freq": 7, "max_ckpt_to_keep": 2, "seed": 11,
        "logging": {"backends": ["wandb"], "project": "proj", "experiment": "exp"},
        "secrets": ["wandb"], "env": {"EXTRA": "1"},
    }
    stage.update(sft)
    return Spec.model_validate({
        "name": "render-test",
        "secrets": {"wandb": {"env": ["WANDB_API_KEY"]}},
        "volumes": {"checkpoints": {"mount": "/c"}},
        "datasets": {"train": {"source": "path:t.jsonl", "format": "messages"},
                     "val": {"source": "path:v.jsonl", "format": "messages"}},
        "models": {"tiny": {"source": "builtin:tiny-qwen2"}},
        "stages": {"sft": stage, "sft2": {**stage, "model": "stage.sft", "secrets": []}},
    })


INPUTS = {
    "dataset.train": {"path": "/vol/data/datasets/train a=b/train.parquet", "rows": 100},
    "dataset.val": {"path": "/vol/data/datasets/val"},
    "model.tiny": {"path": "/vol/models/models/tiny"},
    "stage.sft": {"model_path": "/vol/ckpt/sft/x/merged", "final_step": 18},
}


def ctx_for(spec: Spec, stage: str = "sft", **kw: Any) -> StageContext:
    return StageContext(spec=spec, spec_dir="/specs", stage=stage, restart_id=RID, inputs=INPUTS, **kw)


def test_cpu_render_composes_with_every_spec_value_in_place(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-value")
    spec = make_spec(val="dataset.val", test_freq=5)
    cmd = render_sft(ctx_for(spec, total_steps=18, resume_from=7), PATHS, cpu=True)
    assert cmd.argv[:6] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "verl.trainer.sft_trainer"]
    assert cmd.secret_env == ["WANDB_API_KEY"]
    assert "sekrit-value" not in cmd.model_dump_json()
    cfg = compose_config(cmd.argv, cmd.env)
    data, model, engine, optim, trainer = (cfg[k] for k in ("data", "model", "engine", "optim", "trainer"))
    assert data["train_files"] == "/vol/data/datasets/train a=b/train.parquet"  # quoted through hydra intact
    assert data["val_files"] == "/vol/data/datasets/val/train.parquet"
    assert (data["messages_key"], data["tools_key"]) == ("messages", "tools")
    assert (data["max_length"], data["truncation"], data["train_batch_size"], data["micro_batch_size_per_gpu"]) == (512, "error", 16, 2)
    assert data["use_dynamic_bsz"] is False and data["num_workers"] == 0
    assert model["path"] == "/vol/models/models/tiny"
    assert model["use_remove_padding"] is False and model["enable_gradient_checkpointing"] is False
    assert model["override_config"] == {"attn_implementation": "sdpa"}
    assert (engine["strategy"], engine["ulysses_sequence_parallel_size"], engine["seed"]) == ("fsdp2", 1, 11)
    assert (optim["lr"], optim["betas"], optim["weight_decay"]) == (3.0e-3, [0.8, 0.9], 0.05)
    assert (optim["lr_warmup_steps_ratio"], optim["lr_scheduler_type"], optim["clip_grad"]) == (0.2, "constant", 0.5)
    assert (trainer["total_epochs"], trainer["total_training_steps"]) == (4, 18)  # a spare epoch, steps decide
    assert (trainer["save_freq"], trainer["test_freq"], trainer["max_ckpt_to_keep"]) == (7, 5, 2)
    assert trainer["logger"] == ["console", "wandb"]
    assert (trainer["project_name"], trainer["experiment_name"], trainer["seed"]) == ("proj", "exp", 11)
    assert trainer["default_local_dir"] == PATHS.ckpt_dir
    assert trainer["resume_mode"] == "auto"
    assert trainer["resume_from_path"] == f"{PATHS.ckpt_dir}/global_step_7"
    assert (trainer["device"], trainer["n_gpus_per_node"]) == ("cpu", 2)
    # the run's identity reaches W&B's config through verl's own config
    assert cfg["retool"] == {"spec": "render-test", "stage": "stage.sft", "restart_id": RID}
    env = cmd.env
    assert env["VERL_USE_EXTERNAL_MODULES"] == "runtime.verl.cpu_platform,runtime.verl.save_marker"
    assert env["VERL_PLATFORM"] == "cpu"
    assert env["VERL_ENGINE_DEVICE"] == "cuda" and env["RAY_AUTH_MODE"] == "disabled" and env["EXTRA"] == "1"


def test_wandb_run_is_one_per_restart_identity_and_offline_without_a_key():
    spec = make_spec(secrets=[])  # no secret carries WANDB_API_KEY
    first = render_sft(ctx_for(spec, total_steps=18), PATHS, cpu=True).env
    resumed = render_sft(ctx_for(spec, total_steps=30, resume_from=18), PATHS, cpu=True).env
    online = render_sft(ctx_for(spec, total_steps=18), PATHS, cpu=True, wandb_key=True).env
    other = render_sft(StageContext(spec=spec, spec_dir="/s", stage="sft", restart_id="d4" * 32, inputs=INPUTS), PATHS, cpu=True).env
    assert first["WANDB_MODE"] == "offline" and "WANDB_MODE" not in online
    assert first["WANDB_RUN_ID"] == resumed["WANDB_RUN_ID"] == online["WANDB_RUN_ID"] != other["WANDB_RUN_ID"]
    assert first["WANDB_RUN_ID"].startswith("render-test-sft-") and first["WANDB_RESUME"] == "allow"
    assert first["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] == "1"  # a killed run keeps its steps on disk
    assert (first["WANDB_RUN_GROUP"], first["WANDB_JOB_TYPE"], first["WANDB_DIR"]) == ("render-test", "sft", PATHS.stage_dir)
    assert "WANDB_MODE" not in render_sft(ctx_for(make_spec()), PATHS, cpu=True).env  # the `wandb` secret has the key
    forced = render_sft(ctx_for(make_spec(secrets=[], env={"WANDB_MODE": "online"})), PATHS, cpu=True).env
    assert forced["WANDB_MODE"] == "online"  # the stage's own env wins
    quiet = render_sft(ctx_for(make_spec(logging={"backends": ["console"]})), PATHS, cpu=True)
    assert not any(k.startswith("WANDB_") for k in quiet.env) and not any("retool." in a for a in quiet.argv)


def test_gpu_render_from_upstream_stage_with_user_overrides_last():
    spec = make_spec(overrides=["+model.override_config.attn_implementation=eager", "data.max_token_len_per_gpu=4096"])
    cmd = render_sft(ctx_for(spec, "sft2", total_steps=None), PATHS, cpu=False, attn_implementation="sdpa")
    assert "VERL_PLATFORM" not in cmd.env and cmd.secret_env == []
    # ours stepped aside for the user's key (hydra refuses a `+key` twice)
    assert [a for a in cmd.argv if "attn_implementation" in a] == ["+model.override_config.attn_implementation=eager"]
    assert cmd.argv[-2:] == spec.stages["sft2"].overrides
    cfg = compose_config(cmd.argv, cmd.env)
    assert cfg["model"]["override_config"] == {"attn_implementation": "eager"}
    assert cfg["model"]["path"] == "/vol/ckpt/sft/x/merged"  # the upstream stage's merged model
    assert cfg["trainer"]["device"] == "cuda" and cfg["trainer"]["total_training_steps"] is None
    assert cfg["trainer"]["total_epochs"] == 3  # without a step count the epochs decide
    assert cfg["trainer"]["resume_from_path"] is None and cfg["trainer"]["test_freq"] == -1  # no val set
    assert cfg["data"]["num_workers"] == 8  # verl's default off CPU
    assert cfg["engine"]["strategy"] == "fsdp"  # the recipe's FSDP1 on GPUs (fsdp2 only on CPU)
    assert cfg["data"]["max_token_len_per_gpu"] == 4096


def test_misspelt_spec_override_fails_composition():
    spec = make_spec(overrides=["data.train_filez=/x.parquet"])
    cmd = render_sft(ctx_for(spec, total_steps=3), PATHS, cpu=True)
    with pytest.raises(TerminalError) as err:
        compose_config(cmd.argv, cmd.env)
    assert "train_filez" in err.value.detail


def test_a_renderer_typo_would_be_caught():
    """The check is what guards the renderer: the same command with one key misspelt fails."""
    cmd = render_sft(ctx_for(make_spec(), total_steps=3), PATHS, cpu=True)
    broken = [a.replace("optim.lr_warmup_steps_ratio=", "optim.warmup_steps_ratio=") for a in cmd.argv]
    assert broken != cmd.argv
    with pytest.raises(TerminalError) as err:
        compose_config(broken, cmd.env)
    assert "warmup_steps_ratio" in err.value.detail


def test_missing_upstream_outputs_is_a_clear_error():
    spec = make_spec()
    ctx = StageContext(spec=spec, spec_dir="/s", stage="sft2", restart_id=RID, inputs={"dataset.train": INPUTS["dataset.train"]})
    with pytest.raises(TerminalError, match="stage.sft"):
        render_sft(ctx, PATHS, cpu=True)


def test_merge_command_shape():
    cmd = render_merge("/c/sft/x/global_step_9", "/c/sft/x/merged")
    assert cmd.argv == [
        "python", "-m", "verl.model_merger", "merge", "--backend", "fsdp",
        "--local_dir", "/c/sft/x/global_step_9", "--target_dir", "/c/sft/x/merged",
    ]


def test_hydra_values_and_override_keys():
    assert hydra_value(None) == "null" and hydra_value(True) == "true" and hydra_value(1e-5) == "1e-05"
    assert hydra_value([0.9, 0.95]) == "[0.9,0.95]" and hydra_value(["console", "wandb"]) == "[console,wandb]"
    assert hydra_value("/a/b.parquet") == "/a/b.parquet"
    assert hydra_value("it's") == "'it\\'s'" and hydra_value("null") == "'null'"
    assert override_key("++a.b=1") == "a.b" and override_key("~x.y") == "x.y"
    assert merge_overrides(["a=1", "+b=2", "c=3"], ["b=9", "a=8"]) == ["c=3", "b=9", "a=8"]
    assert entry_point(["torchrun", "--x", "-m", "mod", "k=v"]) == ("mod", ["k=v"])


def test_base_env_joins_external_modules():
    env = base_env(ctx_for(make_spec()), cpu=True, external_modules=("runtime.verl.rollout.plugin",))
    assert env["VERL_USE_EXTERNAL_MODULES"] == "runtime.verl.cpu_platform,runtime.verl.rollout.plugin"
    env = base_env(ctx_for(make_spec()), cpu=False, external_modules=("runtime.verl.rollout.plugin",))
    assert env["VERL_USE_EXTERNAL_MODULES"] == "runtime.verl.rollout.plugin" and "VERL_PLATFORM" not in env


def test_rl_render_composes_with_main_ppo(tmp_path):
    from runtime.local.backend import LocalRuntime

    spec = Spec.model_validate({
        "name": "rl-render", "sandbox": {},
        "volumes": {"checkpoints": {"mount": "/c"}},
        "datasets": {"math": {"source": "builtin:tiny_math", "format": "rl"},
                     "aime": {"source": "path:a.jsonl", "format": "aime_2024"}},
        "models": {"tiny": {"source": "builtin:tiny-qwen2"}},
        "stages": {"rl": {"kind": "rl", "model": "model.tiny", "train": "dataset.math", "val": ["dataset.aime"],
                          "resources": {"processes_per_node": 1}, "max_steps": 2, "train_batch_size": 4,
                          "ppo_mini_batch_size": 4, "ulysses_sequence_parallel_size": 1}},
    })
    ctx = StageContext(spec=spec, spec_dir=str(tmp_path), stage="rl", restart_id=RID, total_steps=2, inputs={
        "dataset.math": {"path": "/d/math/train.parquet"}, "dataset.aime": {"path": "/d/aime/train.parquet"},
        "model.tiny": {"path": "/m/tiny"}, "sandbox": {"url": "http://127.0.0.1:9"},
    })
    from runtime.verl.rl import render_rl

    rt = LocalRuntime(str(tmp_path))
    paths = rt.stage_paths(spec, "rl", RID)
    (cmd,) = render_rl(ctx, sandbox_url="http://127.0.0.1:9", cpu=True, paths=paths, rollout="transformers")
    cfg = compose_config(cmd.argv, cmd.env)
    assert cfg["trainer"]["default_local_dir"] == paths.ckpt_dir and cfg["trainer"]["device"] == "cpu"
    assert cfg["actor_rollout_ref"]["model"]["path"] == "/m/tiny"
    assert cfg["actor_rollout_ref"]["rollout"]["name"] == "transformers"
    assert cfg["data"]["train_files"] == "/d/math/train.parquet"
    typo = [*cmd.argv, "actor_rollout_ref.rollout.nn=4"]
    with pytest.raises(TerminalError) as err:
        compose_config(typo, cmd.env)
    assert "nn" in err.value.detail


def test_rl_render_on_gpu_without_flash_attn_uses_sdpa(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """verl loads the RL actor with FlashAttention 2 on GPU and fails where flash_attn is not
    installed (seen on an H200 with verl 0.9.1); the local backend then asks for sdpa."""
    import importlib.util

    from runtime.local.backend import LocalRuntime

    spec = Spec.model_validate({
        "name": "rl-gpu", "backend": "local", "sandbox": {},
        "volumes": {"checkpoints": {"mount": "/c"}},
        "datasets": {"math": {"source": "builtin:tiny_math", "format": "rl"}},
        "models": {"tiny": {"source": "builtin:tiny-qwen2"}},
        "stages": {"rl": {"kind": "rl", "model": "model.tiny", "train": "dataset.math",
                          "resources": {"processes_per_node": 1}, "max_steps": 2, "train_batch_size": 4,
                          "ppo_mini_batch_size": 4, "ulysses_sequence_parallel_size": 1}},
    })
    ctx = StageContext(spec=spec, spec_dir=str(tmp_path), stage="rl", restart_id=RID, total_steps=2, inputs={
        "dataset.math": {"path": "/d/math/train.parquet"}, "model.tiny": {"path": "/m/tiny"},
    })
    key = "+actor_rollout_ref.model.override_config.attn_implementation"
    monkeypatch.setenv("RETOOL_LOCAL_DEVICE", "cuda")
    real_find_spec = importlib.util.find_spec
    for flash_installed, expected in ((False, [f"{key}=sdpa"]), (True, [])):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, installed=flash_installed: (
            (object() if installed else None) if name == "flash_attn" else real_find_spec(name, *a)))
        cmd = LocalRuntime(str(tmp_path / "state")).render_stage(ctx)[0]
        assert [a for a in cmd.argv if a.startswith(key)] == expected
        assert "trainer.device=cuda" in cmd.argv
    from runtime.verl.rl import render_rl

    (gpu,) = render_rl(ctx, sandbox_url="http://127.0.0.1:9", cpu=False, paths=PATHS, rollout="transformers",
                       attn_implementation="sdpa")
    cfg = compose_config(gpu.argv, gpu.env)
    assert cfg["actor_rollout_ref"]["model"]["override_config"] == {"attn_implementation": "sdpa"}


def test_micro_batch_must_divide_the_per_process_batch():
    spec = make_spec(micro_batch_size_per_gpu=3)  # 16 over 2 ranks = 8 per rank
    with pytest.raises(TerminalError, match="does not divide the per-process batch 8"):
        render_sft(ctx_for(spec, total_steps=3), PATHS, cpu=True)
