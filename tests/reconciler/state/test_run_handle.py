"""Run handles: typed per backend, and handles written by older versions still read."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from reconciler.state.base import LocalRun, ModalRun, NodeRecord, OpaqueRun, RunHandle


def test_a_local_handle_round_trips_through_json() -> None:
    handle = RunHandle(
        ref=LocalRun(pid=41, pgid=41, start_ticks=99, tag="t1", log_path="/l/sft.log", exit_path="/l/sft.exit.json"),
        stage="sft", kind="sft", restart_id="r" * 64, total_steps=12, resume_from=4,
    )
    again = RunHandle.model_validate_json(handle.model_dump_json())
    assert again == handle and again.backend == "local" and isinstance(again.ref, LocalRun)


def test_the_reference_is_chosen_by_backend() -> None:
    modal = RunHandle.model_validate({"ref": {"backend": "modal", "call_id": "fc-1", "gpus": 8}})
    assert isinstance(modal.ref, ModalRun) and modal.ref.gpus == 8 and modal.backend == "modal"
    with pytest.raises(ValidationError):
        RunHandle.model_validate({"ref": {"backend": "local"}})  # a local run without its pid is no handle


def test_a_flat_local_handle_from_an_older_state_is_converted() -> None:
    old = {
        "backend": "local", "started_at": 5.0, "command": ["torchrun"], "pid": 7, "pgid": 7, "log_path": "/l/a.log",
        "call_id": None, "segment": 0,
        "extra": {"start_ticks": 3, "tag": "abc", "exit_path": "/l/a.exit.json", "stage": "sft", "kind": "sft",
                  "restart_id": "r1", "total_steps": 10, "resume_from": 2, "accounted_s": 12.5, "device": "cpu"},
    }
    handle = NodeRecord.model_validate({"address": "stage.sft", "kind": "stage", "run": old}).run
    assert handle is not None
    assert handle.ref == LocalRun(pid=7, pgid=7, start_ticks=3, tag="abc", log_path="/l/a.log",
                                  exit_path="/l/a.exit.json", device="cpu")
    assert (handle.stage, handle.total_steps, handle.resume_from, handle.accounted_s, handle.started_at) == (
        "sft", 10, 2, 12.5, 5.0)


def test_flat_modal_and_memory_handles_are_converted() -> None:
    modal = RunHandle.model_validate({
        "backend": "modal", "call_id": "fc-9", "app_name": "retool-x", "segment": 2,
        "extra": {"volume": "v", "run_dir": "sft/r/_retool", "gpus": 8, "usd_per_gpu_hour": 3.95, "stage": "sft"},
    })
    assert modal.ref == ModalRun(call_id="fc-9", app_name="retool-x", segment=2, volume="v", run_dir="sft/r/_retool",
                                 gpus=8, usd_per_gpu_hour=3.95)
    memory = RunHandle.model_validate({"backend": "memory", "call_id": "run-3", "extra": {"stage": "dapo"}})
    assert memory.ref == OpaqueRun(run_id="run-3") and memory.stage == "dapo"
