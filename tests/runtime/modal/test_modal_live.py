"""Live: deploy specs/retool-tiny.yaml with `backend: modal` and run its SFT on one GPU.

Opt-in (`pytest -m modal_live`), skipped without Modal credentials. It creates its own app
and volumes (named `retool-tiny-live-<random>`), builds the image (verl 0.9.1 with CUDA
torch: the first build takes minutes), prepares the tiny data and model in the cloud,
trains the SFT stage on one GPU (`RETOOL_LIVE_GPU`, default L4), merges it, and deletes
the volumes and stops the app afterwards. Cost: a few cents of GPU time plus the build.
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
    from runtime.modal.app import app_name, modal_volume_name
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
