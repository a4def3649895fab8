"""The Ray backend's pure parts: the spec, submission ids, entrypoint resources, the
lease lock's files, and that plan stays free of `import ray`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from reconciler.spec import Spec
from reconciler.state.run_handle import RayRun
from reconciler.state.shared_dir import FileKeys
from runtime import processes as procs
from runtime.cluster.layout import ClusterInfo
from runtime.ray import jobs
from runtime.ray.backend import RAY_INIT_RESOURCES, RayRuntime, entrypoint_resources
from runtime.ray.cluster import Node, fit_problem, node_bundle
from runtime.ray.multinode import exit_code
from runtime.ray.node_rank import INTERRUPTED, STOPPED, NodeRank, Place, free_port_pair, rank_tag
from runtime.records import MultiNodePlan, PlannedCommand, RankRecord, RunPlan

REPO = Path(__file__).resolve().parents[3]


def spec(**extra: object) -> Spec:
    return Spec.model_validate({"name": "demo", "backend": "ray", "ray": {"storage": "/shared/retool"}, **extra})


def stage(**resources: object) -> object:
    s = spec(
        models={"m": {"source": "builtin:tiny-qwen2"}}, datasets={"d": {"source": "builtin:tiny_sft", "format": "messages"}},
        stages={"sft": {"kind": "sft", "model": "model.m", "train": "dataset.d", "resources": resources}},
    )
    return s.stages["sft"]


def test_backend_ray_keeps_its_state_in_the_shared_storage_and_needs_it() -> None:
    assert spec().state.store == "ray"
    assert spec(state={"store": "local"}).state.store == "local"  # unless the spec says otherwise
    with pytest.raises(ValidationError, match="ray.storage is required"):
        Spec.model_validate({"name": "demo", "backend": "ray"})
    with pytest.raises(ValidationError, match="absolute path"):
        Spec.model_validate({"name": "demo", "backend": "ray", "ray": {"storage": "shared"}})


def test_submission_ids_count_attempts_of_one_identity() -> None:
    def job(sid: str) -> SimpleNamespace:
        return SimpleNamespace(submission_id=sid)

    rid = "ab" * 32
    assert jobs.next_submission_id("demo", "stage-sft", rid, []) == f"retool-demo-stage-sft-{rid[:12]}-1"
    listed = [job(f"retool-demo-stage-sft-{rid[:12]}-2"), job(f"retool-demo-stage-sft-{rid[:12]}-10"),
              job(f"retool-demo-stage-rl-{rid[:12]}-1"), job("someone-else")]
    mine = jobs.jobs_of(listed, "demo", "stage-sft", rid)  # type: ignore[arg-type]
    assert [j.submission_id[-2:] for j in mine] == ["-2", "10"]
    assert jobs.next_submission_id("demo", "stage-sft", rid, mine).endswith("-11")


def test_entrypoint_resources_follow_the_stage() -> None:
    assert entrypoint_resources(stage(processes_per_node=2)) == {"entrypoint_num_cpus": 2}  # type: ignore[arg-type]
    gpu = entrypoint_resources(stage(gpu="A100-80GB", gpus_per_node=4, cpu=16, memory_mb=1024))  # type: ignore[arg-type]
    assert gpu == {
        "entrypoint_num_cpus": 16, "entrypoint_num_gpus": 4, "entrypoint_memory": 1024 * 2**20,
        "entrypoint_resources": {"accelerator_type:A100-80G": 0.001},
    }


def test_fit_names_missing_gpus() -> None:
    nodes = [Node("a", "10.0.0.1", {"GPU": 8, "accelerator_type:H100": 1, "CPU": 64}), Node("b", "10.0.0.2", {"CPU": 8})]
    assert fit_problem(stage(gpu="H100", gpus_per_node=8), nodes) is None  # type: ignore[arg-type]
    problem = fit_problem(stage(gpu="H100", gpus_per_node=8, nodes=2), nodes)  # type: ignore[arg-type]
    assert problem and "nodes with that many H100: 1" in problem


def test_volumes_live_under_the_storage(tmp_path: Path) -> None:
    rt = RayRuntime(str(tmp_path / ".retool"))
    assert rt.volume_dir(spec(), "ckpt") == Path("/shared/retool/volumes/ckpt")
    assert rt.blocked_reason(spec(), "stage.none") is None


def test_rl_commands_leave_the_cluster_resources_to_ray() -> None:
    assert all(flag.startswith(("+ray_kwargs", "ray_kwargs")) for flag in RAY_INIT_RESOURCES)


def test_file_keys_put_if_absent_get_and_pop(tmp_path: Path) -> None:
    keys = FileKeys(tmp_path)
    assert keys.put("lock", "a", if_absent=True)
    assert not keys.put("lock", "b", if_absent=True)
    assert keys.get("lock") == "a"
    keys.put("lock", "c")
    assert keys.pop("lock") == "c" and keys.pop("lock") is None and keys.get("lock") is None
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary files left behind


def test_plan_of_a_ray_spec_does_not_import_ray(tmp_path: Path) -> None:
    (tmp_path / "storage").mkdir()
    (tmp_path / "spec.yaml").write_text(
        f"name: demo\nbackend: ray\nray: {{storage: {tmp_path}/storage}}\nvolumes: {{data: {{mount: /data}}}}\n"
    )
    code = (
        "import sys\nfrom reconciler.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('HEAVY', [m for m in ('ray', 'torch', 'verl') if m in sys.modules], code, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "plan", "spec.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert "HEAVY [] 0" in proc.stderr, proc.stdout + proc.stderr  # plan exits 0 unless --detailed-exitcode
    assert "create  volume.data" in proc.stdout


# --------------------------------------------------------------------------- SFT across nodes


def test_sft_across_nodes_is_planned_not_blocked_and_reserves_one_bundle_per_node(tmp_path: Path) -> None:
    two = stage(nodes=2, processes_per_node=2)
    s = spec(
        models={"m": {"source": "builtin:tiny-qwen2"}}, datasets={"d": {"source": "builtin:tiny_sft", "format": "messages"}},
        stages={"sft": {"kind": "sft", "model": "model.m", "train": "dataset.d", "resources": {"nodes": 2}}},
    )
    assert RayRuntime(str(tmp_path / ".retool")).blocked_reason(s, "stage.sft") is None
    assert entrypoint_resources(two) == {"entrypoint_num_cpus": 0}  # type: ignore[arg-type]  # the bundles hold the work
    assert node_bundle(two) == {"CPU": 2.0}  # type: ignore[arg-type]
    gpu = node_bundle(stage(nodes=2, gpu="H100", gpus_per_node=8, cpu=32, memory_mb=1024))  # type: ignore[arg-type]
    assert gpu == {"CPU": 32.0, "GPU": 8.0, "memory": 1024.0 * 2**20, "accelerator_type:H100": 0.001}


def test_fit_counts_nodes_with_room_for_one_rank_each() -> None:
    small, big = Node("a", "10.0.0.1", {"CPU": 1}), Node("b", "10.0.0.2", {"CPU": 8})
    assert fit_problem(stage(nodes=2, processes_per_node=2), [big, big]) is None  # type: ignore[arg-type]
    problem = fit_problem(stage(nodes=2, processes_per_node=2), [small, big])  # type: ignore[arg-type]
    assert problem and "2 distinct nodes with 2 CPU each" in problem and "nodes with that many: 1" in problem
    assert "the cluster has 1" in (fit_problem(stage(nodes=2), [big]) or "")  # type: ignore[arg-type]


def test_fit_of_rl_on_cpu_counts_the_gpu_resources_verl_places_its_ranks_on() -> None:
    def rl(**resources: object) -> object:
        s = spec(
            models={"m": {"source": "builtin:tiny-qwen2"}}, datasets={"d": {"source": "builtin:tiny_math", "format": "rl"}},
            stages={"rl": {"kind": "rl", "model": "model.m", "train": "dataset.d", "resources": resources}},
        )
        return s.stages["rl"]

    head, worker = Node("h", "10.0.0.1", {"CPU": 4}), Node("w", "10.0.0.2", {"CPU": 4, "GPU": 1})
    assert fit_problem(rl(processes_per_node=1), [head, worker]) is None  # type: ignore[arg-type]
    problem = fit_problem(rl(nodes=2, processes_per_node=1), [head, worker])  # type: ignore[arg-type]
    assert problem and "2 node(s) declaring 1 GPU resource(s) each" in problem and "nodes with that many: 1" in problem
    assert "--num-gpus=2" in (fit_problem(rl(processes_per_node=2), [head, worker]) or "")  # type: ignore[arg-type]
    assert fit_problem(rl(nodes=2, processes_per_node=1), [worker, worker]) is None  # type: ignore[arg-type]


def test_the_job_fails_with_the_rank_that_failed_on_its_own() -> None:
    def rank(r: int, code: int | None) -> RankRecord:
        return RankRecord(rank=r, node_id=f"n{r}", ip="10.0.0.1", returncode=code)

    assert exit_code([rank(0, 0), rank(1, 0)]) == 0
    assert exit_code([rank(0, INTERRUPTED), rank(1, -9)]) == -9  # rank 1's trainer was killed; rank 0 stopped for it
    assert exit_code([rank(0, 3), rank(1, INTERRUPTED)]) == 3
    assert exit_code([rank(0, INTERRUPTED), rank(1, None)]) == 1  # rank 1's actor died
    assert exit_code([rank(0, STOPPED), rank(1, STOPPED)]) == 143  # `ray job stop`


def nodes_plan(tmp_path: Path, commands: list[list[str]]) -> MultiNodePlan:
    run = RunPlan(commands=[PlannedCommand(argv=a, cwd=str(tmp_path)) for a in commands],
                  exit_path=str(tmp_path / "ray" / "job.exit.json"))
    return MultiNodePlan(run=run, nodes=2, bundle={"CPU": 1.0}, run_tag="ray-unit-" + tmp_path.name[-8:],
                         cluster_id="job-1", ranks_path=str(tmp_path / "ray" / "job.ranks.json"), join_timeout_s=30,
                         liveness_path=str(tmp_path / "ray" / "job.liveness.json"))


def run_ranks(plan: MultiNodePlan, stop_rank_after_s: float | None = None) -> tuple[list[RankRecord], float]:
    """Both node ranks of `plan` on loopback (their rendezvous is real), each in a thread."""
    base = free_port_pair("127.0.0.1")
    ranks = [NodeRank(0), NodeRank(1)]
    out: dict[int, RankRecord] = {}

    def one(rank: NodeRank) -> None:
        info = ClusterInfo(rank=rank.rank, cluster_id=plan.cluster_id, ips=["127.0.0.1"] * 2, ipv4_ips=["127.0.0.1"] * 2)
        out[rank.rank] = rank.run(info, plan, Place(rank=rank.rank, node_id=f"node-{rank.rank}", ip="127.0.0.1",
                                                    port_base=base), base)

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    if stop_rank_after_s is not None:
        time.sleep(stop_rank_after_s)
        ranks[0].stop("the job was stopped (SIGTERM)")
    for t in threads:
        t.join(120)
    return [out[r] for r in sorted(out)], time.monotonic() - started


def test_a_failing_rank_stops_the_other_through_the_rendezvous(tmp_path: Path) -> None:
    # rank 1's command fails at once; rank 0's would run 300 s unless the lost rank stops it
    script = "import os, sys, time; r = os.environ['RETOOL_RUN_TAG'][-1]; time.sleep(300 if r == '0' else 1); sys.exit(3)"
    ranks, took = run_ranks(nodes_plan(tmp_path, [["python", "-c", script]]))
    assert [(r.rank, r.returncode) for r in ranks] == [(0, INTERRUPTED), (1, 3)], ranks
    assert "rank 1 of the cluster was lost" in ranks[0].message and took < 200
    assert exit_code(ranks) == 3
    # rank 0 recorded both ranks alive while they trained; `retool status` reads it
    ref = RayRun(submission_id="job-1", exit_path=str(tmp_path / "ray" / "job.exit.json"))
    assert RayRuntime._liveness(ref) == "nodes: 0 alive, 1 alive"
    assert procs.tagged_processes(rank_tag(nodes_plan(tmp_path, []).run_tag, 0)) == []


def test_a_stopped_rank_zero_ends_every_rank(tmp_path: Path) -> None:
    ranks, took = run_ranks(nodes_plan(tmp_path, [["python", "-c", "import time; time.sleep(300)"]]), stop_rank_after_s=3)
    assert ranks[0].returncode == STOPPED and ranks[1].returncode != 0, ranks
    assert "rank 0 ended: failed" in ranks[1].message and exit_code(ranks) == 1
    assert took < 200


def test_a_guarded_command_dies_with_its_parent(tmp_path: Path) -> None:
    """The kernel's parent-death signal: a rank's trainer never outlives a killed actor."""
    parent = subprocess.Popen(
        [sys.executable, "-c", (
            "import subprocess, sys, time; from runtime.ray.guard import guarded; "
            "p = subprocess.Popen(guarded([sys.executable, '-c', 'import time; time.sleep(120)'])); "
            "print(p.pid, flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while procs._state(child) is None and time.monotonic() < deadline:  # the guard has exec'd
            time.sleep(0.1)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30
        while procs.is_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not procs.is_alive(child)
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
