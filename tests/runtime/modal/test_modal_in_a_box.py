"""A single-node stage function run as Modal would run it (issue 20 item 15, first part): the
fake's container is a process calling the function the app registers
(`runtime.modal.worker.run_stage`), with the image's env, the function's secrets and its own
view of the volume, mounted where Modal mounts it (`/checkpoints` in the payload, mapped to the
container's view; the volume itself is FakeModal's, a directory: tests/fakes/fake_cluster.py,
tests/fakes/volume_views.py). A short
segment limit forces hand-overs (the container spawns the next segment through FakeModal),
and a container killed mid-stage is retried as Modal retries it and resumes from what it
had committed. The trainer is the small one in verl's interface from test_cluster_containers."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import checkpoints as ckpts
from runtime import records
from runtime.modal import launches
from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep, LaunchKey, StagePayload
from runtime.records import StageRun
from tests.fakes.fake_cluster import ClusterRunner, free_port_base
from tests.fakes.fake_modal import FakeModal
from tests.fakes.volume_views import DirVolume
from tests.runtime.modal.test_cluster_containers import TRAINER

RID = "b7" * 32
IMAGE_MARK = "RETOOL_TEST_IMAGE_MARK"
MOUNT = "/checkpoints"


@pytest.fixture
def box(tmp_path: Path) -> Iterator[tuple[FakeModal, ClusterRunner]]:
    fake = FakeModal(secrets={"wandb": {"WANDB_API_KEY": "k"}}, volume_root=tmp_path / "volumes")
    fake.create_volume("ckpts")
    fake.deploy(AppDefinition(
        app_name="retool-box",
        image=[ImageStep(op="from_registry", args=["x:1"]), ImageStep(op="env", env={IMAGE_MARK: "from-image"})],
        functions=[FunctionSpec(name="stage-sft", entry="run_stage", gpu="H100", retries=1,
                                volumes={MOUNT: "ckpts"}, secrets=["wandb"])],
    ))
    runner = ClusterRunner(root=tmp_path / "containers", port_base=free_port_base())
    runner.install(fake, ["stage-sft"])
    try:
        yield fake, runner
    finally:
        runner.close()


def stage_payload(fake: FakeModal, tmp_path: Path, *, total: int, train_seconds: float) -> StagePayload:
    ckpt = f"{MOUNT}/sft/{RID[:16]}"
    fake.put_files("ckpts", {f"sft/{RID[:16]}/{ckpts.MARKER_FILE}": ckpts.marker_content(RID, "sft", 1).encode()})
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    # the image's env reaches the commands (a missing one fails the attempt)
    check_image = [sys.executable, "-c", f"import os; assert os.environ.get({IMAGE_MARK!r}) == 'from-image'"]
    trainer = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1",
               str(script), "verl.trainer.sft_trainer", f"trainer.default_local_dir={ckpt}",
               f"trainer.total_training_steps={total}", "trainer.save_freq=1", "trainer.resume_mode=auto", "sleep=3"]
    return StagePayload(
        app_name="retool-box", function="stage-sft", stage="sft", kind="sft", restart_id=RID, total_steps=total,
        world_size=1, nodes=1, checkpoint_dir=ckpt, checkpoint_volume="ckpts", volumes={"ckpts": MOUNT},
        commands=[{"argv": check_image, "env": {}, "secret_env": [], "description": "image env check"},
                  {"argv": trainer, "env": {"PYTHONUNBUFFERED": "1"}, "secret_env": ["WANDB_API_KEY"],
                   "description": "trainer"}],
        train_seconds=train_seconds, commit_every_s=1.0,
        launch=LaunchKey(registry="retool-box-launches", key=f"sft/{RID[:16]}", launch_id="launch-1"),
    )


def follow(fake: FakeModal, runner: ClusterRunner, call_id: str, deadline: float, until: object = None) -> str:
    while time.monotonic() < deadline:
        state = fake.poll(call_id).state
        if state != "running" or (callable(until) and until()):
            return state
        time.sleep(0.5)
    raise AssertionError(f"{call_id} did not finish in time\n{runner.failures}\n" + runner.container_log(call_id, 0))


def test_a_stage_hands_over_between_segments_and_a_killed_container_resumes(
    tmp_path: Path, box: tuple[FakeModal, ClusterRunner]
) -> None:
    fake, runner = box
    total = 12
    p = stage_payload(fake, tmp_path, total=total, train_seconds=25.0)
    volume = fake.volumes["ckpts"]
    assert isinstance(volume, DirVolume)
    ckpt = volume.root / "sft" / RID[:16]  # the volume as committed
    head = fake.spawn("retool-box", "stage-sft", p.model_dump(mode="json"))
    deadline = time.monotonic() + 600

    def committed() -> int | None:
        best = ckpts.latest_valid(ckpts.evaluate(ckpts.scan_local(ckpt.parent), 1, RID), RID)
        return best.step if best else None

    # segment 0 commits a checkpoint; then its container dies and Modal retries the input
    assert follow(fake, runner, head, deadline, until=lambda: committed() is not None) == "running", \
        runner.container_log(head, 0)
    killed_after = committed()
    assert killed_after is not None
    runner.kill(head, 0)

    # follow the chain of segments, each spawned by the one before it from inside its container
    chain, results = [head], []
    while True:
        state = follow(fake, runner, chain[-1], deadline)
        assert state == "succeeded", (fake.calls[chain[-1]].error or "") + runner.container_log(chain[-1], 0)
        result = fake.calls[chain[-1]].result
        results.append(result)
        if result["outcome"] != "continued":
            break
        chain.append(result["next_call_id"])

    assert len(runner.attempts[head]) == 2 and fake.calls[head].attempts == 2  # retried once, as Modal does
    assert len(chain) >= 2, results  # the segment limit forced at least one hand-over
    assert [r["segment"] for r in results] == list(range(len(chain)))
    assert results[-1]["outcome"] == "finished" and results[-1]["step"] == total
    # every attempt after the first resumed from a committed checkpoint, never from scratch
    argvs = [json.loads(line) for line in (ckpt / "_retool" / "argv.jsonl").read_text().splitlines()]
    resumed = [int(a.rsplit("_", 1)[1]) for argv in argvs[1:] for a in argv if a.startswith("trainer.resume_from_path=")]
    assert len(resumed) == len(argvs) - 1 and resumed[0] >= killed_after
    assert resumed == sorted(resumed)
    # run.json names the last segment's call, chained back to the head; the payloads it spawned
    # name the volume's mount path again (not the container's view)
    run = records.load(StageRun, ckpt / "_retool" / "run.json")
    assert run is not None and run.call_id == chain[-1] and run.head_call_id == head
    assert all(fake.calls[c].payload["checkpoint_dir"] == p.checkpoint_dir for c in chain)
    assert committed() == total
    # each segment registered its call under the stage identity (Modal Dict, asked from inside)
    reg = launches.lookup(fake, "retool-box-launches", f"sft/{RID[:16]}")
    assert reg is not None and reg.call_id == chain[-1] and reg.segment == len(chain) - 1
    assert reg.launch_id == "launch-1"
    assert runner.live_tags() == []
