"""Launch is idempotent per stage identity, and polling errors mean what they say
(runtime/modal/launches.py, ModalRuntime.launch_stage / poll_stage, on the fake adapter).

The fake behaves like `SdkAdapter` over modal 1.6.4 here: a spawn whose answer misses the
deadline has still started its call; polling an unknown id raises; a lost input is `lost`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.errors import TerminalError
from runtime.modal import launches, layout, models
from runtime.modal.adapter import ModalUnreachable
from runtime.modal.layout import stage_function_name
from runtime.modal.backend import ModalRuntime
from runtime.modal.worker import ContainerSegment
from tests.fakes.fake_modal import Containers, FakeModal
from tests.plan_helpers import qwen
from tests.runtime.modal.test_modal_backend import RID, ready, sft_ctx
from tests.runtime.modal.test_modal_worker import payload, runs

KEY = layout.stage_key("retool-qwen7b", "sft", RID)
REGISTRY = layout.registry_name("retool-qwen7b")


def held(fake: FakeModal) -> None:
    Containers(hold=True).install(fake, [stage_function_name(s) for s in ("sft", "dapo")])


def test_a_lost_spawn_answer_never_starts_a_second_run() -> None:
    """The spawn started a call but its answer missed the deadline: the next apply refuses
    while the call may be queued, and re-attaches once it registers itself."""
    spec = qwen()
    fake, rt = ready(spec, lost_spawn_answers=1)
    held(fake)
    with pytest.raises(ModalUnreachable) as lost:
        rt.launch_stage(sft_ctx(spec))
    assert "no answer to its launch" in lost.value.summary and "never starts a second run" in lost.value.hint
    (call,) = fake.calls.values()
    intent = json.loads(fake.volumes["retool-qwen7b-checkpoints"][f"sft/{RID[:16]}/_retool/launch.json"])
    assert intent["launch_id"] == call.payload["launch"]["launch_id"]  # written before the spawn

    # still queued (its container has not registered): refused, transiently, without a spawn
    with pytest.raises(ModalUnreachable) as waiting:
        ModalRuntime("/unused", adapter=fake).launch_stage(sft_ctx(spec))
    assert "may still be waiting for its GPUs" in waiting.value.summary
    assert len(fake.calls) == 1

    # the container starts and registers under the stage identity: the next launch re-attaches
    launches.register(fake, models.LaunchKey(**call.payload["launch"]), call.call_id, 0, 5.0)
    again = ModalRuntime("/unused", adapter=fake).launch_stage(sft_ctx(spec))
    assert again.ref.call_id == call.call_id and again.reattached and len(fake.calls) == 1


def test_a_spawn_that_never_reached_modal_is_launched_anew() -> None:
    spec = qwen()
    fake, rt = ready(spec, lost_spawn_answers=1)
    held(fake)
    with pytest.raises(ModalUnreachable):
        rt.launch_stage(sft_ctx(spec))
    fake.calls.clear()  # Modal never got it: nothing queued, nothing running
    handle = ModalRuntime("/unused", adapter=fake).launch_stage(sft_ctx(spec))
    assert list(fake.calls) == [handle.ref.call_id] and not handle.reattached
    reg = launches.lookup(fake, REGISTRY, KEY)
    assert reg is not None and reg.call_id == handle.ref.call_id  # registered by the CLI once answered
    run = json.loads(fake.volumes["retool-qwen7b-checkpoints"][f"sft/{RID[:16]}/_retool/run.json"])
    assert run["launch_id"] == reg.launch_id == fake.calls[handle.ref.call_id].payload["launch"]["launch_id"]


def test_a_launch_that_cannot_check_for_an_earlier_run_does_not_spawn() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    held(fake)
    fake.unreachable_ops = {"dict_get"}
    with pytest.raises(ModalUnreachable):
        rt.launch_stage(sft_ctx(spec))
    assert fake.calls == {}


def test_the_later_segment_registered_by_the_container_is_found() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    held(fake)
    first = rt.launch_stage(sft_ctx(spec))
    Containers(steps_per_call=100).advance(fake, first.ref.call_id)  # segment 0 hands over to segment 1
    nxt = fake.calls[first.ref.call_id].result["next_call_id"]
    launches.register(fake, models.LaunchKey(**fake.calls[nxt].payload["launch"]), nxt, 1, 9.0)
    again = ModalRuntime("/unused", adapter=fake).launch_stage(sft_ctx(spec))
    assert (again.ref.call_id, again.ref.segment) == (nxt, 1) and len(fake.calls) == 2


def test_billing_errors_cannot_lose_a_started_call() -> None:
    """The price is read before the spawn and any billing failure falls back to the table."""
    spec = qwen()
    fake, rt = ready(spec)
    held(fake)

    def broken() -> dict[str, float]:
        raise KeyError("gpu.h100")  # e.g. the billing API's shape changed

    fake.gpu_rates = broken  # type: ignore[method-assign]
    handle = rt.launch_stage(sft_ctx(spec))
    assert handle.ref.call_id in fake.calls and handle.ref.usd_per_gpu_hour == 3.95


# --------------------------------------------------------------------------- polling by meaning


def test_an_unknown_call_id_is_gone_not_failed() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    held(fake)
    handle = rt.launch_stage(sft_ctx(spec))
    assert fake.poll("fc-999999").state == "expired"  # what Modal answers for an id it does not know
    del fake.calls[handle.ref.call_id]  # e.g. the state was copied from another workspace
    status = rt.poll_stage(handle)
    assert status.state == "lost" and "no result" in status.message
    rt.cancel_stage(handle)  # nothing to cancel: not an error


def test_a_lost_input_relaunches_unless_the_run_left_its_result() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    held(fake)
    handle = rt.launch_stage(sft_ctx(spec))
    fake.lose(handle.ref.call_id)
    status = rt.poll_stage(handle)
    assert status.state == "lost" and "Modal has no result" in status.message
    fake.write("retool-qwen7b-checkpoints", f"sft/{RID[:16]}/_retool/result.json",
               json.dumps({"outcome": "finished", "step": 372}))
    assert rt.poll_stage(handle).state == "succeeded"


def test_an_outage_while_polling_leaves_the_run_alone() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    held(fake)
    handle = rt.launch_stage(sft_ctx(spec))
    fake.unreachable_ops = {"poll"}
    with pytest.raises(ModalUnreachable):
        rt.poll_stage(handle)
    assert fake.ops_named("cancel") == [] and fake.calls[handle.ref.call_id].state == "running"


# --------------------------------------------------------------------------- the container's side


def launch_payload(tmp_path: Path, launch_id: str) -> object:
    return payload(tmp_path, launch=models.LaunchKey(registry=REGISTRY, key=KEY, launch_id=launch_id))


def test_the_container_registers_its_call_before_training(tmp_path: Path) -> None:
    fake = FakeModal(call_id_in_container="fc-000007")
    result = ContainerSegment(launch_payload(tmp_path, "L1"), fake).run()  # type: ignore[arg-type]
    assert result["outcome"] == "finished"
    reg = launches.lookup(fake, REGISTRY, KEY)
    assert reg is not None and (reg.launch_id, reg.call_id, reg.segment) == ("L1", "fc-000007", 0)


def test_a_duplicate_of_a_running_stage_stops_before_training(tmp_path: Path) -> None:
    fake = FakeModal(call_id_in_container="fc-000009")
    from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep

    fake.deploy(AppDefinition(app_name="retool-test", image=[ImageStep(op="from_registry", args=["x:1"])],
                              functions=[FunctionSpec(name="stage-sft", entry="run_stage")]))
    other = fake.spawn("retool-test", "stage-sft", {})  # the first launch, still running
    launches.register(fake, models.LaunchKey(registry=REGISTRY, key=KEY, launch_id="L1"), other, 0, 1.0)
    p = launch_payload(tmp_path, "L2")
    result = ContainerSegment(p, fake).run()  # type: ignore[arg-type]
    assert result["outcome"] == "failed" and "duplicate stopped without training" in result["message"]
    assert not (Path(p.checkpoint_dir) / "_retool" / "argv.jsonl").exists()  # type: ignore[attr-defined]
    fake.complete(other, {"outcome": "finished"})  # once the first run ended, a new launch trains
    assert ContainerSegment(p, fake).run()["outcome"] == "finished" and len(runs(p)) == 1  # type: ignore[arg-type]


def test_terminal_errors_are_not_retried_as_outages() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    fake.token = False
    with pytest.raises(TerminalError) as exc:
        rt.launch_stage(sft_ctx(spec))
    assert not isinstance(exc.value, ModalUnreachable) and fake.calls == {}


def test_after_a_hand_over_a_launch_reattaches_to_the_running_segment(tmp_path: Path) -> None:
    """`run.json` has two writers: the CLI when it launches segment 0 and the container when
    it hands over to the next segment. After a hand-over, with the registry's entry gone
    (Modal Dict entries expire after 7 idle days), the next launch finds the running
    segment from `run.json` alone, by its own number, and keeps the launch's identity."""
    spec = qwen()
    fake, rt = ready(spec)
    held(fake)
    first = rt.launch_stage(sft_ctx(spec))  # the CLI writes run.json for segment 0
    head = fake.calls[first.ref.call_id]
    vol, rel = "retool-qwen7b-checkpoints", f"sft/{RID[:16]}/_retool/run.json"

    # segment 0's container: the real worker, over a local copy of the stage's run directory
    p = payload(tmp_path, extra=["hang_at=4"], train_seconds=2.0, app_name=head.app_name, function=head.function,
                launch=models.LaunchKey(**head.payload["launch"]))
    local = Path(p.checkpoint_dir) / "_retool" / "run.json"
    local.parent.mkdir(parents=True)
    local.write_bytes(fake.volumes[vol][rel])  # what the container sees after reloading the volume
    fake.call_id_in_container = head.call_id
    result = ContainerSegment(p, fake).run()
    assert result["outcome"] == "continued"
    fake.complete(head.call_id, result)
    fake.write(vol, rel, local.read_bytes())  # the container committed its run.json
    nxt = result["next_call_id"]
    assert fake.calls[nxt].state == "running"

    fake.dicts.clear()  # the registry no longer knows the stage identity
    again = ModalRuntime("/unused", adapter=fake).launch_stage(sft_ctx(spec))
    assert (again.ref.call_id, again.ref.segment, again.reattached) == (nxt, 1, True)
    assert "segment 1" in ModalRuntime("/unused", adapter=fake).poll_stage(again).message
    assert len(fake.calls) == 2  # nothing spawned a second run
    run = json.loads(fake.volumes[vol][rel])
    assert (run["head_call_id"], run["launch_id"]) == (head.call_id, head.payload["launch"]["launch_id"])
