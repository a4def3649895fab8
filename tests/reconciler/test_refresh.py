"""Refresh (observing reality through a runtime) and backend selection.

Observation never fails a plan: whatever cannot be seen becomes a note and the plan is made
from recorded state. get_runtime imports backends lazily and says clearly what is missing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler import backends
from reconciler.apply.engine import apply
from reconciler.backend import ChecksPresence
from reconciler.backends import OVERRIDE_ENV, get_runtime, get_store
from reconciler.errors import TerminalError
from reconciler.loader import LoadedSpec
from reconciler.plan import ReasonCode
from reconciler.refresh import blocked_nodes, observe, observe_and_plan, open_runtime, refresh_and_plan
from reconciler.graph import build_graph
from reconciler.state.base import State
from reconciler.state.local import LocalStore
from reconciler.state.memory import MemoryStore
from tests.fakes.memory_runtime import MemoryRuntime
from tests.fakes.pipeline import load


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedSpec:
    return load(tmp_path)


def half_done(loaded: LoadedSpec) -> tuple[State, MemoryRuntime]:
    """sft launched and left running (--no-wait), one poll in: step 5, checkpoint 5."""
    store, rt = MemoryStore(), MemoryRuntime()
    apply(refresh_and_plan(loaded, None, rt), loaded, store, rt, wait=False, sleep=lambda s: None)
    state = store.read()
    assert state is not None
    return state, rt


def test_observe_polls_running_stages_and_reads_their_checkpoints(loaded: LoadedSpec) -> None:
    state, rt = half_done(loaded)
    observed = observe(loaded, state, rt)
    assert observed.refreshed and observed.notes == []
    sft = observed.nodes["stage.sft"]
    assert (sft.run_state, sft.step, sft.latest_valid_checkpoint) == ("running", 10, 10)
    assert set(observed.nodes) == {"stage.sft"}  # only recorded stages are observed


def test_invalid_and_foreign_checkpoints_are_listed_not_resumed_from(loaded: LoadedSpec) -> None:
    state, rt = half_done(loaded)
    rid = state.nodes["stage.sft"].restart_id
    rt.checkpoints[("sft", rid)][15] = (False, "missing shard rank 1 of 2")
    rt.checkpoints[("sft", "f" * 64)] = {20: (True, "")}
    sft = observe(loaded, state, rt).nodes["stage.sft"]
    assert sft.latest_valid_checkpoint == 10
    assert sft.invalid_checkpoints == [
        "global_step_15: missing shard rank 1 of 2",
        "global_step_20: written under another restart identity",
    ]


def test_unreachable_run_becomes_a_note_and_the_plan_trusts_the_record(loaded: LoadedSpec) -> None:
    state, rt = half_done(loaded)
    rt.fail_when(lambda c: c.method in ("poll_stage", "discover_checkpoints"), "transient")
    observed = observe(loaded, state, rt)
    assert not observed.refreshed
    assert observed.notes == [
        "stage.sft: cannot observe its run (injected transient failure in poll_stage(stage.sft)); shown as recorded",
        "stage.sft: cannot read its checkpoints (injected transient failure in discover_checkpoints(stage.sft))",
    ]
    plan = refresh_and_plan(loaded, state, rt)
    assert plan.change("stage.sft").action == "no-op"  # type: ignore[union-attr]  # recorded running: re-attach
    assert not plan.refreshed and any("cannot observe its run" in w for w in plan.warnings)


def test_no_refresh_asks_the_runtime_nothing_about_runs(loaded: LoadedSpec) -> None:
    state, rt = half_done(loaded)
    before = len(rt.calls)
    plan = refresh_and_plan(loaded, state, rt, refresh=False)
    assert {c.method for c in rt.calls[before:]} == {"blocked_reason"}
    assert not plan.refreshed


def test_blocked_nodes_and_their_errors(loaded: LoadedSpec) -> None:
    rt = MemoryRuntime(blocked={"stage.rl": "needs a GPU"})
    rt.fail_when(lambda c: c.method == "blocked_reason" and c.address == "sandbox", "terminal")
    blocked, notes = blocked_nodes(loaded, build_graph(loaded.spec), rt)
    assert blocked == {"stage.rl": "needs a GPU"}
    assert notes == ["sandbox: cannot check whether the backend can run it (injected terminal failure in blocked_reason(sandbox))"]


# --------------------------------------------------------------------------- backends


@pytest.fixture
def clean_override(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    backends.set_runtime_override(None)
    yield
    backends.set_runtime_override(None)


def test_open_runtime_turns_a_missing_backend_into_a_note(loaded: LoadedSpec, clean_override: None) -> None:
    def unavailable(spec: object, state_dir: str) -> MemoryRuntime:
        raise TerminalError("no Modal token")

    backends.set_runtime_override(unavailable)
    runtime, notes = open_runtime(loaded, "/nowhere")
    assert runtime is None and notes == ["backend local unavailable (no Modal token); planned from recorded state"]


def test_env_override_names_a_factory(loaded: LoadedSpec, clean_override: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE_ENV, "tests.fakes.memory_runtime:make_runtime")
    assert isinstance(get_runtime(loaded.spec, "/x"), MemoryRuntime)
    monkeypatch.setenv(OVERRIDE_ENV, "no_colon_here")
    with pytest.raises(TerminalError, match="is not `module:factory`"):
        get_runtime(loaded.spec, "/x")
    monkeypatch.setenv(OVERRIDE_ENV, "tests.fakes.memory_runtime:nope")
    with pytest.raises(TerminalError, match="cannot be loaded"):
        get_runtime(loaded.spec, "/x")


def _backend_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.BACKENDS, "local", (name, "Runtime"))
    sys.modules.pop(name, None)


def test_backend_is_constructed_with_its_state_dir(
    loaded: LoadedSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_override: None
) -> None:
    _backend_module(tmp_path, monkeypatch, "fine_backend", "class Runtime:\n    def __init__(self, state_dir):\n        self.state_dir = state_dir\n")
    assert get_runtime(loaded.spec, tmp_path / "st").state_dir == str(tmp_path / "st")  # type: ignore[attr-defined]


def test_backend_missing_a_dependency_says_which_extra(
    loaded: LoadedSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_override: None
) -> None:
    _backend_module(tmp_path, monkeypatch, "needy_backend", "import package_that_is_not_installed\n")
    with pytest.raises(TerminalError) as exc:
        get_runtime(loaded.spec, tmp_path)
    assert "package_that_is_not_installed is not installed" in exc.value.summary
    assert "[train]" in exc.value.hint


def test_backend_module_absent_or_incomplete(
    loaded: LoadedSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_override: None
) -> None:
    monkeypatch.setitem(backends.BACKENDS, "local", ("retool_no_such_backend", "Runtime"))
    with pytest.raises(TerminalError, match="backend is not installed"):
        get_runtime(loaded.spec, tmp_path)
    _backend_module(tmp_path, monkeypatch, "empty_backend", "X = 1\n")
    with pytest.raises(TerminalError, match="incomplete"):
        get_runtime(loaded.spec, tmp_path)


def test_get_store_local(loaded: LoadedSpec, tmp_path: Path) -> None:
    store = get_store(loaded.spec, tmp_path / "state")
    assert isinstance(store, LocalStore) and store.directory == tmp_path / "state"


class SidecarWatchingRuntime(MemoryRuntime, ChecksPresence):
    """A runtime that can tell when the recorded sandbox died (LocalRuntime does, by pid)."""

    def missing_reason(self, spec: object, address: str) -> str | None:
        if address == "sandbox" and self.sandbox is None:
            return "the sandbox process is not running"
        if address == "volume.data" and getattr(self, "broken", False):
            raise OSError("permission denied")
        return None

    def idle_reason(self, spec: object, address: str) -> str | None:
        return None


def test_a_dead_sandbox_is_planned_for_creation_and_apply_restarts_it(loaded: LoadedSpec) -> None:
    store, rt = MemoryStore(), SidecarWatchingRuntime()
    apply(refresh_and_plan(loaded, None, rt), loaded, store, rt, sleep=lambda s: None)
    state = store.read()
    assert state is not None
    assert {c.action for c in refresh_and_plan(loaded, state, rt).changes} == {"no-op"}
    rt.sandbox = None  # the sidecar died after the apply
    plan = refresh_and_plan(loaded, state, rt)
    sandbox = plan.change("sandbox")
    assert sandbox is not None and sandbox.action == "create"
    assert sandbox.reason_codes == [ReasonCode.GONE]
    assert sandbox.reasons[0].endswith(": the sandbox process is not running")  # the backend's words reach the reader
    assert {c.address for c in plan.changes if c.action != "no-op"} == {"sandbox"}  # no stage reruns for it
    apply(plan, loaded, store, rt, sleep=lambda s: None)
    assert rt.sandbox is not None
    rt.broken = True  # type: ignore[attr-defined]
    observed = observe(loaded, store.read(), rt)
    assert observed.notes == ["volume.data: cannot check that it still exists (OSError: permission denied)"]


class IdlingSidecarRuntime(MemoryRuntime, ChecksPresence):
    """A runtime whose sidecar stops when unused and starts on demand (as LocalRuntime's)."""

    idle = False

    def missing_reason(self, spec: object, address: str) -> str | None:
        return None

    def idle_reason(self, spec: object, address: str) -> str | None:
        return "idle, starts on demand" if address == "sandbox" and self.idle else None


def test_an_idle_sandbox_is_no_drift_and_status_says_idle(loaded: LoadedSpec) -> None:
    from reconciler.status import compute_status

    store, rt = MemoryStore(), IdlingSidecarRuntime()
    apply(refresh_and_plan(loaded, None, rt), loaded, store, rt, sleep=lambda s: None)
    state = store.read()
    assert state is not None
    rt.idle = True  # the sidecar ended by itself after the apply
    observed, plan = observe_and_plan(loaded, state, rt)
    assert not plan.has_changes and observed.refreshed
    report = compute_status(plan, loaded.spec, state, observed)
    sandbox = next(n for n in report.nodes if n.address == "sandbox")
    assert (sandbox.sync, sandbox.health, sandbox.message) == ("in sync", "idle", "idle, starts on demand")
    assert report.in_sync and {n.health for n in report.nodes if n.address != "sandbox"} == {"healthy"}
