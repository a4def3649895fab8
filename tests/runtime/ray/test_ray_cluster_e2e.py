"""The Ray backend on a real two-node Ray cluster on loopback (tests/ray_cluster.py), through
the CLI as a user runs it: apply end to end, a no-op second apply, an edit that reruns only
the stage, `kill -9` of apply after submission (the next apply attaches: no second job),
`kill -9` of the job's entrypoint mid-stage (the next apply resumes from its checkpoint),
`retool cancel` (checkpoints kept, apply resumes), and a restarted head (state intact).

One cluster for the module; the tests run in order and build on each other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ray_cluster import RayCluster, running
from tests.runtime.ray.spec_helpers import write_spec

pytestmark = pytest.mark.slow

TIMEOUT_S = 900


def retool_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "RETOOL_TEST_RUNTIME"}, "NO_COLOR": "1", "COLUMNS": "160"}


def retool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], cwd=cwd, env=retool_env(), text=True,
                          capture_output=True, timeout=TIMEOUT_S)


def retool_background(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "reconciler.cli", *args], cwd=cwd, env=retool_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr  # the plan on stdout, apply's progress on stderr


def jobs(cluster: RayCluster, node: str = "stage-sft") -> list[Any]:
    from ray.job_submission import JobSubmissionClient

    found = [j for j in JobSubmissionClient(cluster.address).list_jobs()
             if (j.submission_id or "").startswith(f"retool-ray-e2e-{node}-")]
    return sorted(found, key=lambda j: j.submission_id or "")


def status(job: Any) -> str:
    return str(getattr(job.status, "value", job.status))


def until(what: str, check: Any, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def state(cluster: RayCluster) -> dict[str, Any]:
    return json.loads((cluster.storage / ".retool-state" / "ray-e2e" / "state.json").read_text())


def run_dir(cluster: RayCluster, restart_id: str) -> Path:
    return cluster.storage / "volumes" / "checkpoints" / "sft" / restart_id[:16]


def kill_group(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def entrypoint_pids(restart_id: str) -> list[int]:
    """The stage job's entrypoint (`python -m runtime.ray.job <run dir>/ray/...`) on this host."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"runtime.ray.job" in argv and any(restart_id[:16].encode() in a for a in argv):
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    yield from running()


@pytest.fixture(scope="module")
def repo(cluster: RayCluster) -> Path:
    root = cluster.root / "repo"
    (root / ".git").mkdir(parents=True)
    write_spec(root, cluster.address, cluster.storage)
    return root


def test_apply_runs_the_spec_on_the_cluster(cluster: RayCluster, repo: Path) -> None:
    t0 = time.time()
    out = ok(retool("apply", "spec.yaml", "--yes", cwd=repo))
    print(f"first apply: {time.time() - t0:.0f} s")
    nodes = state(cluster)["nodes"]
    assert nodes["stage.sft"]["status"] == "succeeded" and nodes["stage.sft"]["outputs"]["final_step"] == 8
    assert nodes["stage.sft"]["run"]["ref"]["backend"] == "ray"
    assert (Path(nodes["stage.sft"]["outputs"]["model_path"]) / "config.json").is_file()
    assert [status(j) for j in jobs(cluster)] == ["SUCCEEDED"]
    assert [status(j) for j in jobs(cluster, "sandbox")] == ["RUNNING"]
    assert "sandbox at http://" in out
    assert not (repo / ".retool" / "state.json").exists()  # state lives in the cluster's storage


def test_a_second_apply_changes_nothing(cluster: RayCluster, repo: Path) -> None:
    out = ok(retool("apply", "spec.yaml", "--yes", cwd=repo))
    assert "No changes" in out or "0 to create" in out, out
    assert len(jobs(cluster)) == 1 and len(jobs(cluster, "sandbox")) == 1


def test_killed_apply_is_attached_to_and_a_killed_entrypoint_resumes(cluster: RayCluster, repo: Path) -> None:
    write_spec(repo, cluster.address, cluster.storage, optim={"lr": 2e-3, "warmup_ratio": 0.0})  # a restart field
    before = {j.submission_id for j in jobs(cluster)}
    first = retool_background("apply", "spec.yaml", "--yes", cwd=repo)
    job = until("the edited stage's job", lambda: next(
        (j for j in jobs(cluster) if j.submission_id not in before and status(j) == "RUNNING"), None))
    kill_group(first)  # apply dies after submitting; the job runs on
    restart_id = job.metadata["retool_restart_id"]
    lock = json.loads((cluster.storage / ".retool-state" / "ray-e2e" / "lock").read_text())
    ok(retool("state", "unlock", lock["id"], "spec.yaml", cwd=repo))  # a dead holder's lease, cleared by hand
    second = retool_background("apply", "spec.yaml", "--yes", cwd=repo)
    until("a checkpoint", lambda: (run_dir(cluster, restart_id) / "global_step_2").is_dir())
    pids = until("the job's entrypoint", lambda: entrypoint_pids(restart_id))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, _ = second.communicate(timeout=TIMEOUT_S)
    assert second.returncode != 0 and "exited with code" in out, out[-4000:]  # the stage failed, checkpoints stay
    out = ok(retool("apply", "spec.yaml", "--yes", cwd=repo))  # the next apply resumes it
    attempts = [j for j in jobs(cluster) if j.submission_id not in before]
    assert [status(j) for j in attempts] == ["FAILED", "SUCCEEDED"], [(j.submission_id, j.message) for j in attempts]
    assert attempts[0].submission_id == job.submission_id  # the second apply attached to the first's job
    assert int(attempts[1].metadata["retool_resume_from"]) >= 2  # resumed from a checkpoint
    assert "dataset.train" not in out.split("Apply complete")[-1]  # only the stage reran
    assert state(cluster)["nodes"]["stage.sft"]["outputs"]["final_step"] == 8


def test_cancel_stops_the_job_and_keeps_checkpoints(cluster: RayCluster, repo: Path) -> None:
    write_spec(repo, cluster.address, cluster.storage, optim={"lr": 2e-3, "warmup_ratio": 0.0}, epochs=4)  # resume
    before = {j.submission_id for j in jobs(cluster)}
    ok(retool("apply", "spec.yaml", "--yes", "--no-wait", cwd=repo))
    job = until("the resumed job", lambda: next(
        (j for j in jobs(cluster) if j.submission_id not in before and status(j) == "RUNNING"), None))
    ok(retool("cancel", "spec.yaml", "stage.sft", cwd=repo))
    assert status(next(j for j in jobs(cluster) if j.submission_id == job.submission_id)) == "STOPPED"
    assert (run_dir(cluster, job.metadata["retool_restart_id"]) / "global_step_8").is_dir()
    out = ok(retool("apply", "spec.yaml", "--yes", cwd=repo))
    assert state(cluster)["nodes"]["stage.sft"]["outputs"]["final_step"] == 16, out


def test_a_restarted_head_keeps_the_state(cluster: RayCluster, repo: Path) -> None:
    before = state(cluster)["nodes"]["stage.sft"]
    cluster.stop_node("worker")
    cluster.stop_node("head")
    cluster.start()  # same ports, same storage; Ray forgets its jobs
    assert jobs(cluster) == []
    out = ok(retool("apply", "spec.yaml", "--yes", cwd=repo))
    assert jobs(cluster) == [], out  # nothing reran: the state in the shared storage says it is done
    assert [status(j) for j in jobs(cluster, "sandbox")] == ["RUNNING"]
    assert state(cluster)["nodes"]["stage.sft"]["outputs"] == before["outputs"]


def test_doctor_and_plan_see_the_cluster(cluster: RayCluster, repo: Path) -> None:
    out = ok(retool("doctor", "spec.yaml", cwd=repo))
    assert "written from all 2 node(s)" in out and "Ray 2." in out, out
    plan = ok(retool("plan", "spec.yaml", cwd=repo))
    assert f"Ray cluster at {cluster.address}: 0 of 0 GPUs free; the stages need no GPU" in plan, plan


def test_status_names_the_placement_groups_a_running_job_waits_for(cluster: RayCluster, tmp_path: Path) -> None:
    """A job that asks for more than the cluster has (here one bundle of 64 CPUs) runs, but
    waits: the poll says on what, so a stage that waits is not mistaken for one that hangs."""
    from ray.job_submission import JobSubmissionClient

    from reconciler.state.base import RayRun, RunHandle
    from runtime.ray.backend import RayRuntime

    waits = (
        "import ray, time; from ray.util.placement_group import placement_group; ray.init(); "
        "pg = placement_group([{'CPU': 64}], name='too-big'); time.sleep(300)"
    )
    client = JobSubmissionClient(cluster.address)
    sid = client.submit_job(entrypoint=f"python -c {json.dumps(waits)}", entrypoint_num_cpus=0)
    try:
        handle = RunHandle(
            ref=RayRun(submission_id=sid, address=cluster.address, stage_dir=str(tmp_path),
                       exit_path=str(tmp_path / f"{sid}.exit.json"), log_path=str(tmp_path / "job.log"),
                       metrics_path=str(tmp_path / "metrics.jsonl")),
            stage="sft", kind="sft", restart_id="ab" * 32, total_steps=4,
        )
        runtime = RayRuntime(str(tmp_path / ".retool"))

        def waiting() -> str | None:
            message = runtime.poll_stage(handle).message or ""
            return message if "placement group" in message else None

        seen = until("the poll to name the placement group the job waits for", waiting, timeout=120)
        assert seen.startswith("starting; waits for Ray to place 1 placement group(s): 1 x {CPU: 64}"), seen
    finally:
        client.stop_job(sid)
