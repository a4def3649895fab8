"""Modal in a box, end to end (issue 20 item 15): the tiny spec with `backend: modal`, applied
through the real plan/apply engine and the real `ModalRuntime`, whose fake Modal
(tests/fakes/fake_modal.py) runs every function the app registers as Modal would: a process
per container (tests/fakes/fake_cluster.py) calling the registered entry point
(`runtime.modal.worker.prepare`, `run_stage`, `finalize`, and `sandbox_web` served on
loopback as the sandbox's web endpoint), each in a root file system of its own
(tests/fakes/container_root.py: `/data`, `/models`, `/checkpoints` are that container's views
of the volumes, retool's packages are under `/root`), with the image's env and the
function's secrets. So real data preparation, real verl SFT, the merge and the tool-call check
in finalize, real verl RL (the rollout `auto` picks on a CPU container: vLLM) and the eval
runner run inside the fake containers, against the real sandbox server.

The spec is shortened to a few minutes of CPU. SFT's first container is killed (every
process in it) once its first checkpoint is committed: the fake retries the input as Modal
retries it, and the retry resumes from that checkpoint. A segment limit of 60 s (the shortest
`ModalRuntime` gives: `timeout_hours` 960 s less the 15-minute hand-over margin) then makes
the retry hand over to a second segment: once the retry has saved a checkpoint of its own,
its trainer is stopped (SIGSTOP) past the segment's end, a step slower than the segment, so
the hand-over happens on a fast machine too (on a slow one, the limit alone may hand over
more often).

Needs root or user namespaces (`unshare --mount`), verl and vLLM (the vLLM environment).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.apply.engine import apply
from reconciler.graph import build_graph
from reconciler.loader import LoadedSpec, load_spec
from reconciler.refresh import refresh_and_plan
from reconciler.state.memory import MemoryStore
from runtime import checkpoints as ckpts
from runtime.modal.backend import ModalRuntime
from runtime.processes import tagged_processes
from tests.fakes.container_root import available
from tests.fakes.fake_cluster import ClusterRunner, free_port_base
from tests.fakes.fake_modal import FakeModal
from tests.fakes.volume_views import DirVolume

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "box-sandbox-token-5c1e"
HF_VALUE = "hf_box_value_0b7d"
SEGMENT_HOURS = (15 * 60 + 60) / 3600  # 60 s of training per attempt after the 15-minute hand-over margin
# 3 epochs of 256 rows: the retried container trains ~40 steps after its first commit, so the
# stall (set off when a poll sees that commit, up to ~7 s later) stops a trainer still at work
SFT_EPOCHS, SFT_STEPS = 3, 48


def box_spec(root: Path) -> LoadedSpec:
    """specs/retool-tiny.yaml on Modal, shortened: 48 SFT steps (saves every 2), 1 RL step of
    2 prompts x 2 samples, evaluation of the RL model on 2 problems x 2 samples; a service sandbox."""
    data = yaml.safe_load((REPO / "specs" / "retool-tiny.yaml").read_text())
    qwen = yaml.safe_load((REPO / "specs" / "retool-qwen7b.yaml").read_text())
    data["backend"] = "modal"
    data["modal"] = {"app_name": "retool-tiny-box"}
    data["image"] = {**qwen["image"], "env": {**qwen["image"]["env"], "HF_HUB_OFFLINE": "1"}}
    data["secrets"] = {
        "huggingface": {"modal_name": "huggingface", "env": ["HF_TOKEN"]},
        "sandbox_token": {"modal_name": "retool-sandbox-token", "env": ["SANDBOX_TOKEN"]},
    }
    data["sandbox"] = {"placement": "service", "token_secret": "sandbox_token", "workers": 2, "cpu": 1.0,
                       "memory_mb": 1024}
    data["datasets"]["tiny_sft"]["options"]["rows"] = 256
    data["datasets"]["tiny_math"]["options"]["rows"] = 8
    data["datasets"]["aime_2024"]["max_rows"] = 2
    del data["datasets"]["tiny_math_test"]
    stages = data["stages"]
    sft, rl = stages["sft"], stages["rl"]
    sft.update(epochs=SFT_EPOCHS, save_freq=2, secrets=["huggingface"], logging={"backends": ["console"]},
               tool_call_check={"prompts": 4, "min_rate": 0.0},
               resources={"processes_per_node": 1, "timeout_hours": SEGMENT_HOURS, "retries": 3})
    rl.update(max_steps=1, save_freq=1, secrets=["huggingface"], logging={"backends": ["console"]},
              train_batch_size=2, ppo_mini_batch_size=2, max_response_length=128,
              rollout={**rl["rollout"], "n": 2},
              resources={"processes_per_node": 1, "retries": 1})
    rl.pop("val")
    evaluation = stages.pop("eval_rl")
    evaluation.update(datasets=["dataset.aime_2024"], samples=2, max_response_length=128, resources={"retries": 1})
    stages.pop("eval_sft")
    stages.pop("eval_base")  # the base model's evaluation adds nothing Modal-specific
    stages["eval"] = evaluation
    spec_dir = root / "specs"
    (spec_dir / "data").mkdir(parents=True)
    (spec_dir / "data" / "aime_2024.jsonl").write_bytes((REPO / "specs" / "data" / "aime_2024.jsonl").read_bytes())
    (spec_dir / "retool-tiny-box.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(spec_dir / "retool-tiny-box.yaml")


def valid_step(volume: DirVolume, stage: str, restart_id: str) -> int | None:
    """The latest valid checkpoint of a stage run as committed to the volume."""
    best = ckpts.latest_valid(ckpts.evaluate(ckpts.scan_local(volume.root / stage), 1, restart_id), restart_id)
    return best.step if best else None


@pytest.fixture
def box(tmp_path: Path) -> Iterator[tuple[FakeModal, ClusterRunner]]:
    why = available()
    if why:
        pytest.skip(f"fake containers need their own root: {why}")
    fake = FakeModal(secrets={"huggingface": {"HF_TOKEN": HF_VALUE}, "retool-sandbox-token": {"SANDBOX_TOKEN": TOKEN}},
                     volume_root=tmp_path / "volumes")
    runner = ClusterRunner(root=tmp_path / "containers", port_base=free_port_base(), own_root=True)
    runner.install(fake, ["prepare", "finalize", "stage-sft", "stage-rl", "stage-eval"])
    runner.serve(fake, ["sandbox"])
    try:
        yield fake, runner
    finally:
        runner.close()


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        return dict(json.loads(resp.read()))


def test_the_tiny_spec_applies_on_modal_in_a_box(tmp_path: Path, box: tuple[FakeModal, ClusterRunner]) -> None:
    fake, runner = box
    loaded = box_spec(tmp_path)
    data_vol, ckpt_vol = "retool-tiny-data", "retool-tiny-checkpoints"
    committed: list[int] = []  # SFT's step when its first container was killed

    def sft_step(call: Any) -> int:
        step = valid_step(fake.volumes[ckpt_vol], "sft", call.payload["restart_id"])  # type: ignore[arg-type]
        return step or 0

    def first_save(call: Any, attempt: int) -> bool:
        """Segment 0's first container, once a checkpoint of it is committed (the kill's moment)."""
        if call.payload["segment"] == 0 and attempt == 1 and sft_step(call) > 0:
            committed.append(sft_step(call))
            return True
        return False

    def saved_after_retry(call: Any, attempt: int) -> bool:
        """Segment 0's retried container, once it committed a checkpoint of its own."""
        return call.payload["segment"] == 0 and attempt == 2 and sft_step(call) > committed[0]

    # kill SFT's first container (every process in it) once its first checkpoint is committed;
    # once the retry has saved, its trainer takes longer than the segment's 60 s (stopped that
    # long): the segment limit then hands over to the next segment, whatever this machine's speed
    runner.kills.append(("stage-sft", first_save))
    runner.stalls.append(("stage-sft", saved_after_retry, 62.0))
    store, rt = MemoryStore(), ModalRuntime(str(tmp_path / "state"), adapter=fake)
    plan = refresh_and_plan(loaded, store.read(), rt)
    assert any(w.startswith("stages.sft.resources: no `gpu`: runs on a CPU container") for w in plan.warnings)
    started = time.monotonic()
    result = apply(plan, loaded, store, rt, poll_interval=2.0)
    wall = time.monotonic() - started
    logs = "\n".join(f"--- {call_id} attempt {a.number}\n" + runner.container_log(call_id, 0, a.number - 1, 40)
                     for call_id, attempts in runner.attempts.items() for a in attempts)
    assert result.ok, [(r.address, r.message) for r in result.results if r.result == "failed"] + [logs]
    print(f"\napplied in {wall:.0f} s; {len(fake.calls)} calls; kills: {runner.killed}; failures: {runner.failures}")

    state = store.read()
    assert state is not None
    assert {a: r.status for a, r in state.nodes.items()} == {a: "succeeded" for a in build_graph(loaded.spec).nodes}
    ckpt = fake.volumes[ckpt_vol]
    assert isinstance(ckpt, DirVolume)

    # data and the model were prepared inside containers, onto the volumes
    data = fake.volumes[data_vol]
    assert isinstance(data, DirVolume)
    assert (data.root / "datasets" / "tiny_sft" / "train.parquet").is_file()
    assert state.nodes["dataset.aime_2024"].outputs["rows"] == 2

    # SFT: the first container was killed after its first committed checkpoint and retried; the
    # segment limit handed over at least once; every attempt after the first resumed
    sft = state.nodes["stage.sft"]
    rid = sft.restart_id[:16]
    sft_calls = [c for c in fake.calls.values() if c.function == "stage-sft"]
    head = sft_calls[0]
    assert runner.killed == [f"{head.call_id} attempt 1"] and head.attempts == 2
    assert list(runner.stalled) == [f"{head.call_id} attempt 2"]
    assert len(sft_calls) >= 2, "the 60 s segment limit forced no hand-over"
    assert sft_calls[1].payload["segment"] == 1 and head.result["outcome"] == "continued"
    assert [c.payload["segment"] for c in sft_calls] == list(range(len(sft_calls)))
    assert all(c.state == "succeeded" for c in sft_calls)
    run_dir = ckpt.root / "sft" / rid / "_retool"
    commands = [line for log in sorted((run_dir / "logs").glob("segment-*-rank-0.log"))
                for line in log.read_text().splitlines() if line.startswith("[retool] $ ")]
    resumed = [int(a.rsplit("_", 1)[1]) for line in commands for a in line.split()
               if a.startswith("trainer.resume_from_path=")]
    assert len(commands) == len(sft_calls) + 1 and len(resumed) == len(commands) - 1, commands
    assert resumed == sorted(resumed) and resumed[0] >= committed[0] > 0
    assert f"trainer.resume_from_path=/checkpoints/sft/{rid}/global_step_" in commands[-1]  # Modal's paths
    assert valid_step(ckpt, "sft", sft.restart_id) == SFT_STEPS == sft.outputs["final_step"]
    # the merged model, on the volume, made by finalize
    merged = ckpt.root / "sft" / rid / "merged"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    assert sft.outputs["model_path"] == f"/checkpoints/sft/{rid}/merged" and sft.outputs["tool_call_prompts"] == 4

    # RL trained from the merged SFT model with the rollout `auto` picks on CPU, through the sandbox service
    rl = state.nodes["stage.rl"]
    (rl_call,) = [c for c in fake.calls.values() if c.function == "stage-rl"]
    argv = " ".join(rl_call.payload["commands"][0]["argv"])
    assert "actor_rollout_ref.rollout.name=vllm" in argv and f"/checkpoints/sft/{rid}/merged" in argv
    assert "/root/runtime/verl/recipe/tool_config.yaml" in argv
    assert valid_step(ckpt, "rl", rl.restart_id) == 1 and Path(rl.outputs["checkpoint"]).name == "global_step_1"
    assert (ckpt.root / "rl" / rl.restart_id[:16] / "merged" / "config.json").is_file()
    url = state.nodes["sandbox"].outputs["url"]
    assert url.startswith("http://127.0.0.1:") and TOKEN not in url
    assert get(f"{url}/health")[0] == 401  # the endpoint wants its token
    status, health = get(f"{url}/t/{TOKEN}/health")
    assert status == 200, health
    print(f"sandbox executions during RL and eval: {health['executions']}")
    # the service runs code for a caller with the token, the way the RL and eval containers call it
    ran = post(f"{url}/t/{TOKEN}/run_code", {"code": "print(6 * 7)", "language": "python"})
    assert ran["status"] == "Success" and ran["run_result"]["stdout"] == "42\n", ran

    # evaluation of the RL model: its results file and metrics
    ev = state.nodes["stage.eval"]
    results_file = ckpt.root / "eval" / ev.restart_id[:16] / "results.json"
    assert results_file.is_file()
    metrics = ev.outputs["results"]["aime_2024"]
    assert 0.0 <= metrics["mean_at_n"] <= 1.0 and ev.outputs["samples"] == 2
    job = json.loads((ckpt.root / "eval" / ev.restart_id[:16] / "job.json").read_text())
    assert job["model_dir"] == rl.outputs["model_path"]

    # secrets reached the containers only: never the state, the payloads or the volumes
    everything = json.dumps([state.model_dump(mode="json"), [c.payload for c in fake.calls.values()]])
    for value in (HF_VALUE, TOKEN):
        assert value not in everything
        for volume in fake.volumes.values():
            assert isinstance(volume, DirVolume)
            assert not any(value.encode() in p.read_bytes() for p in volume.root.rglob("*") if p.is_file()
                           and p.stat().st_size < 1 << 20)

    # a second plan changes nothing
    again = refresh_and_plan(loaded, store.read(), ModalRuntime(str(tmp_path / "state"), adapter=fake))
    assert not again.has_changes, [(c.address, c.action, c.reasons) for c in again.changes if c.action != "no-op"]

    # nothing any container started is left once the fake is closed
    runner.close()
    assert runner.live_tags() == []
    tags = [c.tag for attempts in runner.attempts.values() for a in attempts for c in a.containers]
    assert not any(tagged_processes(tag) for tag in tags)
    assert os.path.exists(runner.root)
