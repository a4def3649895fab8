"""Refresh: observe reality through a Runtime, then plan from it (docs/architecture.md,
"Reconcile from observed reality").

`observe` polls recorded runs and reads checkpoints from the stages' volumes; it never
fails a plan: whatever it cannot see (no credentials, backend unreachable, backend not
installed) becomes a note and `refreshed=False`, and the plan is made from recorded state.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.backends import get_runtime
from reconciler.errors import RetoolError
from reconciler.graph import Graph, address_kind, build_graph
from reconciler.loader import LoadedSpec
from reconciler.plan import Observed, ObservedNode, Plan, make_plan
from reconciler.state.base import NodeRecord, State
from reconciler.backend import ChecksPresence, ChecksSpec, ReportsCapacity, Runtime, latest_resumable


def _why(err: Exception) -> str:
    return err.summary if isinstance(err, RetoolError) else f"{type(err).__name__}: {err}"


def observe_stage(loaded: LoadedSpec, rec: NodeRecord, runtime: Runtime) -> tuple[ObservedNode, list[str]]:
    """What the backend sees of one stage: its run (if one is recorded as running) and
    its checkpoints under the restart identity it was launched with."""
    notes: list[str] = []
    fields: dict[str, object] = {}
    name = rec.address.split(".", 1)[1]
    if rec.status == "running" and rec.run is not None:
        try:
            status = runtime.poll_stage(rec.run)
            fields.update(
                run_state=status.state, step=status.step, message=status.message,
                metrics=status.metrics, sparklines=status.sparklines, wandb_url=status.wandb_url,
                wandb=status.wandb or rec.run.wandb,
            )
        except (RetoolError, OSError) as err:
            notes.append(f"{rec.address}: cannot observe its run ({_why(err)}); shown as recorded")
    if rec.restart_id and name in loaded.spec.stages:
        try:
            found = runtime.discover_checkpoints(loaded.spec, name, rec.restart_id)
            latest = latest_resumable(found, rec.restart_id)
            fields["latest_valid_checkpoint"] = latest.step if latest is not None else None
            fields["invalid_checkpoints"] = [
                f"global_step_{c.step}: {c.reason or 'invalid'}" for c in sorted(found, key=lambda c: c.step) if not c.valid
            ]
        except (RetoolError, OSError) as err:
            notes.append(f"{rec.address}: cannot read its checkpoints ({_why(err)})")
    return ObservedNode(**fields), notes


def observe(loaded: LoadedSpec, state: State | None, runtime: Runtime | None) -> Observed:
    """Observed reality: every recorded stage's run and checkpoints, and whether recorded
    volumes, data, models and the sandbox still exist (where the backend can tell)."""
    if runtime is None:
        return Observed(refreshed=False, notes=["refresh skipped: planned from recorded state"])
    nodes: dict[str, ObservedNode] = {}
    notes: list[str] = []
    for address, rec in sorted((state.nodes if state else {}).items()):
        if address_kind(address) == "stage":
            node, problems = observe_stage(loaded, rec, runtime)
            nodes[address] = node
            notes.extend(problems)
        elif rec.status == "succeeded":
            gone = observe_presence(loaded, address, runtime, notes)
            if gone:
                nodes[address] = ObservedNode(exists=False, message=gone)
                continue
            idle = observe_presence(loaded, address, runtime, notes, idle=True)
            if idle:
                nodes[address] = ObservedNode(idle=idle)
    return Observed(nodes=nodes, refreshed=not notes, notes=notes)


def observe_presence(
    loaded: LoadedSpec, address: str, runtime: Runtime, notes: list[str], *, idle: bool = False,
) -> str | None:
    """Why a recorded volume/dataset/model/sandbox is gone (or, with `idle`, stopped on
    purpose until something needs it), when the backend can tell (a backend without
    `ChecksPresence` has them trusted as recorded)."""
    if not isinstance(runtime, ChecksPresence):
        return None
    try:
        check = runtime.idle_reason if idle else runtime.missing_reason
        reason = check(loaded.spec, address)
    except (RetoolError, OSError) as err:
        notes.append(f"{address}: cannot check that it still exists ({_why(err)})")
        return None
    return reason if isinstance(reason, str) else None


def blocked_nodes(loaded: LoadedSpec, graph: Graph, runtime: Runtime | None) -> tuple[dict[str, str], list[str]]:
    """Nodes this backend cannot run, with the reason (plan shows them `blocked`)."""
    if runtime is None:
        return {}, []
    blocked: dict[str, str] = {}
    notes: list[str] = []
    for address in graph.order():
        try:
            reason = runtime.blocked_reason(loaded.spec, address)
        except (RetoolError, OSError) as err:
            notes.append(f"{address}: cannot check whether the backend can run it ({_why(err)})")
            continue
        if reason:
            blocked[address] = reason
    return blocked, notes


def spec_warnings(loaded: LoadedSpec, runtime: Runtime | None) -> list[str]:
    """The backend's offline warnings about the spec, where it declares `ChecksSpec`
    (e.g. Modal's image packages that compile from source, requests above its thresholds)."""
    if not isinstance(runtime, ChecksSpec):
        return []
    try:
        return list(runtime.spec_warnings(loaded.spec))
    except (RetoolError, OSError) as err:
        return [f"cannot check the spec against the {loaded.spec.backend} backend ({_why(err)})"]


def capacity_note(loaded: LoadedSpec, runtime: ReportsCapacity) -> str | None:
    """What the backend's compute has free next to what the stages ask for (a note)."""
    try:
        return runtime.capacity_note(loaded.spec)
    except (RetoolError, OSError) as err:
        return f"cannot read the {loaded.spec.backend} backend's free capacity ({_why(err)})"


def open_runtime(loaded: LoadedSpec, state_dir: str | Path) -> tuple[Runtime | None, list[str]]:
    """The spec's runtime, or None plus why (plan goes on from recorded state)."""
    try:
        return get_runtime(loaded.spec, state_dir), []
    except RetoolError as err:
        return None, [f"backend {loaded.spec.backend} unavailable ({err.summary}); planned from recorded state"]


def observe_and_plan(
    loaded: LoadedSpec,
    state: State | None,
    runtime: Runtime | None,
    *,
    refresh: bool = True,
    targets: set[str] | None = None,
    replace: set[str] | None = None,
    notes: list[str] | None = None,
) -> tuple[Observed, Plan]:
    """Observe (unless `refresh` is off), then make the plan. `notes` (e.g. why there is
    no runtime) are carried into the plan's warnings. Status uses both halves."""
    graph = build_graph(loaded.spec)
    observed = observe(loaded, state, runtime if refresh else None)
    blocked, block_notes = blocked_nodes(loaded, graph, runtime)
    extra = [*(notes or []), *block_notes]
    if extra:
        observed = observed.model_copy(update={"notes": [*extra, *observed.notes], "refreshed": False})
    warnings = spec_warnings(loaded, runtime)
    if refresh and isinstance(runtime, ReportsCapacity):
        note = capacity_note(loaded, runtime)
        warnings = [*warnings, note] if note else warnings
    if warnings:  # what this backend may refuse or rebuild later; the refresh itself is unaffected
        observed = observed.model_copy(update={"notes": [*observed.notes, *warnings]})
    plan = make_plan(
        loaded.spec, state, observed, blocked=blocked, replace=replace or set(), targets=targets,
        spec_path=loaded.path,
    )
    return observed, plan


def refresh_and_plan(
    loaded: LoadedSpec,
    state: State | None,
    runtime: Runtime | None,
    *,
    refresh: bool = True,
    targets: set[str] | None = None,
    replace: set[str] | None = None,
    notes: list[str] | None = None,
) -> Plan:
    """`retool plan`: the plan from observed reality (or recorded state where unobservable)."""
    return observe_and_plan(
        loaded, state, runtime, refresh=refresh, targets=targets, replace=replace, notes=notes
    )[1]
