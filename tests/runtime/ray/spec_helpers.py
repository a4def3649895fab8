"""The small spec the Ray backend's real-cluster tests apply: the sandbox, a dataset, the
tiny model and an SFT stage that checkpoints every 2 steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.local_helpers import write_sft_jsonl


def write_spec(root: Path, address: str, storage: Path, **sft: Any) -> Path:
    write_sft_jsonl(root / "train.jsonl", rows=32)
    stage = {
        "kind": "sft", "model": "model.tiny", "train": "dataset.train", "resources": {"processes_per_node": 1},
        "max_length": 512, "train_batch_size": 8, "micro_batch_size_per_gpu": 8, "epochs": 2,
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0}, "ulysses_sequence_parallel_size": 1,
        "use_remove_padding": True, "gradient_checkpointing": False, "save_freq": 2,
    }
    stage.update(sft)
    spec = {
        "name": "ray-e2e", "backend": "ray", "ray": {"address": address, "storage": str(storage)},
        "volumes": {"data": {"mount": "/data"}, "models": {"mount": "/models"}, "checkpoints": {"mount": "/c"}},
        "sandbox": {"placement": "sidecar", "workers": 1},
        "datasets": {"train": {"source": "path:train.jsonl", "format": "messages"}},
        "models": {"tiny": {"source": "builtin:tiny-qwen2"}},
        "stages": {"sft": stage},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
