"""Property: apply is crash-safe and idempotent (issue 2, item 8).

For every failure point — the k-th runtime call of a whole plan/apply session raising a
transient error, a terminal error, or a crash (the process "dies" before or after the
call's effect) — re-running `retool apply` until the plan is empty converges to the same
final state as a failure-free run, and never executes a node again once it succeeded:
each address's real effects (runs launched, data materialised, models merged) number
exactly what the failure-free run needed.

Scenarios start from nothing, or from a finished pipeline edited so that stages rerun,
resume, or are deleted.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.apply.engine import apply
from reconciler.errors import RetoolError
from reconciler.loader import LoadedSpec
from reconciler.refresh import refresh_and_plan
from reconciler.state.base import State
from reconciler.state.memory import MemoryStore
from tests.fakes.memory_runtime import FAILURE_KINDS, InjectedCrash, MemoryRuntime
from tests.fakes.pipeline import load

SCENARIOS: dict[str, dict[str, Any] | None] = {
    "fresh": None,
    "sft lr": {"stages.sft.optim": {"lr": 2e-5}},
    "more epochs": {"stages.sft.epochs": 3},
    "rl steps": {"stages.rl.max_steps": 5},
    "drop rl": {"stages.rl": None, "datasets.rl_data": None},
}
MAX_ROUNDS = 8
# Fields that legitimately differ after an interruption: timing, spend, messages, handles.
VOLATILE = {"run", "created_at", "updated_at", "started_at", "finished_at", "message",
            "seconds_per_step", "gpu_seconds", "cost_usd"}


def converge(loaded: LoadedSpec, store: MemoryStore, rt: MemoryRuntime) -> int:
    """Apply until a fresh plan has nothing left to do; returns the number of applies."""
    for rounds in range(MAX_ROUNDS):
        try:
            plan = refresh_and_plan(loaded, store.read(), rt)
            state = store.read()
            running = state is not None and any(r.status == "running" for r in state.nodes.values())
            if not plan.has_changes and not running:
                return rounds
            apply(plan, loaded, store, rt, sleep=lambda s: None)
        except (InjectedCrash, RetoolError):
            continue  # the process died, or apply refused (e.g. preflight): run it again
    raise AssertionError(f"did not converge in {MAX_ROUNDS} applies")


def projection(state: State | None) -> dict[str, dict[str, Any]]:
    assert state is not None
    return {a: r.model_dump(exclude=VOLATILE) for a, r in sorted(state.nodes.items())}


def setup(tmp: Path, scenario: str) -> tuple[LoadedSpec, MemoryStore, MemoryRuntime]:
    """The starting point (a finished pipeline, for edit scenarios) and the spec to apply."""
    store, rt = MemoryStore(), MemoryRuntime()
    edits = SCENARIOS[scenario]
    if edits is None:
        return load(tmp), store, rt
    converge(load(tmp), store, rt)
    rt.calls.clear()
    rt.executions.clear()
    return load(tmp, **edits), store, rt


def baseline(tmp: Path, scenario: str) -> tuple[dict[str, dict[str, Any]], Counter[str], int]:
    loaded, store, rt = setup(tmp, scenario)
    assert converge(loaded, store, rt) == 1
    return projection(store.read()), Counter(rt.executions), len(rt.calls)


_BASELINES: dict[str, tuple[dict[str, dict[str, Any]], Counter[str], int]] = {}


def cached_baseline(tmp: Path, scenario: str) -> tuple[dict[str, dict[str, Any]], Counter[str], int]:
    if scenario not in _BASELINES:
        _BASELINES[scenario] = baseline(tmp / f"baseline-{scenario.replace(' ', '-')}", scenario)
    return _BASELINES[scenario]


failures = st.lists(
    st.tuples(st.integers(min_value=0, max_value=60), st.sampled_from(FAILURE_KINDS)),
    min_size=1, max_size=3,
)


# Derandomized: the same 250 examples every run, so CI cannot fail on a new draw. Widen the
# search by hand (`--hypothesis-seed=random`) when working on the reconciler.
@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=st.sampled_from(sorted(SCENARIOS)), points=failures)
# Found by a random draw: a terminal failure of discover_checkpoints right after the RL run
# ended (before its finalize), then a refresh that cannot read the checkpoints, once made the
# next apply launch the stage again instead of finalizing its last checkpoint.
@example(scenario="fresh", points=[(10, "transient"), (41, "terminal"), (42, "transient")])
def test_any_failure_point_converges_without_rerunning_finished_work(
    tmp_path: Path, scenario: str, points: list[tuple[int, str]]
) -> None:
    expected, expected_runs, _ = cached_baseline(tmp_path, scenario)
    run_dir = tmp_path / f"run-{scenario.replace(' ', '-')}"
    loaded, store, rt = setup(run_dir, scenario)
    for k, kind in points:
        rt.fail_at(k, kind)  # type: ignore[arg-type]
    converge(loaded, store, rt)
    assert projection(store.read()) == expected
    assert rt.executions == expected_runs
    assert store.lock_info() is None


def test_every_single_failure_point_of_a_fresh_run() -> None:
    """Exhaustive companion: each call of the fresh run, each failure kind, one at a time."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        expected, expected_runs, n_calls = baseline(tmp / "baseline", "fresh")
        assert n_calls > 40  # the session really exercised the runtime
        for k in range(n_calls):
            for kind in FAILURE_KINDS:
                loaded, store, rt = setup(tmp / f"{k}-{kind}", "fresh")
                rt.fail_at(k, kind)
                converge(loaded, store, rt)
                where = f"failure {kind} at call {k}"
                assert projection(store.read()) == expected, where
                assert rt.executions == expected_runs, where
