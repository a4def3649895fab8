"""runtime.tracking with the real wandb client, offline (no W&B server): the environment it
renders makes `wandb.init` as verl calls it (project, name, config; nothing else) write the
stage's run into the run directory under the stable id, and a second process with the same
environment (a resumed segment) continues that run in a folder of its own; the local
observation lists both folders and the one `wandb sync` that uploads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.loader import load_spec
from runtime import tracking

REPO = Path(__file__).resolve().parents[2]
WANDB = Path(sys.executable).with_name("wandb")
RID = "ab" * 32

# verl 0.9.1's call (verl/utils/tracking.py), then one log per step.
TRAINER = """
import sys, wandb
first, last = int(sys.argv[1]), int(sys.argv[2])
wandb.init(project="retool", name="retool-tiny-sft", entity=None, config={"trainer": {"seed": 1}}, settings=None)
for step in range(first, last + 1):
    wandb.log({"train/loss": 1.0 / step}, step=step)
wandb.finish()
"""


def trainer(env: dict[str, str], first: int, last: int) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", TRAINER, str(first), str(last)], env={**base, **env},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def records(folder: str) -> list[dict[str, object]]:
    (file,) = Path(folder).glob("run-*.wandb")
    done = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(file)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(not WANDB.exists(), reason="the wandb CLI is not installed beside this Python")
def test_segments_of_a_stage_write_one_offline_run_in_its_run_directory(tmp_path: Path) -> None:
    spec = load_spec(REPO / "specs" / "retool-tiny.yaml").spec
    run = tracking.wandb_run(spec, "sft", RID, key_available=False)
    assert run is not None and run.mode == "offline"
    env = tracking.wandb_env(run, "sft", "sft", str(tmp_path))
    assert tracking.observed_local(run, str(tmp_path), None) == run.model_copy(update={"run_dirs": [], "sync_command": None})

    trainer(env, 1, 3)
    trainer(env, 4, 5)  # the resumed segment

    seen = tracking.observed_local(run, str(tmp_path), None)
    assert seen is not None and len(seen.run_dirs) == 2
    assert all(Path(d).parent == tmp_path / "wandb" for d in seen.run_dirs)
    assert seen.sync_command == f"wandb sync {seen.run_dirs[0]} {seen.run_dirs[1]}"
    steps: list[int] = []
    for folder in seen.run_dirs:
        recs = records(folder)
        meta = next(r["run"] for r in recs if r["type"] == "run")
        assert isinstance(meta, dict)
        assert (meta["run_id"], meta["run_group"], meta["job_type"]) == (run.run_id, "retool-tiny", "sft")
        steps += [r["history"]["step"]["num"] for r in recs if r["type"] == "history"]  # type: ignore[index]
    assert steps == [1, 2, 3, 4, 5]
    # With a key the same run goes online; the id does not change.
    online = tracking.wandb_run(spec, "sft", RID, key_available=True)
    assert online is not None and online.run_id == run.run_id
    assert "WANDB_MODE" not in tracking.wandb_env(online, "sft", "sft", str(tmp_path))


def test_an_offline_run_on_a_modal_volume_names_its_folder_and_how_to_fetch_it() -> None:
    spec = load_spec(REPO / "specs" / "retool-tiny.yaml").spec
    run = tracking.wandb_run(spec, "sft", RID, key_available=False)
    seen = tracking.observed_on_volume(run, "retool-tiny-checkpoints", f"sft/{RID[:16]}", "dev")
    assert seen is not None and seen.run_dirs == [f"retool-tiny-checkpoints:/sft/{RID[:16]}/wandb"]
    assert seen.sync_command is not None
    assert seen.sync_command.startswith(f"modal volume get -e dev retool-tiny-checkpoints sft/{RID[:16]}/wandb ")
    assert f"-name 'offline-run-*-{seen.run_id}'" in seen.sync_command and "&& wandb sync $(" in seen.sync_command
