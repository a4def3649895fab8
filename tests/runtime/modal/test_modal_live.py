"""Live: what a maintainer runs once per release against a real Modal workspace.

Opt-in (`pytest -m modal_live`), skipped without Modal credentials; everything it creates is
named `retool-live-<random>` / `retool-tiny-live-<random>` and removed afterwards.

- `test_tiny_sft_runs_on_one_modal_gpu`: deploy specs/retool-tiny.yaml with `backend: modal`,
  prepare its data and model in the cloud, train its SFT on one GPU (`RETOOL_LIVE_GPU`,
  default L4), merge it; a second plan has nothing to do.
- the smoke (`test_smoke_*`): the 7B image builds (verl's vLLM image, nothing compiled);
  a trivial function spawns; volume round trips both ways, with a file held open on the
  volume while committing (refused, as the fake assumes); `get(timeout=0)` of a running, a
  finished, a cancelled and an unknown call; two processes racing for the state lock; a
  retry after an exception; the real stage worker on a GPU with its sandbox sidecar, forced
  to hand over to a second segment, registering its launch key, its logs on the volume.

Cost: a few cents of GPU time plus the image builds (the 7B image pulls ~20 GB once).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from reconciler.apply.engine import apply
from reconciler.loader import load_spec
from reconciler.refresh import refresh_and_plan
from reconciler.state.local import LocalStore

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.modal_live, pytest.mark.slow]


@pytest.fixture(scope="module")
def adapter():  # type: ignore[no-untyped-def]
    pytest.importorskip("modal")
    from runtime.modal.adapter import SdkAdapter

    adapter = SdkAdapter()
    problem = adapter.credentials_problem()
    if problem:
        pytest.skip(problem)
    adapter.check_connection()
    return adapter


def test_tiny_sft_runs_on_one_modal_gpu(tmp_path: Path, adapter) -> None:  # type: ignore[no-untyped-def]
    from runtime.modal.layout import app_name, modal_volume_name
    from runtime.modal.backend import ModalRuntime

    data = yaml.safe_load((REPO / "specs" / "retool-tiny.yaml").read_text())
    name = f"retool-tiny-live-{uuid.uuid4().hex[:6]}"
    data["name"], data["backend"] = name, "modal"
    data["image"] = {"base": "nvidia/cuda:12.8.1-runtime-ubuntu22.04", "python": "3.12", "pip": ["verl==0.9.1"]}
    sft = data["stages"]["sft"]
    sft["resources"] = {"gpu": os.environ.get("RETOOL_LIVE_GPU", "L4"), "gpus_per_node": 1, "timeout_hours": 1,
                        "retries": 0}
    sft.pop("tool_call_check", None)
    del data["stages"]["rl"]
    spec_dir = tmp_path / "specs"
    (spec_dir / "data").mkdir(parents=True)
    (spec_dir / "data" / "aime_2024.jsonl").write_bytes((REPO / "specs" / "data" / "aime_2024.jsonl").read_bytes())
    (spec_dir / "live.yaml").write_text(yaml.safe_dump(data))
    loaded = load_spec(spec_dir / "live.yaml")
    store = LocalStore(tmp_path / ".retool")
    runtime = ModalRuntime(str(tmp_path / ".retool"), adapter=adapter)
    try:
        assert runtime.preflight(loaded.spec) == []
        plan = refresh_and_plan(loaded, store.read(), runtime, targets={"stage.sft"})
        result = apply(plan, loaded, store, runtime, poll_interval=15.0, state_dir=str(tmp_path / ".retool"))
        assert result.ok, [r.message for r in result.results if r.result == "failed"]
        rec = store.read().nodes["stage.sft"]  # type: ignore[union-attr]
        assert rec.status == "succeeded" and rec.steps_done > 0 and rec.run and rec.run.ref.call_id
        found = runtime.discover_checkpoints(loaded.spec, "sft", rec.restart_id)
        assert any(c.valid and c.step == rec.steps_done for c in found)
        merged = adapter.listdir(modal_volume_name(loaded.spec, "checkpoints"),
                                 f"sft/{rec.restart_id[:16]}/merged")
        assert any(e.path.endswith("config.json") for e in merged)
        # a second apply has nothing to do
        again = refresh_and_plan(loaded, store.read(), ModalRuntime(str(tmp_path / ".retool"), adapter=adapter),
                                 targets={"stage.sft"})
        assert not again.has_changes
    finally:
        subprocess.run([sys.executable, "-m", "modal", "app", "stop", app_name(loaded.spec)], check=False)
        for key in loaded.spec.volumes:
            adapter.delete_volume(modal_volume_name(loaded.spec, key))


# --------------------------------------------------------------------------- the once-per-release smoke

LIVE = f"retool-live-{uuid.uuid4().hex[:6]}"
SMOKE_GPU = os.environ.get("RETOOL_LIVE_GPU", "L4")


@pytest.fixture(scope="module")
def live_volume(adapter):  # type: ignore[no-untyped-def]
    name = f"{LIVE}-vol"
    adapter.create_volume(name)
    yield name
    adapter.delete_volume(name)


@pytest.fixture(scope="module")
def probe_app(adapter, live_volume):  # type: ignore[no-untyped-def]
    """Small stdlib-only functions (serialized, so nothing of ours is in their image)."""
    import modal

    app = modal.App(f"{LIVE}-probe")
    image = modal.Image.debian_slim(python_version="3.12")
    volume_name = live_volume

    @app.function(image=image, serialized=True, timeout=900)
    def sleeper(payload: dict) -> str:  # type: ignore[type-arg]
        import time as _time

        _time.sleep(float(payload.get("seconds", 0)))
        return "done"

    @app.function(image=image, volumes={"/vol": modal.Volume.from_name(volume_name)}, serialized=True, timeout=600)
    def roundtrip(payload: dict) -> dict:  # type: ignore[type-arg]
        import pathlib

        import modal as _modal

        vol = _modal.Volume.from_name(volume_name)
        vol.reload()
        root = pathlib.Path("/vol") / payload["dir"]
        seen = (root / "from-client.txt").read_text()
        (root / "from-container.txt").write_text(seen.upper())
        refused = ""
        with (root / "held.log").open("a") as held:  # a file open on the volume while committing
            held.write("open\n")
            held.flush()
            try:
                vol.commit()
            except RuntimeError as exc:
                refused = str(exc)
        vol.commit()
        return {"seen": seen, "refused": refused}

    @app.function(image=image, volumes={"/vol": modal.Volume.from_name(volume_name)}, serialized=True, timeout=300,
                  retries=modal.Retries(max_retries=1, initial_delay=1.0))
    def fail_once(payload: dict) -> str:  # type: ignore[type-arg]
        import pathlib

        import modal as _modal

        vol = _modal.Volume.from_name(volume_name)
        vol.reload()
        marker = pathlib.Path("/vol") / payload["marker"]
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("first attempt")
            vol.commit()
            raise RuntimeError("the first attempt fails on purpose")
        return "recovered"

    with modal.enable_output():
        app.deploy(name=app.name)
    yield app.name
    subprocess.run([sys.executable, "-m", "modal", "app", "stop", app.name], check=False)


def test_smoke_the_7b_image_builds_without_compiling(adapter) -> None:  # type: ignore[no-untyped-def]
    from runtime.modal.app import build_app_definition

    spec = load_spec(REPO / "specs" / "retool-qwen7b.yaml").spec
    steps = build_app_definition(spec).image
    assert steps[0].args == ["verlai/verl:vllm024.dev2"]
    assert adapter.build_image_now(steps).startswith("im-")


def test_smoke_volume_round_trips_with_a_file_open(adapter, live_volume, probe_app) -> None:  # type: ignore[no-untyped-def]
    adapter.put_files(live_volume, {"rt/from-client.txt": b"hello from the client"})
    call_id = adapter.spawn(probe_app, "roundtrip", {"dir": "rt"})
    out = adapter.wait(call_id, 300)
    assert out.state == "succeeded", out.error
    assert out.result["seen"] == "hello from the client"
    assert "open files" in out.result["refused"]  # what tests/fakes/fake_modal.py assumes
    assert adapter.read_file(live_volume, "rt/from-container.txt") == b"HELLO FROM THE CLIENT"
    with pytest.raises(FileNotFoundError):
        adapter.remove(live_volume, "rt/never-written.txt")
    from runtime.modal.adapter import VolumeNotFound

    with pytest.raises(VolumeNotFound):
        adapter.put_files(f"{LIVE}-no-such-volume", {"x": b"1"})


def test_smoke_get_timeout_zero_for_each_kind_of_call(adapter, probe_app) -> None:  # type: ignore[no-untyped-def]
    import time

    running = adapter.spawn(probe_app, "sleeper", {"seconds": 300})
    assert adapter.poll(running).state == "running"
    finished = adapter.spawn(probe_app, "sleeper", {"seconds": 0})
    done = adapter.wait(finished, 300)
    assert (done.state, done.result) == ("succeeded", "done")
    assert adapter.poll(finished).state == "succeeded"  # polled again: the result is kept
    adapter.cancel(running)
    deadline = time.time() + 120
    while adapter.poll(running).state == "running" and time.time() < deadline:
        time.sleep(2)
    assert adapter.poll(running).state == "terminated"  # GENERIC_STATUS_TERMINATED: RemoteError
    assert adapter.poll("fc-" + "0" * 26).state == "expired"  # no outputs, no unfinished inputs


def test_smoke_a_retry_after_an_exception_succeeds(adapter, probe_app) -> None:  # type: ignore[no-untyped-def]
    out = adapter.wait(adapter.spawn(probe_app, "fail_once", {"marker": f"retry/{uuid.uuid4().hex}"}), 600)
    assert (out.state, out.result) == ("succeeded", "recovered"), out.error


RACER = """
import sys, time
from reconciler.errors import StateLockedError
from reconciler.state.base import LockInfo
from reconciler.state.modal_store import ModalStore
store = ModalStore(sys.argv[1], sys.argv[2], "race")
try:
    lock_id = store.lock(LockInfo(command="racer " + sys.argv[3]))
except StateLockedError:
    print("refused", flush=True)
else:
    print("won", flush=True)
    time.sleep(20)
    store.unlock(lock_id)
"""


def test_smoke_two_processes_race_for_the_state_lock(adapter) -> None:  # type: ignore[no-untyped-def]
    volume, locks = f"{LIVE}-state", f"{LIVE}-locks"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, volume, locks, str(i)], cwd=REPO, stdout=subprocess.PIPE,
                               text=True) for i in range(2)]
    outputs = sorted(r.communicate(timeout=180)[0].strip() for r in racers)
    try:
        assert outputs == ["refused", "won"]
    finally:
        import modal

        for cleanup in (lambda: modal.Dict.objects.delete(locks, allow_missing=True),
                        lambda: adapter.delete_volume(volume)):
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - best effort
                pass


def test_smoke_the_stage_worker_hands_over_with_its_sidecar_on_a_gpu(adapter, live_volume) -> None:  # type: ignore[no-untyped-def]
    """The real `run_stage` on a GPU: the sandbox sidecar answers, the attempt stops at its
    training deadline and hands over; segment 1 resumes from the committed checkpoint."""
    from runtime import checkpoints as ckpts
    from runtime.modal import launches, layout
    from runtime.modal.models import AppDefinition, FunctionSpec, ImageStep, LaunchKey, SidecarSettings, StagePayload
    from tests.runtime.modal.test_modal_worker import TRAINER

    app_name, restart_id = f"{LIVE}-stage", "r" * 64
    image = [
        ImageStep(op="from_registry", args=["python:3.12-slim"]),
        ImageStep(op="pip_install", args=["pydantic>=2.7", "pyyaml>=6", "typer>=0.12", "rich>=13", "deepdiff>=7",
                                          "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"]),
        ImageStep(op="add_local_python_source", args=["reconciler", "runtime", "sandbox"],
                  options={"ignore": ["**/__pycache__", "**/*.pyc"]}),
    ]
    fn = FunctionSpec(name="stage-smoke", entry="run_stage", gpu=SMOKE_GPU, timeout_s=900, retries=0,
                      volumes={"/ckpt": live_volume})
    adapter.deploy(AppDefinition(app_name=app_name, image=image, functions=[fn]))
    ckpt = f"/ckpt/smoke/{restart_id[:16]}"
    adapter.put_files(live_volume, {f"smoke/{restart_id[:16]}/{ckpts.MARKER_FILE}":
                                    ckpts.marker_content(restart_id, "smoke", 1).encode()})
    probe = ("import json, urllib.request; req = urllib.request.Request('http://127.0.0.1:8765/run_code', "
             "data=json.dumps({'code': 'print(6 * 7)', 'language': 'python'}).encode(), "
             "headers={'Content-Type': 'application/json'}); "
             "print('sandbox:', json.load(urllib.request.urlopen(req, timeout=60))['run_result']['stdout'].strip())")
    launch = LaunchKey(registry=layout.registry_name(app_name), key=f"{app_name}/smoke/{restart_id}",
                       launch_id="smoke")
    payload = StagePayload(
        app_name=app_name, function="stage-smoke", stage="smoke", kind="rl", restart_id=restart_id, total_steps=3,
        world_size=1, checkpoint_dir=ckpt, checkpoint_volume=live_volume, volumes={live_volume: "/ckpt"},
        commands=[
            {"argv": ["python", "-c", TRAINER, "verl.trainer.sft_trainer", f"trainer.default_local_dir={ckpt}",
                      "trainer.total_training_steps=3", "trainer.save_freq=1", "hang_at=2"], "env": {}},
            {"argv": ["python", "-c", probe], "env": {}, "description": "sandbox probe"},
        ],
        sidecar=SidecarSettings(preload=[]), train_seconds=90.0, commit_every_s=30.0, launch=launch,
    )
    try:
        head = adapter.spawn(app_name, "stage-smoke", payload.model_dump(mode="json"))
        first = adapter.wait(head, 600)
        assert first.state == "succeeded" and first.result["outcome"] == "continued", first
        second = adapter.wait(first.result["next_call_id"], 600)
        assert second.state == "succeeded" and second.result["outcome"] == "finished", second
        assert second.result["step"] == 3
        log = adapter.read_file(live_volume, f"smoke/{restart_id[:16]}/_retool/logs/segment-1-rank-0.log").decode()
        assert "sandbox: 42" in log and "trainer.resume_from_path=" in log
        reg = launches.lookup(adapter, launch.registry, launch.key)
        assert reg is not None and (reg.call_id, reg.segment) == (first.result["next_call_id"], 1)
    finally:
        subprocess.run([sys.executable, "-m", "modal", "app", "stop", app_name], check=False)
