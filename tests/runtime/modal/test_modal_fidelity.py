"""The fake behaves like `SdkAdapter` over the real modal 1.6.4 client where retool depends
on it, and `SdkAdapter` translates what the client raises by meaning.

Each fake test pins a behaviour read from the client's source (`modal/volume.py`,
`modal/_functions.py`, `modal/_utils/function_utils.py`) that the fake used to get wrong.
The `SdkAdapter` tests drive the real adapter code with the real `modal.exception` classes
and a stand-in for the one SDK object each call touches (no server is reachable here)."""

from __future__ import annotations

import builtins
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import TerminalError
from runtime.modal.adapter import CallNotFound, ModalUnreachable, SdkAdapter, VolumeNotFound
from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep
from runtime.modal.worker import ContainerSegment
from tests.fakes.fake_modal import FakeCall, FakeModal, FakeModalError
from tests.runtime.modal.test_modal_worker import payload

# --------------------------------------------------------------------------- volumes


def test_reload_and_commit_fail_while_a_file_on_the_volume_is_open(tmp_path: Path) -> None:
    """modal 1.6.4 `Volume.reload()` raises RuntimeError("... there are open files preventing
    the operation ...") and `commit()` reloads after committing, so it fails the same way."""
    fake = FakeModal(mounts={"ckpt": tmp_path})
    log = tmp_path / "run" / "train.log"
    log.parent.mkdir()
    with log.open("a") as fh:
        fh.write("step:1\n")
        with pytest.raises(RuntimeError, match="open files preventing the operation"):
            fake.reload_volume("ckpt")
        with pytest.raises(RuntimeError, match="open files preventing the operation"):
            fake.commit_volume("ckpt")
    fake.reload_volume("ckpt")
    fake.commit_volume("ckpt")
    # a child process holding a file open counts too (a training process, the sandbox sidecar)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        fh = open({str(log)!r}, "a"); print("open", flush=True); time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(RuntimeError, match="train.log"):
            fake.reload_volume("ckpt")
    finally:
        holder.kill()
        holder.wait()
    fake.reload_volume("ckpt")


TRAINER = textwrap.dedent(
    """
    import os, sys, time, pathlib
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out = pathlib.Path(args["trainer.default_local_dir"])
    seen = pathlib.Path(args["commit_seen"])
    print("step:1 - train/loss:1.0", flush=True)
    deadline = time.time() + 120
    while not seen.exists() and time.time() < deadline:  # keep logging until a commit happened mid-run
        time.sleep(0.05)
    d = out / "global_step_1"
    d.mkdir(parents=True, exist_ok=True)
    for kind in ("model", "optim", "extra_state"):
        (d / f"{kind}_world_size_1_rank_0.pt").write_bytes(b"w")
    (out / "latest_checkpointed_iteration.txt").write_text("1")
    print("step:2 - train/loss:0.5 done", flush=True)
    """
)


def test_the_worker_commits_while_training_without_holding_files_open_on_the_volume(tmp_path: Path) -> None:
    """Live logs are written off the volume and copied in before each commit, so periodic
    commits during training succeed (they used to fail on the open log)."""
    seen = tmp_path / "commit-seen"
    p = payload(tmp_path, commit_every_s=0.2, total_steps=1)
    script = tmp_path / "committing_trainer.py"
    script.write_text(TRAINER)
    cmd = p.commands[0]
    argv = [sys.executable, str(script), "verl.trainer.sft_trainer",
            f"trainer.default_local_dir={p.checkpoint_dir}", f"commit_seen={seen}"]
    p = p.model_copy(update={"commands": [{**cmd, "argv": argv}]})

    def on_commit(name: str) -> None:
        if name == "test-checkpoints":
            seen.touch()

    fake = FakeModal(mounts={"test-checkpoints": tmp_path / "ckpt", "test-data": tmp_path / "data"},
                     on_commit=on_commit)
    (tmp_path / "data").mkdir()
    result = ContainerSegment(p, fake).run()
    assert result["outcome"] == "finished"
    assert fake.ops_named("refused_open_files") == []
    assert len(fake.ops_named("commit_volume")) >= 2  # at least one during training, one at the end
    log = (Path(p.checkpoint_dir) / "_retool" / "logs" / "segment-0-rank-0.log").read_text()
    assert log.startswith("[retool] $ ") and "step:2 - train/loss:0.5 done" in log


def test_remove_of_a_missing_path_raises_file_not_found() -> None:
    fake = FakeModal()
    fake.write("v", "a/b.txt", "x")
    with pytest.raises(FileNotFoundError):
        fake.remove("v", "a/missing.txt")
    fake.remove("v", "a", recursive=True)
    assert fake.tree("v") == []


def test_uploading_to_a_missing_volume_raises_volume_not_found() -> None:
    fake = FakeModal()
    with pytest.raises(VolumeNotFound):
        fake.put_files("nope", {"x.txt": b"1"})
    assert "nope" not in fake.volumes  # nothing was created behind the user's back


def test_polling_an_unknown_call_id_reports_expired_as_modal_does() -> None:
    """modal 1.6.4's poll_function: no outputs and no unfinished inputs -> OutputExpiredError."""
    assert FakeModal().poll("fc-404").state == "expired"


def test_gpu_names_are_checked_against_modals_list() -> None:
    """Modal's documented types and per-container counts; the client upper-cases the type."""
    fake = FakeModal()

    def deploy(gpu: str) -> None:
        fake.deploy(AppDefinition(app_name="a", image=[ImageStep(op="from_registry", args=["x:1"])],
                                  functions=[FunctionSpec(name="f", entry="run_stage", gpu=gpu)]))

    for ok in ("h100:8", "RTX-PRO-6000", "A10:4", "B200+", "H100!:2"):
        deploy(ok)
    for bad, why in (("A10G:8", "at most 4 A10G"), ("H100:9", "at most 8 H100"), ("V100", "not a Modal GPU type"),
                     ("H100:two", "Invalid GPU count")):
        with pytest.raises(FakeModalError, match=why):
            deploy(bad)


# --------------------------------------------------------------------------- SdkAdapter's translations


@pytest.fixture()
def sdk(monkeypatch: pytest.MonkeyPatch) -> Any:
    modal = pytest.importorskip("modal")
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-test")  # a token is "configured"; nothing reaches a server
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-test")
    return modal


class StubVolume:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def remove_file(self, path: str, recursive: bool = False) -> None:
        raise self.error

    def batch_upload(self, force: bool = False) -> Any:
        raise self.error


def test_sdk_remove_of_a_missing_path_raises_file_not_found(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = SdkAdapter()
    monkeypatch.setattr(adapter, "_volume", lambda *a, **k: StubVolume(FileNotFoundError("/a/missing.txt")))
    with pytest.raises(FileNotFoundError):
        adapter.remove("v", "a/missing.txt")


def test_sdk_upload_to_a_missing_volume_is_a_clear_error(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = SdkAdapter()
    monkeypatch.setattr(adapter, "_volume", lambda *a, **k: StubVolume(sdk.exception.NotFoundError("Volume 'v' not found")))
    with pytest.raises(VolumeNotFound, match="Modal volume v does not exist"):
        adapter.put_files("v", {"x": b"1"})


def outcome_of(sdk: Any, monkeypatch: pytest.MonkeyPatch, error: BaseException | None, value: Any = None) -> Any:
    class StubCall:
        def get(self, timeout: float | None = None) -> Any:
            if error is not None:
                raise error
            return value

    monkeypatch.setattr(sdk.FunctionCall, "from_id", staticmethod(lambda call_id, *a, **k: StubCall()))
    return SdkAdapter().poll("fc-1")


def test_sdk_poll_classifies_the_call(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    exc = sdk.exception
    cases: list[tuple[BaseException | None, str]] = [
        (None, "succeeded"),
        (builtins.TimeoutError(), "running"),  # poll_function: still running
        (exc.OutputExpiredError(), "expired"),
        (exc.InternalFailure("worker preempted"), "lost"),  # GENERIC_STATUS_INTERNAL_FAILURE
        (exc.FunctionTimeoutError("timed out after 86400 s"), "failed"),
        (RuntimeError("verl SFT exited with 1"), "failed"),  # the function's own exception
        (exc.RemoteError("Function call was terminated"), "terminated"),  # GENERIC_STATUS_TERMINATED
        (exc.ImageBuildError("pip failed", "im-1"), "failed"),  # a RemoteError subclass: not a termination
        (exc.RemoteError("a message that says cancel"), "terminated"),  # by type, not by the word
        (RuntimeError("user code: cancelled the plan"), "failed"),
    ]
    for error, state in cases:
        assert outcome_of(sdk, monkeypatch, error, {"outcome": "finished"}).state == state, error


def test_sdk_poll_errors_by_meaning(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    exc = sdk.exception
    for unreachable in (exc.ConnectionError("reset"), exc.ServiceError("unavailable"), exc.InternalError("500"),
                        exc.ResourceExhaustedError("rate limited")):
        with pytest.raises(ModalUnreachable):
            outcome_of(sdk, monkeypatch, unreachable)
    with pytest.raises(CallNotFound):
        outcome_of(sdk, monkeypatch, exc.NotFoundError("Function call fc-1 not found"))
    with pytest.raises(CallNotFound):
        outcome_of(sdk, monkeypatch, exc.InvalidError("malformed id"))
    with pytest.raises(ModalUnreachable):  # ConflictError is an InvalidError, but says nothing about the call
        outcome_of(sdk, monkeypatch, exc.ConflictError("aborted"))
    with pytest.raises(TerminalError) as auth:
        outcome_of(sdk, monkeypatch, exc.AuthError("token revoked"))
    assert "modal token new" in auth.value.hint and not isinstance(auth.value, ModalUnreachable)


def test_sdk_deadline_reports_unreachable_quickly(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    class Hanging:
        def get(self, timeout: float | None = None) -> Any:
            time.sleep(30)

    monkeypatch.setattr(sdk.FunctionCall, "from_id", staticmethod(lambda call_id, *a, **k: Hanging()))
    with pytest.raises(ModalUnreachable, match="did not answer"):
        SdkAdapter(call_timeout_s=0.2).poll("fc-1")


def test_sdk_stats_of_a_function_not_deployed_are_empty(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing:
        def get_current_stats(self) -> Any:
            raise sdk.exception.NotFoundError("Function 'stage-sft' not found")

    adapter = SdkAdapter()
    monkeypatch.setattr(adapter, "_function", lambda *a, **k: Missing())
    stats = adapter.function_stats("retool-x", "stage-sft")
    assert (stats.backlog, stats.runners) == (0, 0)
    assert (FakeModal().function_stats("retool-x", "stage-sft").backlog, 0) == (0, 0)


def modal_raises(status: int, message: str = "") -> BaseException:
    """What modal 1.6.4's own `_process_result` raises for a result with this status and no data."""
    import asyncio

    from modal._utils.function_utils import _process_result
    from modal_proto import api_pb2

    result = api_pb2.GenericResult(status=status, exception=message)  # type: ignore[arg-type]
    try:
        asyncio.run(_process_result(result, api_pb2.DATA_FORMAT_PICKLE, None, None))
    except BaseException as exc:  # noqa: BLE001 - the exception is the answer
        return exc
    raise AssertionError(f"status {status} raised nothing")


def test_fake_call_states_match_what_modals_own_result_processing_raises(sdk: Any) -> None:
    """Each way a fake call can end polls as the same state as the exception modal's client
    raises for the GenericResult status Modal's servers send in that case."""
    from modal_proto import api_pb2

    from runtime.modal.adapter import call_outcome

    status = api_pb2.GenericResult
    fake = FakeModal()
    fake.deployed["app"] = AppDefinition(app_name="app", image=[], functions=[])

    def ended(how: Any) -> str:
        call_id = f"fc-{len(fake.calls) + 1}"
        fake.calls[call_id] = FakeCall(call_id=call_id, app_name="app", function="f", payload={}, env={})
        how(call_id)
        return fake.poll(call_id).state

    cases = [
        (status.GENERIC_STATUS_TERMINATED, fake.cancel),
        (status.GENERIC_STATUS_INTERNAL_FAILURE, fake.lose),
        (status.GENERIC_STATUS_TIMEOUT, lambda c: fake.fail(c, "timed out: 86400 s")),
    ]
    for modal_status, how in cases:
        expected = call_outcome(sdk.exception, modal_raises(modal_status, "x"), "fc-1").state
        assert ended(how) == expected, modal_status
    fake.conflicts = 1
    with pytest.raises(ModalUnreachable):
        fake.poll("fc-1")


def test_sdk_web_url_of_a_function_that_is_no_web_endpoint_is_a_clear_error(
    sdk: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """modal 1.6.4's `Function.get_web_url()` answers None for a non-web function; the fake agrees."""

    class StubFunction:
        def get_web_url(self) -> None:
            return None

    monkeypatch.setattr(sdk.Function, "from_name", staticmethod(lambda *a, **k: StubFunction()))
    with pytest.raises(TerminalError) as real:
        SdkAdapter().web_url("retool-x", "sandbox")
    fake = FakeModal()
    fake.deployed["retool-x"] = AppDefinition(app_name="retool-x", image=[], functions=[
        FunctionSpec(name="sandbox", entry="sandbox_web", web=False)])
    with pytest.raises(TerminalError) as faked:
        fake.web_url("retool-x", "sandbox")
    assert real.value.summary == faked.value.summary and "None" not in real.value.summary


def test_sdk_image_build_runs_in_the_specs_environment(sdk: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Image.build()` without an app builds in Modal's default environment: doctor's build
    must run in an app of the spec's `modal.environment`."""
    seen: dict[str, Any] = {}

    class StubRun:
        def __init__(self, environment_name: str | None) -> None:
            seen["environment"] = environment_name

        def __enter__(self) -> str:
            return "app-in-env"

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(sdk.App, "run", lambda self, **kw: StubRun(kw.get("environment_name")))
    monkeypatch.setattr(sdk.Image, "build", lambda self, app=None: seen.setdefault("app", app))
    monkeypatch.setattr(sdk.Image, "object_id", property(lambda self: "im-1"))
    monkeypatch.setattr(SdkAdapter, "check_connection", lambda self, timeout_s=0: None)
    steps = [ImageStep(op="from_registry", args=["python:3.12-slim"])]
    assert SdkAdapter().build_image_now(steps, env="staging") == "im-1"
    assert seen == {"environment": "staging", "app": "app-in-env"}
