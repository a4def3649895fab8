"""Apply: walk a Plan through a Runtime, writing state after every transition.

Level-triggered and idempotent (DESIGN.md "Apply"): the lock is taken, state re-read, a
saved plan whose serial moved is refused, the backend's preflight must pass, then each
planned change runs in order. A stage's run handle is recorded the moment it launches, so
a crash or Ctrl-C leaves a state the next apply re-attaches to instead of relaunching; a
finished node's record is written the moment it succeeds (STYLE.md #6). When a node fails,
its dependents are skipped because of it; independent nodes go on. A `blocked` change
stops the walk with its reason.

Retries: transient faults of idempotent calls (ensure, prepare, poll, discover, finalize)
are retried with backoff; `launch_stage` is not (a backend makes launching idempotent per
restart identity, but the engine does not lean on it more than a crash would).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from reconciler.errors import RetoolError, StalePlanError, TerminalError, TransientError
from reconciler.fingerprint import Fingerprints, fingerprint, output_id, upstream_output_ids
from reconciler.graph import Graph, Node, address_kind, build_graph
from reconciler.loader import LoadedSpec
from reconciler.plan import Plan, PlannedChange
from reconciler.spec import RLStage, SFTStage, Volume
from reconciler.state.base import LockInfo, NodeRecord, RunHandle, State, StateStore
from reconciler.steps import dataset_rows, gpu_count, hourly_usd, total_steps
from runtime.base import Checkpoint, Outcome, RunStatus, Runtime, StageContext

T = TypeVar("T")

EventKind = Literal["start", "progress", "done", "failed", "skipped", "blocked", "detached", "note"]
Result = Literal[
    "created", "updated", "unchanged", "succeeded", "running", "deleted", "forgotten",
    "failed", "skipped", "blocked", "not-run",
]
FAILED_RESULTS: frozenset[str] = frozenset({"failed", "blocked"})


class ApplyEvent(BaseModel):
    """Something the CLI shows while apply runs (progress bars, one line per transition)."""

    model_config = ConfigDict(frozen=True)

    kind: EventKind
    address: str = ""
    message: str = ""
    action: str = ""
    step: int | None = None
    total: int | None = None


class NodeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

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


class _Detached(Exception):
    """Ctrl-C while waiting on a run: leave it running, stop the walk."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


class _NodeFailed(Exception):
    """A node could not reach its goal; `keep_status` leaves its record's status alone
    (a run we merely could not observe is still running, and must not be relaunched)."""

    def __init__(self, message: str, *, keep_status: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.keep_status = keep_status


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
    state_dir: str = "",
    poll_interval: float = 5.0,
    retries: int = 3,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> ApplyResult:
    """Apply `plan` (made from `loaded`) and return the final state and per-node results.

    Raises StateLockedError when another apply holds the lock, StalePlanError when the
    state moved since the plan, TerminalError when the backend's preflight fails; node
    failures do not raise: they are in the result (exit code 1)."""
    lock_id = store.lock(lock_info or LockInfo())
    try:
        state = store.read()
        check_plan_fresh(plan, state, saved=saved)
        engine = _Engine(
            plan=plan, loaded=loaded, store=store, runtime=runtime,
            state=state or State(lineage=plan.lineage or str(uuid.uuid4()), spec_name=plan.spec_name),
            wait=wait, prune=prune, allow_data_loss=allow_data_loss, on_event=on_event or (lambda e: None),
            state_dir=state_dir, poll_interval=poll_interval, retries=retries, sleep=sleep, clock=clock,
        )
        return engine.run()
    finally:
        try:
            store.unlock(lock_id)
        except RetoolError:
            pass  # someone force-unlocked (`retool state unlock`): nothing of ours left to release


def stage_context(
    loaded: LoadedSpec, state: State | None, node: Node, *, restart_id: str,
    total: int | None, resume_from: int | None, state_dir: str,
) -> StageContext:
    """What a backend needs to launch, render or finalize the stage `node`."""
    inputs: dict[str, dict[str, Any]] = {}
    for dep in node.deps:
        rec = state.nodes.get(dep) if state else None
        if rec is not None:
            inputs[dep] = dict(rec.outputs)
    return StageContext(
        spec=loaded.spec, spec_dir=loaded.spec_dir, stage=node.name, restart_id=restart_id,
        total_steps=total, resume_from=resume_from, inputs=inputs, state_dir=state_dir,
    )


def planned_total_steps(loaded: LoadedSpec, state: State | None, stage_name: str) -> int | None:
    """Total steps of a stage from its training data's measured (else expected) rows."""
    stage = loaded.spec.stages[stage_name]
    train = stage.train.split(".", 1)[1]
    rec = state.nodes.get(stage.train) if state else None
    return total_steps(stage, dataset_rows(loaded.spec.datasets[train], rec.outputs if rec else None))


def cancel(address: str, loaded: LoadedSpec, store: StateStore, runtime: Runtime, *, lock_info: LockInfo | None = None) -> State:
    """Cancel a stage's running run (`retool cancel stage.X`); its checkpoints are kept."""
    if address_kind(address) != "stage":
        raise TerminalError(f"Only stages can be cancelled, not {address}", hint="pass an address like `stage.sft`")
    lock_id = store.lock(lock_info or LockInfo())
    try:
        state = store.read()
        rec = state.nodes.get(address) if state else None
        if state is None or rec is None or rec.status != "running" or rec.run is None:
            status = rec.status if rec else "not in state"
            raise TerminalError(f"{address} has no running run to cancel", f"its recorded status is {status}")
        runtime.cancel_stage(rec.run)
        rec.status = "cancelled"
        rec.message = "cancelled by `retool cancel`; checkpoints kept"
        rec.finished_at = rec.updated_at = time.time()
        state.serial += 1
        store.write(state)
        return state
    finally:
        try:
            store.unlock(lock_id)
        except RetoolError:
            pass


# --------------------------------------------------------------------------- the walk


class _Engine:
    def __init__(
        self, *, plan: Plan, loaded: LoadedSpec, store: StateStore, runtime: Runtime, state: State,
        wait: bool, prune: bool, allow_data_loss: bool, on_event: Callable[[ApplyEvent], None],
        state_dir: str, poll_interval: float, retries: int, sleep: Callable[[float], None], clock: Callable[[], float],
    ) -> None:
        self.plan, self.loaded, self.store, self.runtime, self.state = plan, loaded, store, runtime, state
        self.spec = loaded.spec
        self.graph: Graph = build_graph(loaded.spec)
        self.wait, self.prune, self.allow_data_loss = wait, prune, allow_data_loss
        self.emit = on_event
        self.state_dir, self.poll_interval, self.retries = state_dir, poll_interval, retries
        self.sleep, self.clock = sleep, clock
        self.results: list[NodeResult] = []
        self.failed: dict[str, str] = {}  # address -> why its dependents cannot run

    # ----------------------------------------------------------------- driver

    def run(self) -> ApplyResult:
        if self._has_work():
            problems = self.runtime.preflight(self.spec)
            if problems:
                raise TerminalError(
                    f"The {self.runtime.name} backend is not ready",
                    "\n".join(f"- {p}" for p in problems),
                    "fix the problems above; nothing was changed",
                )
        changes = self.plan.changes
        for i, change in enumerate(changes):
            if change.action == "blocked":
                reason = "; ".join(change.reasons) or "cannot run on this backend"
                self._result(change, "blocked", reason)
                self.emit(ApplyEvent(kind="blocked", address=change.address, action="blocked", message=reason))
                for rest in changes[i + 1:]:
                    self._result(rest, "not-run", f"apply stopped at blocked {change.address}")
                return ApplyResult(state=self.state, results=self.results, stopped=f"{change.address}: {reason}")
            try:
                self._step(change)
            except _Detached as d:
                self._result(change, "running", "detached; the run continues")
                self.emit(ApplyEvent(
                    kind="detached", address=d.address,
                    message="detached; `retool status` or `retool apply` re-attaches",
                ))
                for rest in changes[i + 1:]:
                    self._result(rest, "not-run", "apply detached")
                return ApplyResult(state=self.state, results=self.results, detached=True)
        return ApplyResult(state=self.state, results=self.results)

    def _has_work(self) -> bool:
        running = any(r.status == "running" for r in self.state.nodes.values())
        return self.plan.has_changes or running

    def _step(self, change: PlannedChange) -> None:
        addr = change.address
        blocker = self._blocker(addr)
        if blocker is not None:
            self.failed[addr] = blocker
            self._result(change, "skipped", f"skipped because {blocker}")
            self.emit(ApplyEvent(kind="skipped", address=addr, action=change.action, message=f"because {blocker}"))
            return
        if change.action == "no-op" and not self._is_running(addr):
            self._result(change, "unchanged")
            return
        self.emit(ApplyEvent(kind="start", address=addr, action=change.action))
        try:
            result, message = self._do(change)
        except _NodeFailed as f:
            self._fail(change, f.message, keep_status=f.keep_status)
            return
        except RetoolError as e:
            self._fail(change, e.summary + (f": {e.detail}" if e.detail else ""), keep_status=False)
            return
        self._result(change, result, message)
        if result == "running":
            self.failed[addr] = f"{addr} is still running (--no-wait)"
        self.emit(ApplyEvent(kind="done", address=addr, action=change.action, message=message or result))

    def _blocker(self, addr: str) -> str | None:
        """Why `addr` cannot run: the failure (or unfinished run) of something it needs."""
        node = self.graph.nodes.get(addr)
        for dep in node.deps if node else ():
            if dep in self.failed:
                return self.failed[dep]
        return None

    def _fail(self, change: PlannedChange, message: str, *, keep_status: bool) -> None:
        addr = change.address
        rec = self.state.nodes.get(addr)
        if rec is not None:
            if not keep_status:
                rec.status = "failed"
            rec.message = message
            self._commit(rec)
        self.failed[addr] = f"{addr} failed"
        self._result(change, "failed", message)
        self.emit(ApplyEvent(kind="failed", address=addr, action=change.action, message=message))

    def _do(self, change: PlannedChange) -> tuple[Result, str]:
        if change.action == "delete":
            return self._delete(change)
        node = self.graph.nodes.get(change.address)
        if node is None:
            raise TerminalError(f"{change.address} is in the plan but not in the spec", hint="run `retool plan` again")
        if node.kind == "stage":
            return self._stage(change, node)
        return self._resource(change, node)

    # ----------------------------------------------------------------- volumes, image, data, models, sandbox

    def _resource(self, change: PlannedChange, node: Node) -> tuple[Result, str]:
        fp = self._fingerprints(node)
        if change.action == "update" and node.kind in ("dataset", "model"):
            # Update fields of data (e.g. expected_rows) change nothing materialised.
            self._record_config(node, fp)
            return "updated", "recorded new settings"
        outcome = self._retry(lambda: self._ensure(node))
        rec = self._rec(node)
        rec.status = "succeeded"
        self._set_identity(rec, node, fp)
        rec.outputs = dict(outcome.outputs)
        rec.output_id = output_id(fp.restart_id, rec.outputs)
        rec.message = outcome.message
        rec.finished_at = self.clock()
        self._commit(rec)
        return outcome.change, outcome.message

    def _ensure(self, node: Node) -> Outcome:
        spec, rt = self.spec, self.runtime
        if node.kind == "volume":
            return rt.ensure_volume(node.name, spec.volumes[node.name], spec)
        if node.kind == "image":
            return rt.build_image(spec.image, spec)
        if node.kind == "sandbox":
            assert spec.sandbox is not None
            return rt.ensure_sandbox(spec.sandbox, spec)
        if node.kind == "dataset":
            return rt.prepare_dataset(node.name, spec.datasets[node.name], spec, self.loaded.spec_dir)
        if node.kind == "model":
            return rt.prepare_model(node.name, spec.models[node.name], spec, self.loaded.spec_dir)
        raise TerminalError(f"unknown node kind {node.kind}")

    # ----------------------------------------------------------------- stages

    def _stage(self, change: PlannedChange, node: Node) -> tuple[Result, str]:
        fp = self._fingerprints(node)
        rec = self.state.nodes.get(node.address)
        action = change.action
        if rec is not None and rec.status == "running" and rec.run is not None:
            if rec.restart_id != fp.restart_id or (action == "rerun"):
                self._cancel_stale_run(rec, "its restart identity changed" if rec.restart_id != fp.restart_id else "replaced")
            else:
                if action == "update":
                    self._record_config(node, fp)
                done = self._follow(node, rec, fp)
                more = planned_total_steps(self.loaded, self.state, node.name)
                if done is not None and not (action == "resume" and more is not None and more > rec.steps_done):
                    return done
                if done is None and action in ("no-op", "update"):
                    raise _NodeFailed(rec.message or f"run {rec.status}", keep_status=True)
                # planned to (re)launch: resume from its checkpoints (more steps, or after a failure)
        if action == "update":
            self._record_config(node, fp)
            return "updated", "recorded new settings; nothing reruns"
        if action == "no-op":
            return "unchanged", ""
        return self._launch(change, node, fp)

    def _launch(self, change: PlannedChange, node: Node, fp: Fingerprints) -> tuple[Result, str]:
        rec = self.state.nodes.get(node.address)
        total = planned_total_steps(self.loaded, self.state, node.name)
        total = change.total_steps if total is None else total
        replacing = change.action == "rerun" and rec is not None and rec.restart_id == fp.restart_id
        latest = None if replacing else self._latest_checkpoint(node, fp.restart_id)
        if latest is not None and total is not None and latest.step >= total:
            # Everything is trained already (e.g. finalize failed last time): finish it.
            rec = self._rec(node)
            self._set_identity(rec, node, fp)
            rec.total_steps = total
            return self._finish(node, rec, fp, latest)
        resume_from = latest.step if latest is not None else None
        ctx = stage_context(
            self.loaded, self.state, node, restart_id=fp.restart_id, total=total,
            resume_from=resume_from, state_dir=self.state_dir,
        )
        handle = self.runtime.launch_stage(ctx)
        rec = self._rec(node)
        if rec.restart_id != fp.restart_id or replacing:
            rec.gpu_seconds, rec.cost_usd, rec.outputs, rec.output_id = 0.0, 0.0, {}, None
        self._set_identity(rec, node, fp)
        rec.status = "running"
        rec.run = handle
        rec.total_steps = total
        rec.steps_done = resume_from or 0
        rec.started_at = handle.started_at
        rec.finished_at = None
        rec.message = f"resumed from step {resume_from}" if resume_from is not None else "started"
        self._commit(rec)
        self.emit(ApplyEvent(kind="note", address=node.address, message=rec.message, step=resume_from, total=total))
        done = self._follow(node, rec, fp)
        if done is None:
            raise _NodeFailed(rec.message, keep_status=True)  # _follow recorded failed or lost
        return done

    def _follow(self, node: Node, rec: NodeRecord, fp: Fingerprints) -> tuple[Result, str] | None:
        """Watch a recorded run to its end. Returns the node's result once it succeeded,
        None when it ended otherwise (the record says how), or raises _NodeFailed."""
        assert rec.run is not None
        status = self._watch(node.address, rec.run)
        if status is None:
            if not self.wait:
                return "running", "still running (--no-wait)"
            raise AssertionError("watch returned without a final status while waiting")
        self._account(rec, status, node)
        if status.state == "succeeded":
            rec.message = f"run finished at step {status.step}; finalizing"
            self._commit(rec)
            latest = self._latest_checkpoint(node, fp.restart_id)
            if latest is None:
                rec.status = "failed"
                rec.message = "the run finished but left no valid checkpoint"
                self._commit(rec)
                raise _NodeFailed(rec.message)
            return self._finish(node, rec, fp, latest)
        rec.status = "lost" if status.state == "lost" else "failed"
        rec.message = status.message or f"run {status.state}"
        if status.step is not None:
            rec.steps_done = max(rec.steps_done, status.step)
        rec.finished_at = self.clock()
        self._commit(rec)
        return None

    def _watch(self, address: str, handle: RunHandle) -> RunStatus | None:
        """Poll until the run ends (or once with --no-wait). Ctrl-C detaches."""
        failures = 0
        try:
            while True:
                try:
                    status = self.runtime.poll_stage(handle)
                    failures = 0
                except TransientError as e:
                    failures += 1
                    if failures > self.retries:
                        raise _NodeFailed(
                            f"cannot reach the run ({e.summary}); it was not relaunched: "
                            "`retool status` or `retool apply` re-attaches", keep_status=True,
                        ) from e
                    self.sleep(self._backoff(failures))
                    continue
                except RetoolError as e:
                    raise _NodeFailed(
                        f"cannot observe the run ({e.summary}); it was not relaunched", keep_status=True
                    ) from e
                self.emit(ApplyEvent(
                    kind="progress", address=address, step=status.step, total=status.total,
                    message=status.message or status.state,
                ))
                if status.state != "running":
                    return status
                if not self.wait:
                    return None
                self.sleep(self.poll_interval)
        except KeyboardInterrupt:
            raise _Detached(address) from None

    def _finish(self, node: Node, rec: NodeRecord, fp: Fingerprints, checkpoint: Checkpoint) -> tuple[Result, str]:
        ctx = stage_context(
            self.loaded, self.state, node, restart_id=fp.restart_id, total=rec.total_steps,
            resume_from=None, state_dir=self.state_dir,
        )
        outcome = self._retry(lambda: self.runtime.finalize_stage(ctx, checkpoint))
        outputs = dict(outcome.outputs)
        outputs.setdefault("final_step", checkpoint.step)
        outputs.setdefault("checkpoint", checkpoint.path)
        rec.outputs = outputs
        rec.output_id = output_id(fp.restart_id, outputs)
        rec.steps_done = int(outputs["final_step"])
        rec.status = "succeeded"
        rec.message = outcome.message or f"finished at step {rec.steps_done}"
        rec.finished_at = self.clock()
        self._commit(rec)
        return "succeeded", rec.message

    def _account(self, rec: NodeRecord, status: RunStatus, node: Node) -> None:
        """Measured speed and spend of the attempt that just ended, counted once per run
        (the handle remembers it, so a crash before finalizing cannot count it twice)."""
        assert rec.run is not None
        if "accounted_s" in rec.run.extra:
            return
        elapsed = status.elapsed_s if status.elapsed_s is not None else max(0.0, self.clock() - rec.run.started_at)
        stage = self.spec.stages[node.name]
        end_step = status.step if status.step is not None else rec.steps_done
        steps_run = (end_step or 0) - rec.steps_done
        if steps_run > 0 and elapsed > 0:
            rec.seconds_per_step = round(elapsed / steps_run, 3)
        rec.gpu_seconds += elapsed * gpu_count(stage.resources)
        rec.cost_usd = round(rec.cost_usd + elapsed / 3600 * (hourly_usd(stage.resources, self.spec.pricing) or 0.0), 4)
        rec.run = rec.run.model_copy(update={"extra": {**rec.run.extra, "accounted_s": elapsed}})

    def _latest_checkpoint(self, node: Node, restart_id: str) -> Checkpoint | None:
        found = self._retry(lambda: self.runtime.discover_checkpoints(self.spec, node.name, restart_id))
        valid = [c for c in found if c.valid and c.restart_id in (None, restart_id)]
        return max(valid, key=lambda c: c.step) if valid else None

    def _cancel_stale_run(self, rec: NodeRecord, why: str) -> None:
        assert rec.run is not None
        self._retry(lambda: self.runtime.cancel_stage(rec.run))  # type: ignore[arg-type]
        rec.status = "cancelled"
        rec.message = f"cancelled: {why}"
        rec.finished_at = self.clock()
        self._commit(rec)
        self.emit(ApplyEvent(kind="note", address=rec.address, message=rec.message))

    # ----------------------------------------------------------------- delete

    def _delete(self, change: PlannedChange) -> tuple[Result, str]:
        addr = change.address
        rec = self.state.nodes.get(addr)
        if rec is None:
            return "unchanged", "already gone from state"
        if rec.kind == "stage" and rec.status == "running" and rec.run is not None:
            self._cancel_stale_run(rec, "removed from the spec")
        if rec.kind == "volume" and self.prune:
            volume = Volume.model_validate({k: v for k, v in rec.config.items() if k in Volume.model_fields})
            if volume.protect and not self.allow_data_loss:
                raise _NodeFailed(
                    f"{addr} is protected; its data is kept (pass --allow-data-loss with --prune to delete it)",
                    keep_status=True,
                )
            name = addr.split(".", 1)[1]
            self._retry(lambda: self.runtime.delete_volume(name, volume, self.spec))
            del self.state.nodes[addr]
            self._commit(rec)
            return "deleted", "volume and its data deleted"
        del self.state.nodes[addr]
        self._commit(rec)
        return "forgotten", "record removed; data kept"

    # ----------------------------------------------------------------- records

    def _fingerprints(self, node: Node) -> Fingerprints:
        # Recomputed now: an upstream that ran earlier in this apply has a new output identity.
        return fingerprint(node, upstream_output_ids(node, self.state))

    def _rec(self, node: Node) -> NodeRecord:
        rec = self.state.nodes.get(node.address)
        if rec is None:
            rec = NodeRecord(address=node.address, kind=node.kind, created_at=self.clock())
            self.state.nodes[node.address] = rec
        return rec

    def _set_identity(self, rec: NodeRecord, node: Node, fp: Fingerprints) -> None:
        rec.config = dict(node.config)
        rec.restart_id, rec.resume_hash, rec.update_hash = fp.restart_id, fp.resume_hash, fp.update_hash
        rec.inputs = upstream_output_ids(node, self.state)

    def _record_config(self, node: Node, fp: Fingerprints) -> None:
        rec = self._rec(node)
        rec.config = dict(node.config)
        rec.update_hash = fp.update_hash
        rec.resume_hash = fp.resume_hash if rec.restart_id == fp.restart_id else rec.resume_hash
        self._commit(rec)

    def _is_running(self, addr: str) -> bool:
        rec = self.state.nodes.get(addr)
        return rec is not None and rec.status == "running" and rec.run is not None

    def _commit(self, rec: NodeRecord | None = None) -> None:
        """Persist a transition: serial + 1, written atomically by the store."""
        if rec is not None:
            rec.updated_at = self.clock()
        self.state.serial += 1
        self.store.write(self.state)

    def _result(self, change: PlannedChange, result: Result, message: str = "") -> None:
        self.results.append(NodeResult(address=change.address, action=change.action, result=result, message=message))

    # ----------------------------------------------------------------- retries

    def _backoff(self, attempt: int) -> float:
        return min(30.0, 2.0 ** (attempt - 1))

    def _retry(self, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except TransientError as e:
                attempt += 1
                if attempt > self.retries:
                    raise
                self.emit(ApplyEvent(kind="note", message=f"{e.summary}; retrying"))
                self.sleep(self._backoff(attempt))
