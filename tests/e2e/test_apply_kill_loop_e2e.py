"""`kill -9` of a real `retool apply specs/retool-tiny.yaml` three times at random moments,
then plain `retool apply` (no `retool state unlock`, no other help) until it converges: every
node healthy and in sync, a plan with no changes, valid checkpoints, nothing left running.

Each killed apply held the state lock (an OS lock): the next apply takes it at once and says
"previous apply (pid N) … died; continuing". The kill moments are drawn from a seed printed
at the start (`RETOOL_KILL_SEED=N` replays one), after the lock is taken, within the first
`KILL_WINDOW_S` seconds of each apply. Marked `chaos` (excluded by default: minutes of real
training): `python -m pytest -m chaos tests/e2e/test_apply_kill_loop_e2e.py`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime import processes as procs

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

REPO = Path(__file__).resolve().parents[2]
SPEC = "specs/retool-tiny.yaml"
KILLS = 3
KILL_WINDOW_S = 90.0
CONVERGE_ATTEMPTS = 4
APPLY_TIMEOUT_S = 1800


def env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "160", "RETOOL_LOCAL_DEVICE": "cpu"}


def retool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "reconciler.cli", *args]


def retool(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(retool_cmd(*args), cwd=root, env=env(), text=True, capture_output=True, timeout=APPLY_TIMEOUT_S)


def lock_holder(root: Path) -> int | None:
    try:
        return int(json.loads((root / ".retool" / "state.lock.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def stop_everything(root: Path) -> None:
    """Whatever the applies left running: training runs (by their tag) and the sandbox."""
    state_dir = root / ".retool"
    for record in state_dir.glob("volumes/checkpoints/*/*/active_run.json"):
        ref = json.loads(record.read_text()).get("ref", {})
        procs.terminate_run(ref.get("pgid"), str(ref.get("tag") or ""), grace_s=10)
    try:
        nodes = json.loads((state_dir / "state.json").read_text())["nodes"]
    except (OSError, ValueError, KeyError):
        nodes = {}
    for rec in nodes.values():
        ref = (rec.get("run") or {}).get("ref") or {}
        if ref.get("pid"):
            procs.terminate_run(ref.get("pgid"), str(ref.get("tag") or ""), grace_s=10)
    pid = nodes.get("sandbox", {}).get("outputs", {}).get("pid")
    sandbox = state_dir / "sandbox.json"
    if not pid and sandbox.exists():
        pid = json.loads(sandbox.read_text()).get("pid")
    if pid:
        procs.terminate_run(int(pid), grace_s=5)


def test_three_kill_9s_at_random_moments_then_plain_apply_converges(tmp_path: Path) -> None:
    seed = int(os.environ.get("RETOOL_KILL_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    print(f"RETOOL_KILL_SEED={seed}")
    root = tmp_path / "project"
    shutil.copytree(REPO / "specs", root / "specs")
    (root / ".git").mkdir()  # the state directory is `.retool/` at this (pretend) repository root
    killed: list[tuple[int, float]] = []
    outputs: list[str] = []
    try:
        for i in range(KILLS):
            log = tmp_path / f"apply-{i}.out"
            with open(log, "wb") as out:
                apply = subprocess.Popen(retool_cmd("apply", SPEC, "--yes"), cwd=root, env=env(), stdout=out,
                                         stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 300
                while lock_holder(root) != apply.pid and apply.poll() is None and time.time() < deadline:
                    time.sleep(0.1)
                assert lock_holder(root) == apply.pid, log.read_text()
                delay = rng.uniform(0, KILL_WINDOW_S)
                time.sleep(delay)
                finished = apply.poll() is not None
                if not finished:
                    os.kill(apply.pid, signal.SIGKILL)
                    killed.append((apply.pid, round(delay, 1)))
            finally:
                if apply.poll() is None:
                    apply.kill()
                apply.wait(timeout=60)
            outputs.append(log.read_text(errors="replace"))
            if finished:
                break  # the whole apply finished inside the window: nothing left to interrupt
        print(f"killed (pid, seconds after taking the lock): {killed}")
        assert killed, "no apply was killed"

        results = []
        for _ in range(CONVERGE_ATTEMPTS):
            result = retool(root, "apply", SPEC, "--yes")
            results.append(result)
            if result.returncode == 0:
                break
        transcript = "\n---\n".join(r.stdout[-3000:] + r.stderr[-3000:] for r in results)
        assert results[-1].returncode == 0, transcript
        assert all("retool state unlock" not in r.stderr for r in results), transcript

        # Every killed apply's death was noticed by the apply after it, which continued.
        said = "\n".join(outputs[1:]) + "\n".join(r.stderr for r in results)
        for pid, _ in killed:
            assert f"previous apply (pid {pid}, `retool apply {SPEC}`) died; continuing" in said, said[-4000:]

        plan = retool(root, "plan", SPEC, "--detailed-exitcode")
        assert plan.returncode == 0, plan.stdout[-3000:]
        status = retool(root, "status", SPEC, "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        nodes = {n["address"]: n for n in report["nodes"]}
        assert {n["health"] for n in nodes.values()} == {"healthy"}, nodes
        assert {n["sync"] for n in nodes.values()} == {"in sync"}, nodes
        assert report["lock"] is None
        state = json.loads((root / ".retool" / "state.json").read_text())
        for address, rec in state["nodes"].items():
            if address.startswith("stage.") and rec["outputs"].get("checkpoint"):
                ckpt = Path(rec["outputs"]["checkpoint"])
                assert (ckpt / "retool_complete.json").is_file(), ckpt  # finished from a complete save
    finally:
        stop_everything(root)
    leftover = wait_until_gone(root)
    assert not leftover, f"left running: {leftover}"


def processes_of(root: Path) -> list[tuple[int, str]]:
    """Live processes working in, or started with an argument under, `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(root) in cmdline or cwd.startswith(str(root)):
            found.append((int(entry.name), cmdline[:200]))
    return found


def wait_until_gone(root: Path, timeout: float = 60) -> list[tuple[int, str]]:
    deadline = time.time() + timeout
    while (left := processes_of(root)) and time.time() < deadline:
        time.sleep(1)
    for pid, _ in left:  # never leak them, even when failing
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
