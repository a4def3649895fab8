"""`retool render` needs no backend access: before the first apply, with no Modal credentials,
the real spec still renders, inputs shown where the backend will put them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_real_spec_renders_offline_before_any_apply(tmp_path: Path) -> None:
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(tmp_path), COLUMNS="200", NO_COLOR="1")  # no ~/.modal.toml either
    result = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "render", "specs/retool-qwen7b.yaml", "stage.dapo"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "verl.trainer.main_ppo" in result.stdout
    assert "data.train_files=/data/datasets/dapo_math/train.parquet" in result.stdout
    assert "/checkpoints/sft/<restart id>/merged" in result.stdout  # the upstream stage, not yet run
    assert "no local copy" in result.stderr  # it says it planned without the shared state
    assert "WANDB_API_KEY" in result.stdout and "secrets (values never shown)" in result.stdout
    assert not (tmp_path / ".retool" / "state.json").exists()  # rendering changed nothing
