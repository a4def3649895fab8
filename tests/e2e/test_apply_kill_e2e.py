"""`kill -9` of `retool apply` while a real tiny SFT trains (the CLI, as separate processes):
`retool status` still shows the run, the state file stays readable, the killed apply's lock
freed itself, and the next plain apply notes the death, re-attaches to that same run (no
second launch) and finishes it healthy, with its metrics in `status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.state.base import LocalRun, State
from runtime import processes as procs
from tests.local_helpers import write_sft_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROWS, BATCH, EPOCHS = 64, 8, 2
STEPS = ROWS // BATCH * EPOCHS


def write_spec(tmp_path: Path) -> Path:
    """The tiny spec's SFT stage and its inputs only, everything under `tmp_path`, fewer steps."""
    tiny = yaml.safe_load((REPO / "specs" / "retool-tiny.yaml").read_text())
    sft = {k: v for k, v in tiny["stages"]["sft"].items() if k != "tool_call_check"}
    sft.update(train="dataset.train", epochs=EPOCHS, train_batch_size=BATCH, micro_batch_size_per_gpu=BATCH, save_freq=4)
    write_sft_jsonl(tmp_path / "train.jsonl", rows=ROWS)
    doc = {
        "name": "kill-apply", "backend": "local", "state": {"path": ".retool"}, "local": {"root": "volumes"},
        "volumes": tiny["volumes"],
        "datasets": {"train": {"source": "path:train.jsonl", "format": "messages"}},
        "models": tiny["models"],
        "stages": {"sft": sft},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from reconciler.cli.main import main; main()", *args]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "RETOOL_TEST_RUNTIME"}
    return {**out, "RETOOL_LOCAL_DEVICE": "cpu", "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def read_state(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def stop_everything(state_dir: Path) -> None:
    """Stop the training run and the sandbox, whatever state the test left them in."""
    rec = read_state(state_dir).get("nodes", {}).get("stage.sft", {})
    run_handle = rec.get("run") or {}
    ref = run_handle.get("ref") or {}
    if ref.get("pid"):
        procs.terminate_run(ref.get("pgid"), str(ref.get("tag") or ""), grace_s=10)
    for record in state_dir.glob("volumes/checkpoints/sft/*/active_run.json"):
        recorded = json.loads(record.read_text()).get("ref", {})
        procs.terminate_run(None, str(recorded.get("tag") or ""), grace_s=10)
    sandbox = state_dir / "sandbox.json"
    if sandbox.exists():
        procs.terminate_run(json.loads(sandbox.read_text())["pid"], grace_s=5)


def test_kill_9_of_apply_while_sft_trains_then_apply_reattaches(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    state_dir = tmp_path / ".retool"
    with open(tmp_path / "apply-1.out", "wb") as out:
        apply = subprocess.Popen(cli("apply", str(spec), "--yes"), env=env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        def running() -> dict[str, Any] | None:
            rec = read_state(state_dir).get("nodes", {}).get("stage.sft", {})
            return rec if rec.get("status") == "running" and ((rec.get("run") or {}).get("ref") or {}).get("pid") else None

        rec = wait_for("stage.sft to be recorded running", running)
        handle = rec["run"]
        log = Path(handle["ref"]["log_path"])
        wait_for("the first training step", lambda: "step:1 " in log.read_text(errors="replace"), timeout=300)
        assert apply.poll() is None, (tmp_path / "apply-1.out").read_text()
        os.kill(apply.pid, signal.SIGKILL)
        apply.wait(timeout=30)

        # The run goes on without apply; status shows it, the state file parses.
        State.model_validate(read_state(state_dir))
        status = run("status", str(spec), "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        sft = next(n for n in report["nodes"] if n["address"] == "stage.sft")
        assert sft["health"] in ("progressing", "lost"), sft
        assert report["lock"] is None  # the kernel released the killed apply's lock

        # The next plain apply says so and goes on: no `retool state unlock`.
        second = run("apply", str(spec), "--yes")
        assert second.returncode == 0, second.stdout + second.stderr
        assert f"previous apply (pid {apply.pid}, `retool apply {spec}`) died; continuing" in second.stderr
        state = State.model_validate(read_state(state_dir))
        done = state.nodes["stage.sft"]
        assert done.status == "succeeded" and done.steps_done == STEPS
        assert done.run is not None and done.run.ref == LocalRun.model_validate(handle["ref"])
        logs = [p for p in (state_dir / "logs").glob("sft-*.log") if "-merge-" not in p.name]
        assert logs == [log]  # one training run for this identity: re-attached, never relaunched
        assert log.read_text(errors="replace").count("[retool] command 1/") == 1

        final = json.loads(run("status", str(spec), "--json").stdout)
        sft = next(n for n in final["nodes"] if n["address"] == "stage.sft")
        assert (sft["health"], sft["step"], sft["total"]) == ("healthy", STEPS, STEPS)
        assert sft["metrics"]["loss"] > 0 and set(sft["metrics"]) >= {"loss", "grad_norm", "lr"}
        assert len(sft["sparklines"]["loss"]) == min(STEPS, 24)
        human = run("status", str(spec))
        assert "loss" in human.stdout and sft["sparklines"]["loss"] in human.stdout
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.wait()
        stop_everything(state_dir)
