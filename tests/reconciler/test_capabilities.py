"""Optional backend capabilities are declared (mixin ABCs), not looked up by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.backend import (
    DEFAULT_POLL_INTERVAL_S,
    ChecksPresence,
    ChecksReadiness,
    ChecksSpec,
    OpensSharedState,
    PollsAtOwnPace,
    ReadsMetrics,
    ReportsCapacity,
    poll_interval,
)
from reconciler.loader import load_spec
from runtime.local.backend import LocalRuntime
from runtime.modal.backend import ModalRuntime
from tests.fakes.fake_modal import FakeModal
from tests.fakes.memory_runtime import MemoryRuntime

REPO = Path(__file__).resolve().parents[2]
ALL = (ChecksPresence, ChecksSpec, ChecksReadiness, OpensSharedState, ReadsMetrics, PollsAtOwnPace, ReportsCapacity)


def declared(runtime: object) -> set[str]:
    return {cap.__name__ for cap in ALL if isinstance(runtime, cap)}


def test_each_backend_declares_what_it_offers(tmp_path: object) -> None:
    assert declared(LocalRuntime(str(tmp_path))) == {"ChecksPresence", "ReadsMetrics"}
    modal = ModalRuntime(str(tmp_path), adapter=FakeModal())
    assert declared(modal) == {"ChecksSpec", "ChecksReadiness", "OpensSharedState"}
    assert declared(MemoryRuntime()) == {"PollsAtOwnPace"}
    from runtime.ray.backend import RayRuntime

    assert declared(RayRuntime(str(tmp_path))) == {"ChecksPresence", "ChecksReadiness", "ReadsMetrics", "ReportsCapacity"}


def test_a_capability_declared_without_its_method_cannot_be_built() -> None:
    class Forgetful(MemoryRuntime, ReadsMetrics):
        pass

    with pytest.raises(TypeError, match="read_metrics"):
        Forgetful()


def test_poll_interval_is_the_backends_or_the_default(tmp_path: object) -> None:
    assert poll_interval(MemoryRuntime(poll_interval_s=0.25)) == 0.25
    assert poll_interval(LocalRuntime(str(tmp_path))) == DEFAULT_POLL_INTERVAL_S


def test_the_modal_backend_opens_only_a_modal_state_store(tmp_path: object) -> None:
    from reconciler.state.modal_store import ModalStore

    spec = load_spec(REPO / "specs" / "retool-qwen7b.yaml").spec
    runtime = ModalRuntime(str(tmp_path), adapter=FakeModal())
    local = spec.model_copy(update={"state": spec.state.model_copy(update={"store": "local"})})
    assert runtime.shared_store(local) is None
    shared = runtime.shared_store(spec.model_copy(update={"state": spec.state.model_copy(update={"store": "modal"})}))
    assert isinstance(shared, ModalStore) and shared.adapter is runtime.adapter


def test_doctor_without_the_readiness_capability_runs_preflight_and_the_store_rows(tmp_path: Path) -> None:
    from reconciler.backends import set_runtime_override
    from reconciler.cli.doctor import doctor_rows
    from tests.fakes.pipeline import load

    loaded = load(tmp_path)
    set_runtime_override(lambda spec, state_dir: MemoryRuntime(preflight_problems=["no GPU here"]))
    try:
        rows = doctor_rows(loaded, tmp_path / ".retool")
    finally:
        set_runtime_override(None)
    assert [(r.check, r.status) for r in rows] == [
        (f"{loaded.spec.backend} backend", "to fix"), ("state store", "ready"), ("state lock", "ready"),
    ]
    assert rows[0].detail == "no GPU here" and "empty (first apply)" in rows[1].detail
