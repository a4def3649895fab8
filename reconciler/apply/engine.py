"""Apply: walk a Plan through a Runtime, writing state after every transition.

Level-triggered and idempotent (docs/plan-apply-status.md, "Apply"): the lock is taken,
state re-read, a saved plan whose serial moved is refused, the backend's preflight must
pass, then each planned change runs in order. A stage's run handle is recorded the moment it
launches, so a crash or Ctrl-C leaves a state the next apply re-attaches to instead of
relaunching; a finished node's record is written the moment it succeeds (docs/architecture.md,
"Apply persists after every transition"). When a node fails, its dependents are skipped
because of it; independent nodes go on. A `blocked` change stops the walk with its reason.

Retries: transient faults of idempotent calls (ensure, prepare, poll, discover, finalize)
are retried with backoff; `launch_stage` is not (a backend makes launching idempotent per
restart identity, but the engine does not lean on it more than a crash would).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from reconciler.apply.context import (
    ApplyContext, ApplyEvent, Detached, NodeFailed, Result, planned_total_steps, stage_context,
)
from reconciler.apply.stage import StageRunner
from reconciler.budget import approval_record, require_approval
from reconciler.errors import RetoolError, StalePlanError, StateLockedError, TerminalError
from reconciler.fingerprint import output_id
from reconciler.graph import Node, address_kind, build_graph
from reconciler.loader import LoadedSpec
from reconciler.plan import Plan, PlannedChange, state_owner
from reconciler.spec import Volume
from reconciler.state.base import LockInfo, State, StateStore
from reconciler.state.lease import holding, release
from reconciler.backend import Outcome, Runtime

__all__ = [
    "ApplyEvent", "ApplyResult", "CancelOutcome", "NodeResult", "apply", "cancel", "check_plan_fresh",
    "planned_total_steps", "release", "stage_context",
]
FAILED_RESULTS: frozenset[str] = frozenset({"failed", "blocked"})


class NodeResult(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    address: str
    action: str
    result: Result
    message: str = ""


class ApplyResult(BaseModel):
    state: State
    results: list[NodeResult] = Field(default_factory=list)
    detached: bool = False  # Ctrl-C while waiting: runs keep going, state has their handles
    stopped: str = ""  # why the walk stopped early (a blocked change)

    @property
    def ok(self) -> bool:
        return not self.detached and not any(r.result in FAILED_RESULTS for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 done; 1 a node failed or was blocked; 130 detached by Ctrl-C (runs go on)."""
        if self.detached:
            return 130
        return 0 if self.ok else 1

    def result(self, address: str) -> NodeResult | None:
        return next((r for r in self.results if r.address == address), None)


# --------------------------------------------------------------------------- entry points


def check_plan_fresh(plan: Plan, state: State | None, *, saved: bool) -> None:
    """Refuse a plan made against a state that has moved on since."""
    what = "Saved plan is stale" if saved else "State changed while planning"
    again = "run `retool plan` again" if saved else "run `retool apply` again"
    if state is None:
        if plan.serial != 0:
            raise StalePlanError(what, f"the state it was made against (serial {plan.serial}) no longer exists; {again}.")
        return
    if plan.lineage and state.lineage != plan.lineage:
        raise StalePlanError(
            what, f"the plan was made for state lineage {plan.lineage}, the store holds {state.lineage}; {again}."
        )
    if state.serial != plan.serial:
        raise StalePlanError(what, f"state serial moved from {plan.serial} to {state.serial} since the plan was made; {again}.")


def apply(
    plan: Plan,
    loaded: LoadedSpec,
    store: StateStore,
    runtime: Runtime,
    *,
    wait: bool = True,
    prune: bool = False,
    allow_data_loss: bool = False,
    saved: bool = False,
    on_event: Callable[[ApplyEvent], None] | None = None,
    lock_info: LockInfo | None = None,
    lock_id: str | None = None,
    approved_usd: float | None = None,
    state_dir: str = "",
    poll_interval: float = 5.0,
    retries: int = 3,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> ApplyResult:
    """Apply `plan` (made from `loaded`) and return the final state and per-node results.

    Raises StateLockedError when another apply holds the lock, StalePlanError when the
    state moved since the plan, TerminalError when the backend's preflight fails; node
    failures do not raise: they are in the result (exit code 1).

    `lock_id`: the caller already holds the lock (the CLI takes it before planning, so a
    refused apply prints no plan) and releases it; otherwise apply holds it itself.

    `approved_usd`: a plan over the spec's budget runs only when this names its estimate
    (BudgetExceededError otherwise); the approval is recorded in the state before anything runs."""
    require_approval(plan.budget, approved_usd)
    if lock_id is None:
        with holding(store, lock_info or LockInfo()) as held:
            return apply(
                plan, loaded, store, runtime, wait=wait, prune=prune, allow_data_loss=allow_data_loss, saved=saved,
                on_event=on_event, lock_id=held, approved_usd=approved_usd, state_dir=state_dir,
                poll_interval=poll_interval, retries=retries,
                sleep=sleep, clock=clock,
            )
    state = store.read()
    check_plan_fresh(plan, state, saved=saved)
    ctx = ApplyContext(
        loaded=loaded, store=store, runtime=runtime, graph=build_graph(loaded.spec),
        state=state or State(lineage=plan.lineage or str(uuid.uuid4()), spec_name=state_owner(loaded.spec)),
        emit=on_event or (lambda e: None), wait=wait, state_dir=state_dir,
        poll_interval=poll_interval, retries=retries, sleep=sleep, clock=clock,
    )
    if plan.budget is not None and plan.budget.over:
        # Remembered before anything runs: later plans within what was approved do not ask again.
        ctx.state.cost_approvals.append(approval_record(plan.budget, by=(lock_info or LockInfo()).who, now=clock()))
        ctx.commit()
    return _Walk(plan, ctx, prune=prune, allow_data_loss=allow_data_loss).run()


class CancelOutcome(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    address: str
    recorded: bool  # False: an apply holds the lock; it records the cancellation when it polls
    message: str


def cancel(
    address: str, loaded: LoadedSpec, store: StateStore, runtime: Runtime, *, lock_info: LockInfo | None = None
) -> CancelOutcome:
    """Cancel a stage's running run (`retool cancel stage.X`); its checkpoints are kept.

    Works while an apply is waiting on that run (the usual case): the apply holds the lock,
    so the run is stopped without writing state, and the waiting apply records the end it
    observes. Otherwise the cancellation is recorded here, under the lock."""
    if address_kind(address) != "stage":
        raise TerminalError(f"Only stages can be cancelled, not {address}", hint="pass an address like `stage.sft`")
    try:
        lock_id: str | None = store.lock(lock_info or LockInfo())
    except StateLockedError:
        lock_id = None
    try:
        state = store.read()
        rec = state.nodes.get(address) if state else None
        if state is None or rec is None or rec.status != "running" or rec.run is None:
            status = rec.status if rec else "not in state"
            raise TerminalError(f"{address} has no running run to cancel", f"its recorded status is {status}")
        runtime.cancel_stage(rec.run)
        if lock_id is None:
            return CancelOutcome(
                address=address, recorded=False,
                message=f"cancelled {address}; the apply waiting on it records the end (checkpoints kept)",
            )
        rec.status = "cancelled"
        rec.message = "cancelled by `retool cancel`; checkpoints kept"
        rec.finished_at = rec.updated_at = time.time()
        state.serial += 1
        store.write(state)
        return CancelOutcome(
            address=address, recorded=True,
            message=f"cancelled {address}; checkpoints kept (`retool apply` resumes from them)",
        )
    finally:
        if lock_id is not None:
            release(store, lock_id)


# --------------------------------------------------------------------------- the walk


class _Walk:
    """The plan's changes in order: skip what depends on a failure, stop at `blocked`."""

    def __init__(self, plan: Plan, ctx: ApplyContext, *, prune: bool, allow_data_loss: bool) -> None:
        self.plan, self.ctx = plan, ctx
        self.prune, self.allow_data_loss = prune, allow_data_loss
        self.stages = StageRunner(ctx)
        self.results: list[NodeResult] = []
        self.failed: dict[str, str] = {}  # address -> why its dependents cannot run

    # ----------------------------------------------------------------- driver

    def run(self) -> ApplyResult:
        if self._has_work():
            problems = self.ctx.runtime.preflight(self.ctx.spec)
            if problems:
                raise TerminalError(
                    f"The {self.ctx.runtime.name} backend is not ready",
                    "\n".join(f"- {p}" for p in problems),
                    "fix the problems above; nothing was changed",
                )
        changes = self.plan.changes
        for i, change in enumerate(changes):
            if change.action == "blocked":
                reason = "; ".join(change.reasons) or "cannot run on this backend"
                self._result(change, "blocked", reason)
                self.ctx.emit(ApplyEvent(kind="blocked", address=change.address, action="blocked", message=reason))
                for rest in changes[i + 1:]:
                    self._result(rest, "not-run", f"apply stopped at blocked {change.address}")
                return ApplyResult(state=self.ctx.state, results=self.results, stopped=f"{change.address}: {reason}")
            try:
                self._step(change)
            except Detached as d:
                self._result(change, "running", "detached; the run continues")
                self.ctx.emit(ApplyEvent(
                    kind="detached", address=d.address,
                    message="detached; `retool status` or `retool apply` re-attaches",
                ))
                for rest in changes[i + 1:]:
                    self._result(rest, "not-run", "apply detached")
                return ApplyResult(state=self.ctx.state, results=self.results, detached=True)
        return ApplyResult(state=self.ctx.state, results=self.results)

    def _has_work(self) -> bool:
        running = any(r.status == "running" for r in self.ctx.state.nodes.values())
        return self.plan.has_changes or running

    def _step(self, change: PlannedChange) -> None:
        addr = change.address
        blocker = self._blocker(addr)
        if blocker is not None:
            self.failed[addr] = blocker
            self._result(change, "skipped", f"skipped because {blocker}")
            self.ctx.emit(ApplyEvent(kind="skipped", address=addr, action=change.action, message=f"because {blocker}"))
            return
        if change.action == "no-op" and not self.ctx.is_running(addr):
            self._result(change, "unchanged")
            return
        self.ctx.emit(ApplyEvent(kind="start", address=addr, action=change.action))
        try:
            result, message = self._do(change)
        except NodeFailed as f:
            self._fail(change, f.message, keep_status=f.keep_status)
            return
        except RetoolError as e:
            self._fail(change, e.summary + (f": {e.detail}" if e.detail else ""), keep_status=False)
            return
        self._result(change, result, message)
        if result == "running":
            self.failed[addr] = f"{addr} is still running (--no-wait)"
        self.ctx.emit(ApplyEvent(kind="done", address=addr, action=change.action, message=message or result))

    def _blocker(self, addr: str) -> str | None:
        """Why `addr` cannot run: the failure (or unfinished run) of something it needs."""
        node = self.ctx.graph.nodes.get(addr)
        for dep in node.deps if node else ():
            if dep in self.failed:
                return self.failed[dep]
        return None

    def _fail(self, change: PlannedChange, message: str, *, keep_status: bool) -> None:
        addr = change.address
        rec = self.ctx.state.nodes.get(addr)
        if rec is not None:
            if not keep_status:
                rec.status = "failed"
            rec.message = message
            self.ctx.commit(rec)
        self.failed[addr] = f"{addr} failed"
        self._result(change, "failed", message)
        self.ctx.emit(ApplyEvent(kind="failed", address=addr, action=change.action, message=message))

    def _do(self, change: PlannedChange) -> tuple[Result, str]:
        if change.action == "delete":
            return self._delete(change)
        node = self.ctx.graph.nodes.get(change.address)
        if node is None:
            raise TerminalError(f"{change.address} is in the plan but not in the spec", hint="run `retool plan` again")
        if node.kind == "stage":
            return self.stages.run(change, node)
        return self._resource(change, node)

    # ----------------------------------------------------------------- volumes, image, data, models, sandbox

    def _resource(self, change: PlannedChange, node: Node) -> tuple[Result, str]:
        fp = self.ctx.fingerprints(node)
        if change.action == "update" and node.kind in ("dataset", "model"):
            # Update fields of data (e.g. expected_rows) change nothing materialised.
            self.ctx.record_config(node, fp)
            return "updated", "recorded new settings"
        outcome = self.ctx.retry(lambda: self._ensure(node))
        rec = self.ctx.rec(node)
        rec.status = "succeeded"
        self.ctx.set_identity(rec, node, fp)
        rec.outputs = dict(outcome.outputs)
        rec.output_id = output_id(fp.restart_id, rec.outputs)
        rec.message = outcome.message
        rec.finished_at = self.ctx.clock()
        self.ctx.commit(rec)
        return outcome.change, outcome.message

    def _ensure(self, node: Node) -> Outcome:
        spec, rt = self.ctx.spec, self.ctx.runtime
        if node.kind == "volume":
            return rt.ensure_volume(node.name, spec.volumes[node.name], spec)
        if node.kind == "image":
            return rt.build_image(spec.image, spec)
        if node.kind == "sandbox":
            assert spec.sandbox is not None
            return rt.ensure_sandbox(spec.sandbox, spec)
        if node.kind == "dataset":
            return rt.prepare_dataset(node.name, spec.datasets[node.name], spec, self.ctx.loaded.spec_dir)
        if node.kind == "model":
            return rt.prepare_model(node.name, spec.models[node.name], spec, self.ctx.loaded.spec_dir)
        raise TerminalError(f"unknown node kind {node.kind}")

    # ----------------------------------------------------------------- delete

    def _delete(self, change: PlannedChange) -> tuple[Result, str]:
        addr = change.address
        rec = self.ctx.state.nodes.get(addr)
        if rec is None:
            return "unchanged", "already gone from state"
        if rec.kind == "stage" and rec.status == "running" and rec.run is not None:
            self.stages.cancel_run(rec, "removed from the spec")
        if rec.kind == "volume" and self.prune:
            volume = Volume.model_validate({k: v for k, v in rec.config.items() if k in Volume.model_fields})
            if volume.protect and not self.allow_data_loss:
                raise NodeFailed(
                    f"{addr} is protected; its data is kept (pass --allow-data-loss with --prune to delete it)",
                    keep_status=True,
                )
            name = addr.split(".", 1)[1]
            self.ctx.retry(lambda: self.ctx.runtime.delete_volume(name, volume, self.ctx.spec))
            del self.ctx.state.nodes[addr]
            self.ctx.commit(rec)
            return "deleted", "volume and its data deleted"
        del self.ctx.state.nodes[addr]
        self.ctx.commit(rec)
        return "forgotten", "record removed; data kept"

    # ----------------------------------------------------------------- results

    def _result(self, change: PlannedChange, result: Result, message: str = "") -> None:
        self.results.append(NodeResult(address=change.address, action=change.action, result=result, message=message))
