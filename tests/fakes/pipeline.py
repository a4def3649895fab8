"""A small pipeline spec for engine, status and CLI tests, written to a real file.

    volume.data ──> dataset.sft_data ──┐
    volume.data ──> dataset.rl_data ───┼──────────────┐
    volume.models ─> model.base ───────┴─> stage.sft ─┴─> stage.rl
    volume.checkpoints ───────────────────────┘   image ··> sandbox ··┘

stage.sft trains 64 rows // batch 8 × 2 epochs = 16 steps (checkpoint every 5);
stage.rl trains 3 steps (max_steps). CPU-only; `cpu_hour_usd: 3600` makes a second of
run time cost exactly $1, so cost arithmetic is easy to check.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from reconciler.loader import LoadedSpec, load_spec

BASE: dict[str, Any] = {
    "name": "demo",
    "backend": "local",
    "pricing": {"cpu_hour_usd": 3600.0},
    "volumes": {
        "data": {"mount": "/data"},
        "models": {"mount": "/models"},
        "checkpoints": {"mount": "/checkpoints"},
    },
    "image": {"base": "python:3.12-slim", "pip": ["verl==0.9.1"]},
    "sandbox": {"placement": "sidecar", "workers": 2},
    "datasets": {
        "sft_data": {"source": "builtin:tiny_sft", "format": "messages", "options": {"rows": 64}},
        "rl_data": {"source": "builtin:tiny_math", "format": "rl", "options": {"rows": 32}},
    },
    "models": {"base": {"source": "builtin:tiny-qwen2"}},
    "stages": {
        "sft": {
            "kind": "sft", "model": "model.base", "train": "dataset.sft_data",
            "epochs": 2, "train_batch_size": 8, "micro_batch_size_per_gpu": 8, "max_length": 512,
            "ulysses_sequence_parallel_size": 1, "save_freq": 5, "seconds_per_step": 2,
        },
        "rl": {
            "kind": "rl", "model": "stage.sft", "train": "dataset.rl_data",
            "max_steps": 3, "train_batch_size": 4, "ppo_mini_batch_size": 4, "save_freq": 1,
            "ulysses_sequence_parallel_size": 1, "rollout": {"tensor_parallel_size": 1, "n": 2},
            "seconds_per_step": 30,
        },
    },
}


def spec_dict(**edits: Any) -> dict[str, Any]:
    """BASE with dotted-path edits: spec_dict(**{"stages.sft.optim": {"lr": 2e-5}}).
    A value of `None` removes the key."""
    data = copy.deepcopy(BASE)
    for path, value in edits.items():
        *parents, leaf = path.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def write_spec(directory: Path, data: dict[str, Any] | None = None, name: str = "demo.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(data if data is not None else BASE, sort_keys=False))
    return path


def load(directory: Path, **edits: Any) -> LoadedSpec:
    return load_spec(write_spec(directory, spec_dict(**edits)))
