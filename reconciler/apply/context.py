"""What one apply shares between its parts: the state being written, the runtime, the
clock, and the rules for recording a node (reconciler/apply/engine.py walks the plan,
reconciler/apply/stage.py runs stages; both record through `ApplyContext`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from reconciler.errors import TransientError
from reconciler.fingerprint import Fingerprints, fingerprint, upstream_output_ids
from reconciler.graph import Graph, Node
from reconciler.loader import LoadedSpec
from reconciler.spec import EvalStage, Spec
from reconciler.state.base import NodeRecord, State, StateStore
from reconciler.steps import stage_total_steps
from reconciler.backend import Runtime, StageContext

T = TypeVar("T")

EventKind = Literal["start", "progress", "done", "failed", "skipped", "blocked", "detached", "note"]
Result = Literal[
    "created", "updated", "unchanged", "succeeded", "running", "deleted", "forgotten",
    "failed", "skipped", "blocked", "not-run",
]


class ApplyEvent(BaseModel):
    """Something the CLI shows while apply runs (progress bars, one line per transition)."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    kind: EventKind
    address: str = ""
    message: str = ""
    action: str = ""
    step: int | None = None
    total: int | None = None


class Detached(Exception):
    """Ctrl-C while waiting on a run: leave it running, stop the walk."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


class NodeFailed(Exception):
    """A node could not reach its goal; `keep_status` leaves its record's status alone
    (a run we merely could not observe is still running, and must not be relaunched)."""

    def __init__(self, message: str, *, keep_status: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.keep_status = keep_status


def stage_context(
    loaded: LoadedSpec, state: State | None, node: Node, *, restart_id: str,
    total: int | None, resume_from: int | None, state_dir: str,
) -> StageContext:
    """What a backend needs to launch, render or finalize the stage `node`; its inputs
    are the recorded outputs of everything it depends on."""
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
    rec = None if isinstance(stage, EvalStage) or state is None else state.nodes.get(stage.train)
    return stage_total_steps(loaded.spec, stage, rec.outputs if rec else None)


@dataclass
class ApplyContext:
    loaded: LoadedSpec
    store: StateStore
    runtime: Runtime
    state: State
    graph: Graph
    emit: Callable[[ApplyEvent], None]
    wait: bool = True
    state_dir: str = ""
    poll_interval: float = 5.0
    retries: int = 3
    sleep: Callable[[float], None] = field(default=lambda s: None)
    clock: Callable[[], float] = field(default=lambda: 0.0)
    said: set[str] = field(default_factory=set)  # notes shown once per apply (`note_once`)

    @property
    def spec(self) -> Spec:
        return self.loaded.spec

    # ----------------------------------------------------------------- records

    def fingerprints(self, node: Node) -> Fingerprints:
        # Recomputed now: an upstream that ran earlier in this apply has a new output identity.
        return fingerprint(node, upstream_output_ids(node, self.state))

    def rec(self, node: Node) -> NodeRecord:
        """The node's record, created (unsaved) if it has none yet."""
        rec = self.state.nodes.get(node.address)
        if rec is None:
            rec = NodeRecord(address=node.address, kind=node.kind, created_at=self.clock())
            self.state.nodes[node.address] = rec
        return rec

    def set_identity(self, rec: NodeRecord, node: Node, fp: Fingerprints) -> None:
        rec.config = dict(node.config)
        rec.restart_id, rec.resume_hash, rec.update_hash = fp.restart_id, fp.resume_hash, fp.update_hash
        rec.inputs = upstream_output_ids(node, self.state)

    def record_config(self, node: Node, fp: Fingerprints) -> None:
        """An `update`: the new settings are recorded; nothing runs again."""
        rec = self.rec(node)
        rec.config = dict(node.config)
        rec.update_hash = fp.update_hash
        if rec.restart_id == fp.restart_id:
            rec.resume_hash = fp.resume_hash
        self.commit(rec)

    def is_running(self, address: str) -> bool:
        rec = self.state.nodes.get(address)
        return rec is not None and rec.status == "running" and rec.run is not None

    def commit(self, rec: NodeRecord | None = None) -> None:
        """Persist a transition: serial + 1, written atomically by the store."""
        if rec is not None:
            rec.updated_at = self.clock()
        self.state.serial += 1
        self.store.write(self.state)

    def note_once(self, key: str, message: str, address: str = "") -> None:
        """Show `message` the first time this apply meets `key`, never again."""
        if key not in self.said:
            self.said.add(key)
            self.emit(ApplyEvent(kind="note", address=address, message=message))

    # ----------------------------------------------------------------- retries

    def backoff(self, attempt: int) -> float:
        return min(30.0, 2.0 ** (attempt - 1))

    def retry(self, fn: Callable[[], T]) -> T:
        """Call an idempotent runtime operation, retrying transient faults with backoff."""
        attempt = 0
        while True:
            try:
                return fn()
            except TransientError as e:
                attempt += 1
                if attempt > self.retries:
                    raise
                self.emit(ApplyEvent(kind="note", message=f"{e.summary}; retrying"))
                self.sleep(self.backoff(attempt))
