"""runtime.verl.cpu_platform: verl 0.9.1 selects it through its own hooks, and SFT trains on CPU
through the command runtime.verl.sft renders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reconciler.spec import Spec
from reconciler.backend import StageContext
from runtime.verl.common import StagePaths
from runtime.verl.sft import render_merge, render_sft
from tests.local_helpers import free_port, tiny_model, write_sft_parquet


def tiny_sft_spec() -> Spec:
    return Spec.model_validate({
        "name": "cpu-test",
        "datasets": {"train": {"source": "path:x.jsonl", "format": "messages"}},
        "models": {"tiny": {"source": "builtin:tiny-qwen2"}},
        "stages": {"sft": {
            "kind": "sft", "model": "model.tiny", "train": "dataset.train", "resources": {"processes_per_node": 1},
            "max_length": 512, "train_batch_size": 8, "micro_batch_size_per_gpu": 8, "epochs": 1,
            "optim": {"lr": 3e-3}, "ulysses_sequence_parallel_size": 1, "save_freq": 2,
        }},
    })


def rendered_cpu_env() -> dict[str, str]:
    """The verl selectors (VERL_*) of the environment render_sft gives a CPU run."""
    ctx = StageContext(spec=tiny_sft_spec(), spec_dir="/unused", stage="sft", restart_id="d4" * 32, total_steps=3,
                       inputs={"dataset.train": {"path": "/unused/train.parquet"}, "model.tiny": {"path": "/unused/m"}})
    cmd = render_sft(ctx, StagePaths(stage_dir="/unused/c", ckpt_dir="/unused/c", merged_dir="/unused/m"), cpu=True)
    return {k: v for k, v in cmd.env.items() if k.startswith("VERL_")}


def test_normalize_backend_only_collapses_the_cpu_pair():
    from runtime.verl.cpu_platform import normalize_backend

    assert normalize_backend("cpu:gloo,cpu:gloo") == "gloo"
    assert normalize_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"
    assert normalize_backend("nccl") == "nccl" and normalize_backend(None) is None


def test_verl_selects_the_platform_in_a_fresh_process():
    """With the VERL_* variables retool renders for a CPU run (module, platform name, engine
    device), verl itself picks the CPU platform: the names the renderer writes are the ones the
    platform module registers."""
    probe = textwrap.dedent("""
        import json, torch, torch.distributed as dist
        import verl
        from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device, get_device_id
        from verl.utils.distributed import initialize_global_process_group
        from verl.workers.engine.base import EngineRegistry
        import verl.workers.engine.fsdp  # registers the FSDP engines
        dev = get_torch_device()
        initialize_global_process_group()
        free, total = dev.mem_get_info()
        t = torch.ones(2).to(get_device_id())
        dist.all_reduce(t)
        print(json.dumps({
            "device": get_device_name(), "backend": get_nccl_backend(), "dist_backend": dist.get_backend(),
            "current": dev.current_device(), "free": free, "total": total, "allocated": dev.memory_allocated(),
            "tensor_device": str(t.device), "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
        }))
        dist.destroy_process_group()
    """)
    env = {**os.environ, **rendered_cpu_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", probe], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert (info["device"], info["backend"], info["dist_backend"], info["current"]) == ("cpu", "gloo", "gloo", "cpu")
    assert info["tensor_device"] == "cpu" and info["engine"] == "FSDPEngineWithLMHead"
    assert 0 < info["free"] <= info["total"] and info["allocated"] > 0


def test_three_sft_steps_on_cpu_through_the_rendered_command(tmp_path: Path):
    model = tiny_model()
    train = write_sft_parquet(tmp_path / "data", rows=48)
    spec = tiny_sft_spec()
    ctx = StageContext(spec=spec, spec_dir=str(tmp_path), stage="sft", restart_id="d4" * 32, total_steps=3,
                       inputs={"dataset.train": {"path": str(train)}, "model.tiny": {"path": str(model)}})
    ckpt = tmp_path / "ckpt"
    cmd = render_sft(ctx, StagePaths(stage_dir=str(ckpt), ckpt_dir=str(ckpt), merged_dir=str(tmp_path / "m")), cpu=True)
    argv = [str(Path(sys.executable).parent / "torchrun"), *cmd.argv[1:]]
    done = subprocess.run(argv, check=False, env={**os.environ, **cmd.env}, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    from runtime.metrics import parse_text

    records = parse_text(log)
    assert [r.step for r in records] == [1, 2, 3]
    assert all(r.values["train/loss"] > 0 for r in records)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (ckpt / "global_step_3" / "model_world_size_1_rank_0.pt").is_file()

    merge = render_merge(str(ckpt / "global_step_3"), str(tmp_path / "merged"))
    done = subprocess.run([sys.executable, *merge.argv[1:]], check=False, env={**os.environ, **merge.env}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.hidden_size == 64


@pytest.fixture(autouse=True)
def _no_stray_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
