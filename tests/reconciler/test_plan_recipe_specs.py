"""`retool plan` of the recipe specs, as a user runs it (no Modal access: the unreachable state
store counts as empty): every stage, the 32B spec's 2-node ones included, is planned and priced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def plan(spec: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "plan", str(ROOT / "specs" / spec), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_32b_stages_run_on_two_nodes_and_are_priced() -> None:
    done = plan("retool-qwen32b.yaml", "--json")
    assert done.returncode == 0, done.stderr
    changes = {c["address"]: c for c in json.loads(done.stdout)["changes"]}
    # the training stages (the spec may also evaluate their models in eval stages)
    stages = {a: changes[a] for a in ("stage.sft", "stage.grpo", "stage.ppo")}
    for address, change in stages.items():
        assert change["action"] == "create", (address, change["reasons"])
        est = change["estimate"]
        assert est["steps"] == change["total_steps"] and est["gpu_hours"] > 0 and est["usd"] > 0, address
    # 16 GPUs each: 372 SFT steps (6 epochs x 62), then the steps the recipe's README reports at
    assert [stages[a]["total_steps"] for a in ("stage.sft", "stage.grpo", "stage.ppo")] == [372, 150, 250]
    sft = stages["stage.sft"]["estimate"]
    assert round(sft["gpu_hours"], 1) == round(372 * 170 * 16 / 3600, 1)

    text = plan("retool-qwen32b.yaml")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("on H100:8 x 2 nodes ≈") == 3


def test_7b_stages_run_and_are_priced() -> None:
    done = plan("retool-qwen7b.yaml", "--json")
    assert done.returncode == 0, done.stderr
    changes = {c["address"]: c for c in json.loads(done.stdout)["changes"]}
    for address in ("stage.sft", "stage.dapo"):
        assert changes[address]["action"] == "create" and changes[address]["estimate"]["usd"] > 0
