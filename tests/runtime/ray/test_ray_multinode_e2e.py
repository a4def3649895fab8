"""SFT across two Ray nodes (`resources.nodes: 2`) on a real loopback cluster
(tests/ray_cluster.py: a head and a worker node, each its own `ray start`), on CPU with gloo,
through the CLI: the job reserves one bundle per node (STRICT_SPREAD), each bundle's actor
runs torchrun with its own `--node_rank`, the checkpoint holds both ranks' shards, the
placement group is gone afterwards, no trainer process is left, and a second apply is a
no-op. Then `kill -9` of rank 1's trainer mid-run fails the job, and the next apply resumes
from the latest valid checkpoint; `retool cancel` stops both ranks' trainers."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime import processes as procs
from runtime import records
from runtime.records import RayRanks
from runtime.ray.backend import run_tag
from runtime.ray.node_rank import STOPPED, rank_tag
from tests.ray_cluster import RayCluster, running
from tests.runtime.ray.spec_helpers import write_spec
from tests.runtime.ray.test_ray_cluster_e2e import (
    TIMEOUT_S,
    jobs,
    kill_group,
    ok,
    retool,
    retool_background,
    run_dir,
    state,
    status,
    until,
)

pytestmark = pytest.mark.slow

TWO_NODES = {"resources": {"nodes": 2, "processes_per_node": 1}, "micro_batch_size_per_gpu": 4}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    yield from running()


def ranks_of(directory: Path, submission_id: str) -> RayRanks:
    found = records.load(RayRanks, directory / "ray" / f"{submission_id}.ranks.json")
    assert found is not None, sorted(p.name for p in (directory / "ray").iterdir())
    return found


def placement_groups(cluster: RayCluster) -> list[Any]:
    from ray.util.state import list_placement_groups

    return list(list_placement_groups(address=cluster.address, timeout=10))


def trainers(restart_dir: Path) -> list[int]:
    tag = run_tag(str(restart_dir))
    return sorted({pid for r in range(2) for pid in procs.tagged_processes(rank_tag(tag, r))})


def test_sft_spans_two_ray_nodes_and_resumes_after_a_killed_rank(cluster: RayCluster) -> None:
    root = cluster.root / "repo"
    (root / ".git").mkdir(parents=True)
    write_spec(root, cluster.address, cluster.storage, **TWO_NODES)
    ok(retool("apply", "spec.yaml", "--yes", cwd=root))
    sft = state(cluster)["nodes"]["stage.sft"]
    assert sft["status"] == "succeeded" and sft["outputs"]["final_step"] == 8, sft
    assert (Path(sft["outputs"]["model_path"]) / "config.json").is_file()
    [job] = jobs(cluster)
    assert status(job) == "SUCCEEDED"
    directory = run_dir(cluster, job.metadata["retool_restart_id"])
    ranks = ranks_of(directory, job.submission_id or "").ranks
    # two node ranks ran torchrun, each with its own --node_rank, on two distinct Ray nodes
    assert [(r.rank, r.returncode) for r in ranks] == [(0, 0), (1, 0)], ranks
    assert len({r.node_id for r in ranks}) == 2 and all(r.node_id for r in ranks)
    for r in ranks:
        assert "--nnodes=2" in r.argv and f"--node_rank={r.rank}" in r.argv, r.argv
    step = directory / "global_step_8"
    shards = sorted(p.name for p in step.rglob("*rank_*"))
    assert any("rank_0" in s for s in shards) and any("rank_1" in s for s in shards), shards
    assert all(pg.state == "REMOVED" for pg in placement_groups(cluster)), placement_groups(cluster)
    assert trainers(directory) == []

    out = ok(retool("apply", "spec.yaml", "--yes", cwd=root))
    assert "No changes" in out or "0 to create" in out, out
    assert len(jobs(cluster)) == 1

    # kill -9 rank 1's trainer after the first checkpoint: the job fails, the next apply resumes
    # (16 steps: the kill lands mid-run, after `retool status` had its look)
    write_spec(root, cluster.address, cluster.storage, **TWO_NODES, optim={"lr": 2e-3, "warmup_ratio": 0.0}, epochs=4)
    before = {j.submission_id for j in jobs(cluster)}
    applying = retool_background("apply", "spec.yaml", "--yes", cwd=root)
    try:
        out = killed_rank_apply(cluster, applying, before)
    finally:
        if applying.poll() is None:
            kill_group(applying)
    assert applying.returncode != 0, out[-4000:]
    job = next(j for j in jobs(cluster) if j.submission_id not in before)
    edited = run_dir(cluster, job.metadata["retool_restart_id"])
    failed = ranks_of(edited, job.submission_id or "")
    assert failed.ranks[1].returncode != 0, failed
    assert trainers(edited) == []  # rank 0 stopped its trainer when rank 1 was lost

    ok(retool("apply", "spec.yaml", "--yes", cwd=root))
    attempts = [j for j in jobs(cluster) if j.submission_id not in before]
    assert [status(j) for j in attempts] == ["FAILED", "SUCCEEDED"], [(j.submission_id, j.message) for j in attempts]
    assert int(attempts[1].metadata["retool_resume_from"]) >= 2
    assert state(cluster)["nodes"]["stage.sft"]["outputs"]["final_step"] == 16
    assert all(pg.state == "REMOVED" for pg in placement_groups(cluster))
    assert trainers(edited) == []
    resumed = ranks_of(edited, attempts[1].submission_id or "").ranks
    assert [r.returncode for r in resumed] == [0, 0] and all(
        any(a.startswith("trainer.resume_from_path=") for a in r.argv) for r in resumed)  # every rank resumed

    # `retool cancel` (`ray job stop`: SIGTERM to the entrypoint) stops both ranks' trainers
    write_spec(root, cluster.address, cluster.storage, **TWO_NODES, optim={"lr": 2e-3, "warmup_ratio": 0.0}, epochs=8)
    ok(retool("apply", "spec.yaml", "--yes", "--no-wait", cwd=root))
    job = until("the resumed job", lambda: next(
        (j for j in jobs(cluster) if j.submission_id not in before and status(j) == "RUNNING"), None))
    until("a checkpoint past step 16", lambda: (edited / "global_step_18").is_dir())
    ok(retool("cancel", "spec.yaml", "stage.sft", cwd=root))
    assert status(next(j for j in jobs(cluster) if j.submission_id == job.submission_id)) == "STOPPED"
    stopped = ranks_of(edited, job.submission_id or "").ranks
    assert [r.returncode for r in stopped] == [STOPPED, STOPPED], stopped
    assert all(pg.state == "REMOVED" for pg in placement_groups(cluster))
    assert trainers(edited) == []


def killed_rank_apply(cluster: RayCluster, applying: subprocess.Popen[str], before: set[str | None]) -> str:
    """Kill -9 rank 1's trainer (torchrun and its worker) once the edited run checkpointed;
    return the apply's output."""
    job = until("the edited stage's job", lambda: next(
        (j for j in jobs(cluster) if j.submission_id not in before and status(j) == "RUNNING"), None))
    edited = run_dir(cluster, job.metadata["retool_restart_id"])
    until("a checkpoint", lambda: (edited / "global_step_2").is_dir())
    live = ok(retool("status", "spec.yaml", cwd=cluster.root / "repo"))
    rank1 = until("rank 1's trainer", lambda: procs.tagged_processes(rank_tag(run_tag(str(edited)), 1)))
    for pid in rank1:
        os.kill(pid, signal.SIGKILL)
    out, _ = applying.communicate(timeout=TIMEOUT_S)
    assert "nodes: 0 alive, 1 alive" in live, live  # rank 0's view of every rank, while they train
    return str(out)
