"""The multi-node rehearsal: real verl, no Modal.

The tiny spec with `resources.nodes: 2` (one process per node) runs as a clustered Modal
function would: tests/fakes/fake_cluster.py starts 2 local "containers" on loopback, each
running the real stage worker (runtime.modal.worker) with its own cluster info, and
runtime.cluster gives them their roles:

    SFT  torchrun rendezvous across both "nodes" (rank 0 hosts the store); after step 2 is
         saved, rank 1's container is killed: rank 0 stops, the whole cluster restarts and
         resumes from the latest valid checkpoint; the final checkpoint has both ranks' shards
    RL   a 2-node Ray cluster (`ray start --head` in container 0, `ray start --address` in
         container 1, distinct ports and temp dirs), main_ppo with trainer.nnodes=2 on rank 0,
         a sandbox sidecar per node; a checkpoint with both ranks' actor shards

Every process of both containers (torchrun, Ray head, raylets, Ray workers, sidecars) is
checked gone at the end.

Both tests are parametrised by device: `cpu` (CPU, gloo) and `cuda` (each container pinned to
one GPU with CUDA_VISIBLE_DEVICES=<rank>, NCCL; skipped with fewer than 2 GPUs).
`RETOOL_REHEARSAL_DEVICES` picks which run (default `cpu`; `cpu,cuda` or `cuda`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.backend import StageContext
from reconciler.loader import parse_spec_text
from reconciler.spec import Spec
from runtime import checkpoints as ckpts
from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep, SidecarSettings, StagePayload
from runtime.verl.common import StagePaths
from tests.fakes.fake_cluster import ClusterRunner, free_port_base
from tests.fakes.fake_modal import FakeModal

pytestmark = pytest.mark.slow

SPECS = Path(__file__).resolve().parents[2] / "specs"
DEVICES = [d.strip() for d in os.environ.get("RETOOL_REHEARSAL_DEVICES", "cpu").split(",") if d.strip()]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda":
        from runtime.verl.common import local_gpu_count

        if local_gpu_count() < 2:
            pytest.skip("the cuda rehearsal pins each of 2 containers to its own GPU: needs 2 GPUs")
    return str(request.param)
RID_SFT, RID_RL = "5f" * 32, "71" * 32
STAGE_TIMEOUT_S = 900  # generous: a shared machine can be many times slower than a free one


SFT_STEPS = 24  # of 16 rows each: three quarters of an epoch of 512 rows of the tiny SFT data


def two_node_spec() -> Spec:
    spec = parse_spec_text((SPECS / "retool-tiny.yaml").read_text())
    data = spec.model_dump(mode="json", exclude_unset=True)
    nodes = {"nodes": 2, "processes_per_node": 1}
    # 16 rows a step over 2 ranks: 8 per rank, one micro batch each
    data["stages"]["sft"].update(resources=nodes, save_freq=2, micro_batch_size_per_gpu=8)
    # no validation set: validation is verl's own loop and would only add minutes here
    data["stages"]["rl"].update(resources=nodes, save_freq=1, val=[])
    # the rehearsal trains 24 steps: a quarter of the spec's SFT rows is plenty, and quicker to generate
    data["datasets"]["tiny_sft"]["options"]["rows"] = 512
    return Spec.model_validate(data)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """The checkpoints volume every container mounts (a host directory here)."""
    return tmp_path / "volume"


@pytest.fixture
def cluster(tmp_path: Path, volume: Path, device: str) -> Iterator[tuple[FakeModal, ClusterRunner]]:
    fake = FakeModal()
    fake.create_volume("checkpoints")
    fake.deploy(AppDefinition(
        app_name="retool-tiny", image=[ImageStep(op="from_registry", args=["x:1"])],
        # retries: the whole cluster restarts after a lost container (this machine is shared, so a
        # container may also die of something else than the kill the SFT test makes)
        functions=[FunctionSpec(name=f"stage-{s}", entry="run_stage", gpu="H100:8", cluster_size=2, retries=3,
                                volumes={str(volume): "checkpoints"}) for s in ("sft", "rl")],
    ))
    device_env = (lambda rank: {}) if device == "cpu" else (lambda rank: {"CUDA_VISIBLE_DEVICES": str(rank)})
    runner = ClusterRunner(root=tmp_path / "containers", port_base=free_port_base(), device_env=device_env)
    runner.install(fake, ["stage-sft", "stage-rl"])
    try:
        yield fake, runner
    finally:
        runner.close()
        assert runner.live_tags() == [], "a container process outlived the test"
        assert not _ray_processes(runner.port_base), "a Ray process outlived the test"


def _ray_processes(base: int) -> list[int]:
    """Processes whose command line names one of this test's Ray temp dirs."""
    needle = f"/tmp/retool-ray-{base}-".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def stage_payload(spec: Spec, stage: str, rid: str, inputs: dict, volume: Path, total: int, *, cpu: bool,
                  sidecar: SidecarSettings | None = None, commit_every_s: float = 60.0) -> StagePayload:
    ckpt = volume / stage / rid[:16]
    (ckpt / "_retool").mkdir(parents=True, exist_ok=True)
    (ckpt / ckpts.MARKER_FILE).write_text(ckpts.marker_content(rid, stage, 2))
    ctx = StageContext(spec=spec, spec_dir=str(SPECS), stage=stage, restart_id=rid, total_steps=total, inputs=inputs)
    paths = StagePaths(stage_dir=str(ckpt), ckpt_dir=str(ckpt), merged_dir=str(ckpt / "merged"))
    if stage == "sft":
        from runtime.verl.sft import render_sft

        commands = [render_sft(ctx, paths, cpu=cpu, attn_implementation="sdpa")]
    else:
        from runtime.verl.rl import render_rl
        from runtime.verl.rollout import NAME as TRANSFORMERS_ROLLOUT

        assert sidecar is not None
        commands = render_rl(ctx, sandbox_url=f"http://127.0.0.1:{sidecar.port}", cpu=cpu, paths=paths,
                             rollout=TRANSFORMERS_ROLLOUT, attn_implementation="sdpa")
    return StagePayload(
        app_name="retool-tiny", function=f"stage-{stage}", stage=stage, kind=stage, restart_id=rid,  # type: ignore[arg-type]
        total_steps=total, world_size=2, nodes=2, checkpoint_dir=str(ckpt), checkpoint_volume="checkpoints",
        volumes={"checkpoints": str(volume)}, commands=[c.model_dump(mode="json") for c in commands],
        sidecar=sidecar, train_seconds=3600.0, commit_every_s=commit_every_s, join_timeout_s=180.0,
    )


def wait(fake: FakeModal, runner: ClusterRunner, call_id: str, timeout_s: float, until: object = None) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = fake.poll(call_id).state
        if state != "running" or (callable(until) and until()):
            return state
        time.sleep(1.0)
    raise AssertionError(f"{call_id} did not finish in {timeout_s} s\n{runner.failures}\n" + runner.container_log(call_id, 0))


def shards(step_dir: Path) -> list[str]:
    return sorted(p.name for p in step_dir.glob("model_world_size_*_rank_*.pt"))


def test_sft_across_two_nodes_survives_a_killed_container(device: str, cluster: tuple[FakeModal, ClusterRunner], volume: Path,
                                                          tiny_model_dir: Path, session_sandbox_url: str,
                                                          tmp_path: Path) -> None:
    from runtime.data.prepare import prepare

    fake, runner = cluster
    spec = two_node_spec()
    data = prepare("tiny_sft", spec.datasets["tiny_sft"], tmp_path / "data", SPECS, sandbox_url=session_sandbox_url)
    sft = spec.stages["sft"]
    inputs = {sft.train: {"path": data.path}, sft.model: {"path": str(tiny_model_dir)}}
    # Commits every 3 s and 24 steps: the step-2 checkpoint reaches the volume (both ranks'
    # commits) while many steps remain, however fast this machine trains; the kill below
    # waits for that committed checkpoint, not for a container's uncommitted view.
    p = stage_payload(spec, "sft", RID_SFT, inputs, volume, total=SFT_STEPS, cpu=device == "cpu", commit_every_s=3.0)
    ckpt = Path(p.checkpoint_dir)
    started = time.monotonic()
    call_id = fake.spawn("retool-tiny", "stage-sft", p.model_dump(mode="json"))
    first_saved = ckpt / "global_step_2" / ckpts.COMPLETE_FILE if hasattr(ckpts, "COMPLETE_FILE") else None

    def step_2_saved() -> bool:
        done = ckpt / "global_step_2"
        return len(shards(done)) == 2 and (first_saved is None or first_saved.exists())

    assert wait(fake, runner, call_id, STAGE_TIMEOUT_S, until=step_2_saved) == "running", runner.container_log(call_id, 0)
    runner.kill(call_id, 1)  # rank 1's container dies mid-run
    state = wait(fake, runner, call_id, STAGE_TIMEOUT_S)
    print(f"SFT on 2 nodes with one restart: {time.monotonic() - started:.0f} s")
    assert state == "succeeded", runner.container_log(call_id, 0) + "\n" + runner.container_log(call_id, 1)

    attempts = runner.attempts[call_id]
    print(f"attempts: {len(attempts)}; ended by: {runner.failures}")
    assert len(attempts) >= 2  # the whole cluster restarted, as one unit, after the kill
    # rank 0 saw rank 1 go and stopped instead of training alone
    assert any("rank 1 of the cluster was lost mid-run" in runner.container_log(call_id, 0, attempt=i, lines=None)
               for i in range(len(attempts) - 1))
    log0, log1 = runner.container_log(call_id, 0, lines=None), runner.container_log(call_id, 1, lines=None)
    assert "--node_rank=0" in log0 and "--node_rank=1" in log1
    # resumed, not from scratch (at the container's own view of the volume: tests/fakes/fake_cluster.py)
    assert f"/{ckpt.parent.name}/{ckpt.name}/global_step_" in log0.split("trainer.resume_from_path=", 1)[-1].split()[0]
    assert fake.calls[call_id].result["outcome"] == "finished" and fake.calls[call_id].result["step"] == SFT_STEPS
    assert shards(ckpt / f"global_step_{SFT_STEPS}") == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    best = ckpts.latest_valid(ckpts.evaluate(ckpts.scan_local(ckpt.parent), 2, RID_SFT), RID_SFT)
    assert best is not None and best.step == SFT_STEPS


def test_rl_across_a_two_node_ray_cluster(device: str, cluster: tuple[FakeModal, ClusterRunner], volume: Path,
                                          tiny_model_dir: Path, tmp_path: Path) -> None:
    from runtime.data.prepare import prepare

    fake, runner = cluster
    spec = two_node_spec()
    rl = spec.stages["rl"]
    data = prepare("tiny_math", spec.datasets["tiny_math"], tmp_path / "tiny_math", SPECS)
    inputs = {rl.train: {"path": data.path}, rl.model: {"model_path": str(tiny_model_dir)}}
    sidecar = SidecarSettings(port=runner.port_base + 90, workers=1)
    p = stage_payload(spec, "rl", RID_RL, inputs, volume, total=1, cpu=device == "cpu", sidecar=sidecar)
    ckpt = Path(p.checkpoint_dir)
    started = time.monotonic()
    call_id = fake.spawn("retool-tiny", "stage-rl", p.model_dump(mode="json"))
    state = wait(fake, runner, call_id, STAGE_TIMEOUT_S)
    print(f"RL on a 2-node Ray cluster: {time.monotonic() - started:.0f} s")
    assert state == "succeeded", f"{runner.failures}\n" + runner.container_log(call_id, 0) + "\n" + runner.container_log(call_id, 1)
    print(f"attempts: {len(runner.attempts[call_id])}; ended by: {runner.failures}")
    log0, log1 = runner.container_log(call_id, 0, lines=None), runner.container_log(call_id, 1, lines=None)
    assert "trainer.nnodes=2" in log0 and "--address=127.0.0.1:" in log1  # rank 1 joined rank 0's Ray head
    assert fake.calls[call_id].result["step"] == 1
    assert shards(ckpt / "global_step_1" / "actor") == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    best = ckpts.latest_valid(ckpts.evaluate(ckpts.scan_local(ckpt.parent), 2, RID_RL), RID_RL)
    assert best is not None and best.step == 1
    # each node ran its own sandbox sidecar (tool calls come from rollout workers on both nodes)
    logs = ckpt / "_retool" / "logs"
    assert (logs / "sandbox-0-rank-0.log").exists() and (logs / "sandbox-0-rank-1.log").exists()
