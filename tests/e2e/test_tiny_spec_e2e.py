"""The README's main job, end to end through the real CLI: `retool apply specs/retool-tiny.yaml --yes`
from an empty state on this machine's CPU — data, tiny model, sandbox, SFT with verl, merge,
the tool-call check, RL with our rollout — then a re-apply that changes nothing.

Runs in a copy of `specs/` so the repository's own `.retool/` is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
APPLY_TIMEOUT_S = 1800


def retool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", *args], cwd=cwd, env=env, text=True, capture_output=True,
        timeout=APPLY_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    root = tmp_path_factory.mktemp("tiny-e2e")
    shutil.copytree(REPO / "specs", root / "specs")
    (root / ".git").mkdir()  # the state directory is `.retool/` at this (pretend) repository root
    result = retool("apply", "specs/retool-tiny.yaml", "--yes", cwd=root)
    try:
        yield root, result
    finally:
        stop_sandbox(root)


def stop_sandbox(root: Path) -> None:
    """The local sandbox sidecar outlives apply by design; a test must not leave it behind."""
    state_file = root / ".retool" / "state.json"
    if not state_file.exists():
        return
    pid = json.loads(state_file.read_text())["nodes"].get("sandbox", {}).get("outputs", {}).get("pid")
    if pid:
        try:
            os.killpg(os.getpgid(int(pid)), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def test_apply_builds_everything_and_every_node_is_healthy(applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, result = applied
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = retool("status", "specs/retool-tiny.yaml", "--json", cwd=root)
    assert status.returncode == 0, status.stderr
    nodes = {n["address"]: n for n in json.loads(status.stdout)["nodes"]}
    assert set(nodes) == {
        "volume.checkpoints", "volume.data", "volume.models", "image", "sandbox", "dataset.aime_2024",
        "dataset.tiny_math", "dataset.tiny_sft", "model.tiny", "stage.sft", "stage.rl",
    }
    assert {n["health"] for n in nodes.values()} == {"healthy"}
    assert {n["sync"] for n in nodes.values()} == {"in sync"}


def test_sft_teaches_the_tool_call_format_and_the_merged_model_generates(
    applied: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, result = applied
    assert result.returncode == 0
    sft = json.loads((root / ".retool" / "state.json").read_text())["nodes"]["stage.sft"]["outputs"]
    assert sft["tool_call_rate"] >= 0.8 and sft["tool_call_prompts"] == 50
    # retool prints the check after the stage (progress goes to stderr)
    assert f"tool-call rate {sft['tool_call_rate']:.2f} (" in result.stdout + result.stderr

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft["model_path"])
    model = AutoModelForCausalLM.from_pretrained(sft["model_path"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_rl_ran_with_tool_calls_and_wrote_its_checkpoint(applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, result = applied
    assert result.returncode == 0
    rl = json.loads((root / ".retool" / "state.json").read_text())["nodes"]["stage.rl"]["outputs"]
    assert rl["final_step"] == 2 and Path(rl["checkpoint"]).name == "global_step_2"
    assert Path(rl["model_path"], "config.json").exists()
    # Two turns is a plain answer; more means the policy's own generations called the sandbox.
    assert rl["final_metrics"]["num_turns/mean"] > 2
    assert "critic/score/mean" in rl["final_metrics"]


def test_reapply_changes_nothing(applied: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, result = applied
    assert result.returncode == 0
    plan = retool("plan", "specs/retool-tiny.yaml", "--detailed-exitcode", cwd=root)
    assert plan.returncode == 0, plan.stdout
    again = retool("apply", "specs/retool-tiny.yaml", "--yes", cwd=root)
    assert again.returncode == 0 and "Nothing to apply" in again.stdout
