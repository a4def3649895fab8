"""ModalRuntime's own rules, one at a time, on the fake adapter: checkpoints read from the
volume listing with the shared validity rules, result expiry, cancel of a segment chain,
launch idempotency, uploads of local sources, the service sandbox, cost, blocked stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import TerminalError
from reconciler.spec import Spec
from reconciler.backend import StageContext
from runtime.checkpoints import COMPLETE_FILE, SaveComplete
from runtime.modal.adapter import ModalUnreachable
from tests.plan_helpers import qwen
from runtime.modal.layout import stage_function_name
from runtime.modal.app import build_app_definition
from runtime.modal.backend import ModalRuntime
from tests.fakes.fake_modal import Containers, FakeModal

REPO = Path(__file__).resolve().parents[3]
RID = "ab" * 32
OTHER = "cd" * 32


def ready(spec: Spec, **fake_kw: Any) -> tuple[FakeModal, ModalRuntime]:
    fake = FakeModal(secrets={"wandb": {"WANDB_API_KEY": "v"}, "huggingface": {"HF_TOKEN": "v"},
                              "sandbox-token": {"SANDBOX_TOKEN": "t"}}, **fake_kw)
    for key in spec.volumes:
        fake.create_volume(f"{spec.name}-{key}")
    fake.ops.clear()
    return fake, ModalRuntime("/unused", adapter=fake, ping=lambda url: True)


def sft_ctx(spec: Spec, *, total: int = 372, resume_from: int | None = None) -> StageContext:
    return StageContext(
        spec=spec, spec_dir=str(REPO / "specs"), stage="sft", restart_id=RID, total_steps=total, resume_from=resume_from,
        inputs={"model.qwen7b": {"path": "/models/models/qwen7b"},
                "dataset.retool_sft": {"path": "/data/datasets/retool_sft/train.parquet"}},
    )


def write_ckpt(fake: FakeModal, rid: str, step: int, ranks: range = range(8), tracker: int | None = None) -> None:
    vol = "retool-qwen7b-checkpoints"
    for r in ranks:
        for kind in ("model", "optim", "extra_state"):
            fake.write(vol, f"sft/{rid[:16]}/global_step_{step}/{kind}_world_size_8_rank_{r}.pt", b"x" * 4)
    fake.write(vol, f"sft/{rid[:16]}/global_step_{step}/{COMPLETE_FILE}",
               SaveComplete(step=step, world_size=8, restart_id=rid).model_dump_json())
    if tracker is not None:
        fake.write(vol, f"sft/{rid[:16]}/latest_checkpointed_iteration.txt", str(tracker))


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_judged_from_the_volume_listing() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    write_ckpt(fake, RID, 62)
    write_ckpt(fake, RID, 124, ranks=range(7), tracker=124)  # rank 7 missing
    write_ckpt(fake, RID, 186)  # newer than the tracker: still being written
    write_ckpt(fake, OTHER, 62, tracker=62)  # another restart identity
    fake.write("retool-qwen7b-checkpoints", f"sft/{RID[:16]}/merged/config.json", "{}")
    found = {(c.path, c.valid): c.reason for c in rt.discover_checkpoints(spec, "sft", RID)}
    base = f"/checkpoints/sft/{RID[:16]}"
    assert (f"{base}/global_step_62", True) in found
    assert found[(f"{base}/global_step_124", False)] == "missing model shard rank 7 of 8"
    assert "still being written" in found[(f"{base}/global_step_186", False)]
    assert "another restart identity" in found[(f"/checkpoints/sft/{OTHER[:16]}/global_step_62", False)]
    assert rt.discover_checkpoints(spec, "dapo", RID) == []  # nothing there yet


# --------------------------------------------------------------------------- runs


def launched(spec: Spec, **kw: Any) -> tuple[FakeModal, ModalRuntime, Any]:
    fake, rt = ready(spec)
    c = Containers(hold=True, **kw)
    c.install(fake, [stage_function_name(s) for s in spec.stages])
    handle = rt.launch_stage(sft_ctx(spec))
    return fake, rt, handle


def test_launch_records_the_call_and_marks_the_run_on_the_volume() -> None:
    fake, rt, handle = launched(qwen())
    assert handle.backend == "modal" and handle.ref.call_id in fake.calls and handle.ref.app_name == "retool-qwen7b"
    vol = fake.volumes["retool-qwen7b-checkpoints"]
    assert json.loads(vol[f"sft/{RID[:16]}/retool.json"])["restart_id"] == RID
    assert json.loads(vol[f"sft/{RID[:16]}/_retool/run.json"])["call_id"] == handle.ref.call_id
    status = rt.poll_stage(handle)
    assert status.state == "running" and status.total == 372


def test_a_cpu_stage_launches_and_its_call_is_recorded() -> None:
    """`gpu: null` on Modal is a CPU container: the handle recorded after the spawn takes no GPU
    type (it failed validation after the call had started, so the call id was lost)."""
    fake, rt, handle = launched(qwen(stages__sft__resources={"cpu": 4}))
    assert handle.ref.call_id in fake.calls and (handle.ref.gpus, handle.ref.gpu) == (0, "")
    assert fake.deployed["retool-qwen7b"].function("stage-sft").gpu is None
    status = rt.poll_stage(handle)
    assert status.state == "running" and status.metrics["gpu_seconds"] == 0.0


def test_a_second_launch_of_a_running_identity_returns_the_same_call() -> None:
    """A crash between spawn and recording the handle must not start a duplicate run."""
    spec = qwen()
    fake, rt, handle = launched(spec)
    again = ModalRuntime("/unused", adapter=fake).launch_stage(sft_ctx(spec))
    assert again.ref.call_id == handle.ref.call_id and len(fake.calls) == 1


def test_an_expired_result_is_read_from_the_run_files() -> None:
    spec = qwen()
    fake, rt, handle = launched(spec)
    Containers().advance(fake, handle.ref.call_id)
    fake.expire(handle.ref.call_id)
    status = rt.poll_stage(handle)
    assert status.state == "succeeded" and status.step == 372
    fake.volumes["retool-qwen7b-checkpoints"].pop(f"sft/{RID[:16]}/_retool/result.json")
    assert rt.poll_stage(handle).state == "lost"


def test_cancel_stops_the_segment_now_running() -> None:
    spec = qwen()
    fake, rt, handle = launched(spec)
    c = Containers(steps_per_call=100)
    c.advance(fake, handle.ref.call_id)  # segment 0 ends and spawns segment 1
    nxt = fake.calls[handle.ref.call_id].result["next_call_id"]
    assert rt.poll_stage(handle).message.startswith("running on Modal (segment 1")
    rt.cancel_stage(handle)
    assert fake.calls[nxt].state == "terminated"  # Modal reports a cancelled call as TERMINATED
    status = rt.poll_stage(handle)
    assert status.state == "failed" and status.message.startswith("cancelled")


def test_a_failed_call_reports_the_remote_error() -> None:
    fake, rt, handle = launched(qwen())
    fake.fail(handle.ref.call_id, "RuntimeError: verl SFT exited with 1\nCUDA out of memory")
    status = rt.poll_stage(handle)
    assert status.state == "failed" and "CUDA out of memory" in status.message


def test_cost_uses_billing_rates_else_the_price_table() -> None:
    spec = qwen()
    fake, rt, handle = launched(spec)
    fake.rates = None  # already cached as unavailable: the spec's table
    Containers().advance(fake, handle.ref.call_id)
    status = rt.poll_stage(handle)
    assert status.metrics["gpu_seconds"] == pytest.approx(60.0 * 372 * 8)
    assert status.metrics["cost_usd"] == pytest.approx(60.0 * 372 * 8 / 3600 * 3.95)
    fake2, rt2 = ready(spec, rates={"H100": 3.0})
    assert rt2.gpu_hour_usd(spec, "H100") == 3.0 and rt2.gpu_hour_usd(spec, "A100") == 2.10


def test_poll_through_an_outage_raises_transient_and_changes_nothing() -> None:
    fake, rt, handle = launched(qwen())
    fake.reachable = False
    with pytest.raises(ModalUnreachable):
        rt.poll_stage(handle)
    assert fake.calls[handle.ref.call_id].state == "running"


# --------------------------------------------------------------------------- data, sandbox, checks


def test_path_sources_are_uploaded_and_prepared_once(tmp_path: Path) -> None:
    spec = qwen(datasets__aime_2024__source="path:data/aime_2024.jsonl")
    fake, rt = ready(spec)
    Containers().install(fake, [])
    fake.deploy(build_app_definition(spec))
    ds = spec.datasets["aime_2024"]
    first = rt.prepare_dataset("aime_2024", ds, spec, str(REPO / "specs"))
    assert first.change == "created" and first.outputs["path"] == "/data/datasets/aime_2024/train.parquet"
    vol = fake.volumes["retool-qwen7b-data"]
    (call,) = [c for c in fake.calls.values() if c.function == "prepare"]
    assert call.payload["config"]["source"] == "path:aime_2024.jsonl"
    staged = call.payload["spec_dir"].removeprefix("/data/")
    assert staged.startswith("_uploads/dataset/aime_2024/") and f"{staged}.complete" in vol
    assert vol[f"{staged}/aime_2024.jsonl"] == (REPO / "specs/data/aime_2024.jsonl").read_bytes()
    again = rt.prepare_dataset("aime_2024", ds, spec, str(REPO / "specs"))
    assert again.change == "unchanged" and again.outputs == first.outputs and len(fake.calls) == 1


def test_an_interrupted_model_upload_is_never_used_and_the_next_apply_uploads_it_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `path:` model (a folder of shards) uploads file by file with no deadline, showing
    progress; until its completion marker exists nothing reads it, and an upload that
    completed is not sent again."""
    model = tmp_path / "my-model"
    model.mkdir()
    for i in range(4):
        (model / f"shard-{i}.safetensors").write_bytes(bytes([i]) * 1000)
    spec = qwen(models__qwen7b__source=f"path:{model}")
    fake, rt = ready(spec)
    Containers().install(fake, [])
    fake.deploy(build_app_definition(spec))
    fake.fail_upload_after = 2
    with pytest.raises(ModalUnreachable):
        rt.prepare_model("qwen7b", spec.models["qwen7b"], spec, str(tmp_path))
    vol = fake.volumes[[v for v in fake.volumes if v.endswith("-models")][0]]
    assert not [k for k in vol if k.endswith(".complete")] and not [c for c in fake.calls.values()]
    out = rt.prepare_model("qwen7b", spec.models["qwen7b"], spec, str(tmp_path))
    assert out.change == "created"
    (call,) = fake.calls.values()
    staged = call.payload["spec_dir"].split("/", 2)[2]
    shards = sorted(k for k in vol if k.startswith(staged + "/"))
    assert shards == [f"{staged}/my-model/shard-{i}.safetensors" for i in range(4)]
    assert all(k.startswith(staged) for k in vol if k.startswith("_uploads/"))  # the broken attempt is gone
    assert "4/4 files" in capsys.readouterr().err
    uploads = len(fake.ops_named("upload_data"))
    vol.pop("models/.qwen7b.prepared.json")  # e.g. the preparation itself must run again
    rt.prepare_model("qwen7b", spec.models["qwen7b"], spec, str(tmp_path))  # prepared again, not uploaded again
    assert len(fake.ops_named("upload_data")) == uploads


def test_service_sandbox_records_its_url_without_the_token() -> None:
    spec = qwen(sandbox__placement="service", sandbox__token_secret="sandbox_token",
                secrets__sandbox_token={"modal_name": "sandbox-token", "env": ["SANDBOX_TOKEN"]})
    fake, rt = ready(spec)
    out = rt.ensure_sandbox(spec.sandbox, spec)  # type: ignore[arg-type]
    assert out.outputs["url"] == "https://acme--retool-qwen7b-sandbox.modal.run"
    assert fake.deploys[-1].function("sandbox").web
    ctx = StageContext(spec=spec, spec_dir="", stage="dapo", restart_id=RID, total_steps=400, inputs={
        "stage.sft": {"model_path": "/checkpoints/sft/x/merged"}, "dataset.dapo_math": {"path": "/data/d.parquet"},
        "dataset.aime_2024": {"path": "/data/a.parquet"}, "dataset.aime_2025": {"path": "/data/b.parquet"},
        "sandbox": out.outputs,
    })
    (train, _merge) = rt.render_stage(ctx)
    assert train.env["RETOOL_SANDBOX_URL"] == out.outputs["url"]


def test_an_eval_stage_reaches_the_service_sandbox_with_the_containers_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval runner called the job's URL, recorded without the token, so every tool call
    of an evaluation on Modal got 401 from a service sandbox. Its command now carries the URL
    in RETOOL_SANDBOX_URL, where the container adds the token, and the runner uses that."""
    from runtime.eval.job import EvalJob
    from runtime.eval.run import tools_url
    from runtime.modal.models import StagePayload
    from runtime.modal.worker import ContainerSegment

    spec = qwen(sandbox__placement="service", sandbox__token_secret="sandbox_token",
                secrets__sandbox_token={"modal_name": "sandbox-token", "env": ["SANDBOX_TOKEN"]})
    fake, rt = ready(spec)
    url = rt.ensure_sandbox(spec.sandbox, spec).outputs["url"]  # type: ignore[arg-type]
    ctx = StageContext(spec=spec, spec_dir="", stage="eval_sft", restart_id=RID, total_steps=30, inputs={
        "stage.sft": {"model_path": "/checkpoints/sft/x/merged"}, "dataset.aime_2024": {"path": "/data/a.parquet"},
        "dataset.aime_2025": {"path": "/data/b.parquet"}, "sandbox": {"url": url},
    })
    rt.launch_stage(ctx)
    (call,) = [c for c in fake.calls.values() if c.function == "stage-eval_sft"]
    (cmd,) = call.payload["commands"]
    assert cmd["env"]["RETOOL_SANDBOX_URL"] == url
    job = EvalJob.model_validate_json(fake.volumes["retool-qwen7b-checkpoints"][f"eval_sft/{RID[:16]}/job.json"])
    assert job.sandbox_url == url
    # inside the container: the worker puts the token from the function's secret into the URL
    monkeypatch.setenv("SANDBOX_TOKEN", "tok-9")
    given = ContainerSegment(StagePayload.model_validate(call.payload), fake)._sandbox_env()["RETOOL_SANDBOX_URL"]
    assert given == f"{url}/t/tok-9"
    # and the runner calls the URL its command was given (the worker passes its env on), not the job's
    monkeypatch.setenv("RETOOL_SANDBOX_URL", given)
    assert tools_url(job) == given
    monkeypatch.delenv("RETOOL_SANDBOX_URL")
    assert tools_url(job) == url  # a backend that gives no URL of its own: the job's


def test_preflight_without_token_needs_no_network() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    fake.token = False
    problems = rt.preflight(spec)
    assert len(problems) == 1 and "modal token new" in problems[0] and "MODAL_TOKEN_ID" in problems[0]
    assert fake.ops == []


def test_blocked_reasons_come_from_local_checks_only() -> None:
    spec = qwen(stages__dapo__resources__timeout_hours=30, stages__sft__resources__nodes=2,
                stages__sft__resources__gpus_per_node=4)
    fake, rt = ready(spec)
    fake.token = False  # no network needed to know
    assert "exceeds Modal's 24 h" in (rt.blocked_reason(spec, "stage.dapo") or "")
    # a Modal cluster's containers take whole hosts; two full nodes run (runtime.cluster)
    assert "take every GPU of their host: set resources.gpus_per_node: 8" in (rt.blocked_reason(spec, "stage.sft") or "")
    two_nodes = qwen(stages__sft__resources__nodes=2)
    assert rt.blocked_reason(two_nodes, "stage.sft") is None
    assert rt.blocked_reason(spec, "volume.data") is None and rt.blocked_reason(spec, "image") is None
    # `gpu: null` is a CPU container on Modal, as everywhere: allowed, rendered for CPU, and warned about
    cpu = qwen(stages__sft__resources={"cpu": 4})
    assert rt.blocked_reason(cpu, "stage.sft") is None
    assert any(w.startswith("stages.sft.resources: no `gpu`: runs on a CPU container") for w in rt.spec_warnings(cpu))
    assert not any("no `gpu`" in w for w in rt.spec_warnings(spec))
    (cmd, *_) = rt.render_stage(sft_ctx(cpu))
    assert "trainer.device=cpu" in cmd.argv and build_app_definition(cpu).function("stage-sft").gpu is None


def test_finalize_merges_once_per_checkpoint() -> None:
    spec = qwen()
    fake, rt = ready(spec)
    Containers().install(fake, [])
    fake.deploy(build_app_definition(spec))
    write_ckpt(fake, RID, 372, tracker=372)
    (ckpt,) = [c for c in rt.discover_checkpoints(spec, "sft", RID) if c.valid]
    out = rt.finalize_stage(sft_ctx(spec), ckpt)
    assert out.change == "created" and out.outputs["model_path"] == f"/checkpoints/sft/{RID[:16]}/merged"
    (call,) = [c for c in fake.calls.values() if c.function == "finalize"]
    assert call.payload["commands"][0]["argv"][-4:] == ["--local_dir", ckpt.path, "--target_dir", out.outputs["model_path"]]
    assert rt.finalize_stage(sft_ctx(spec), ckpt).change == "unchanged" and len(fake.calls) == 1


def test_a_tool_call_rate_below_the_minimum_fails_finalize() -> None:
    spec = qwen(stages__sft__tool_call_check={"prompts": 50, "min_rate": 0.95})
    fake, rt = ready(spec)
    Containers().install(fake, [])
    fake.deploy(build_app_definition(spec))
    write_ckpt(fake, RID, 372, tracker=372)
    (ckpt,) = [c for c in rt.discover_checkpoints(spec, "sft", RID) if c.valid]
    with pytest.raises(TerminalError, match="below the required 95%"):
        rt.finalize_stage(sft_ctx(spec), ckpt)
