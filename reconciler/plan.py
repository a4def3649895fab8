"""The plan: a pure function from (spec, recorded state, observed reality) to frozen data.

`make_plan` decides one action per node, in dependency order, and says why; it prints
nothing and does no I/O (docs/architecture.md, "The plan is a value"). Views render it
(reconciler/cli/plan_view.py); apply walks it.

Per node (docs/change-policy.md, "The decision table"):

    not in state / gone            -> create
    --replace                      -> rerun
    restart identity changed       -> rerun   (a config field, or an input whose output changes)
    running                        -> no-op   (apply re-attaches)
    last run failed / lost         -> resume from its latest valid checkpoint, else rerun
    resume fields changed          -> resume  (no-op "already at step N" if the new total is reached)
    update fields changed          -> update
    otherwise                      -> no-op
    in state, not in the spec      -> delete  (data kept unless --prune)
    cannot run here (`blocked`)    -> blocked, and so is every changing node downstream of it

Every reason comes as prose for people (`reasons`) and, beside it, a `ReasonCode` for programs
(`reason_codes`, same order); docs/plan-reasons.md lists the codes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from reconciler.budget import BudgetCheck, PlannedCost, check_budget
from reconciler.diff import FieldChange, diff_configs
from reconciler.errors import TerminalError
from reconciler.records import Frozen
from reconciler.fingerprint import Fingerprints, fingerprint, recorded_output_id
from reconciler.graph import KIND_RANK, PREPARATION_KEY, Graph, Node, address_kind, build_graph, sort_key
from reconciler.spec import EvalStage, RLStage, SFTStage, Spec
from reconciler.state.base import NodeRecord, State, WandbRun
from reconciler.steps import Estimate, add, estimate, stage_total_steps, with_basis

__all__ = [
    "Action", "Estimate", "Observed", "ObservedNode", "Plan", "PlannedChange", "Reason", "ReasonCode", "RunState",
    "make_plan",
]

Action = Literal["create", "update", "resume", "rerun", "no-op", "delete", "blocked"]
RunState = Literal["running", "succeeded", "failed", "lost"]

# Actions after which a node's output identity is new (consumers must rerun).
OUTPUT_CHANGING: frozenset[str] = frozenset({"create", "rerun", "resume"})


class ObservedNode(Frozen):
    """What the runtime sees of one node right now (refresh), independent of the state file."""

    exists: bool = True
    run_state: RunState | None = None
    step: int | None = None
    latest_valid_checkpoint: int | None = None
    invalid_checkpoints: list[str] = Field(default_factory=list)  # "global_step_40: missing shard rank 3 of 8"
    message: str = ""
    idle: str = ""  # stopped on purpose, starts on demand (Runtime.idle_reason): not drift
    metrics: dict[str, float] = Field(default_factory=dict)  # the running run's latest (RunStatus.metrics)
    sparklines: dict[str, str] = Field(default_factory=dict)
    wandb_url: str | None = None
    wandb: WandbRun | None = None


class Observed(Frozen):
    nodes: dict[str, ObservedNode] = Field(default_factory=dict)
    refreshed: bool = True  # False: plan made from recorded state only (`--refresh=false` or unreachable)
    notes: list[str] = Field(default_factory=list)


class ReasonCode(StrEnum):
    """Why a change is planned, as data (Terraform's `ResourceInstanceChangeActionReason` is
    the model). The values appear in `retool plan --json` and `retool status --json`, so they
    are stable: add a member (and its row in docs/plan-reasons.md), never rename one."""

    NOT_CREATED = "not_created"  # no record of it: it was never created
    GONE = "gone"  # recorded, but the backend sees it no longer exists
    REPLACE_REQUESTED = "replace_requested"  # --replace ADDR
    RESTART_FIELDS_CHANGED = "restart_fields_changed"  # a field whose policy is restart changed
    INPUT_CHANGES = "input_changes"  # an upstream is planned to produce a new output
    INPUT_CHANGED = "input_changed"  # an upstream's output changed since this node last ran
    RESTART_IDENTITY_CHANGED = "restart_identity_changed"  # the identity moved, no field or input names why
    RUNNING = "running"  # a run is in progress; apply re-attaches
    FINISHED_UNRECORDED = "finished_unrecorded"  # the run finished since the last apply
    RUN_FAILED = "run_failed"  # the last run failed
    RUN_LOST = "run_lost"  # the last run was lost (its container or process vanished)
    RUN_CANCELLED = "run_cancelled"  # the last run was cancelled
    RUN_UNFINISHED = "run_unfinished"  # the last attempt never reached a final status
    NO_VALID_CHECKPOINT = "no_valid_checkpoint"  # nothing to resume from: steps are redone
    NO_STEP_REACHED = "no_step_reached"  # launched before, but no step was reached
    RESUME_FIELDS_CHANGED = "resume_fields_changed"  # a field whose policy is resume changed
    UPDATE_FIELDS_CHANGED = "update_fields_changed"  # a field whose policy is update changed
    REMOVED_FROM_SPEC = "removed_from_spec"  # recorded, no longer in the spec
    BACKEND_CANNOT_RUN = "backend_cannot_run"  # this backend cannot run it (blocked)
    UPSTREAM_BLOCKED = "upstream_blocked"  # something it needs is blocked


class Reason(Frozen):
    """One reason: the code programs match on and the sentence people read."""

    code: ReasonCode
    text: str


def reason(code: ReasonCode, text: str) -> Reason:
    return Reason(code=code, text=text)


class PlannedChange(Frozen):
    address: str
    action: Action
    reasons: list[str] = Field(default_factory=list)  # prose, for people
    # One code per reason, in the same order (docs/plan-reasons.md); added beside `reasons` so
    # readers of the prose are unaffected. Build both from `Reason`s with `PlannedChange.of`.
    reason_codes: list[ReasonCode] = Field(default_factory=list)
    diff: list[str] = Field(default_factory=list)  # "stages.sft.optim.lr: 1e-05 → 2e-05 (restart)"
    resume_from: int | None = None
    discard_steps: int = 0
    discard_gpu_hours: float = 0.0
    total_steps: int | None = None
    estimate: Estimate = Field(default_factory=Estimate)
    notes: list[str] = Field(default_factory=list)
    # Provisional when an upstream is itself planned to change (its new output identity is
    # unknown until it runs): apply recomputes them with `fingerprint()` before recording.
    fingerprints: Fingerprints | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    over_budget: list[str] = Field(default_factory=list)  # budget scopes this change pushes over ("spec", "stage.rl")

    @model_validator(mode="after")
    def _one_code_per_reason(self) -> PlannedChange:
        if len(self.reason_codes) != len(self.reasons):
            raise ValueError(
                f"{self.address}: {len(self.reason_codes)} reason code(s) for {len(self.reasons)} reason(s)"
            )
        return self

    @classmethod
    def of(cls, address: str, action: Action, why: list[Reason], **fields: Any) -> PlannedChange:
        """A change whose reasons are given as `Reason`s (prose and codes kept in step)."""
        return cls(
            address=address, action=action, reasons=[r.text for r in why], reason_codes=[r.code for r in why],
            **fields,
        )

    @property
    def why(self) -> list[Reason]:
        """The reasons, each with its code."""
        return [Reason(code=c, text=t) for c, t in zip(self.reason_codes, self.reasons, strict=True)]


class Plan(Frozen):
    format_version: int = 1
    spec: str  # path of the spec file
    spec_name: str
    backend: str
    serial: int  # state serial the plan was made against (a saved plan is stale once it moves)
    lineage: str
    created_at: float
    changes: list[PlannedChange]  # topological order, deletes last
    total: Estimate = Field(default_factory=Estimate)
    warnings: list[str] = Field(default_factory=list)
    refreshed: bool = True
    budget: BudgetCheck | None = None  # the spec's `budget` against spent + this plan (None: no budget)

    @property
    def over_budget(self) -> bool:
        return self.budget is not None and self.budget.over

    @property
    def has_changes(self) -> bool:
        return any(c.action != "no-op" for c in self.changes)

    def change(self, address: str) -> PlannedChange | None:
        return next((c for c in self.changes if c.address == address), None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.changes:
            out[c.action] = out.get(c.action, 0) + 1
        return out

    def to_json(self) -> str:
        """`{"spec", "serial", "changes": [{"address", "action", "reasons", "reason_codes", "diff", "resume_from", ...}], ...}`,
        plus `has_changes` and per-action `summary` counts (`retool plan --json`, saved plans)."""
        data = self.model_dump(mode="json")
        data["has_changes"] = self.has_changes
        data["summary"] = self.counts()
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A plan written by `to_json`; its derived keys (`has_changes`, `summary`) and a saved
        plan's `spec_sha256` are not part of the plan."""
        data = json.loads(text)
        for derived in ("has_changes", "summary", "spec_sha256"):
            data.pop(derived, None)
        return cls.model_validate(data)


# --------------------------------------------------------------------------- entry point


def make_plan(
    spec: Spec,
    state: State | None,
    observed: Observed,
    *,
    blocked: dict[str, str] | None = None,
    replace: set[str] | None = None,
    targets: set[str] | None = None,
    spec_path: str = "",
    created_at: float | None = None,
) -> Plan:
    """Decide what apply would do. `blocked` maps an address to why this backend cannot
    run it; `replace` forces reruns; `targets` limits the plan to those addresses and what
    they depend on."""
    _check_owner(spec, state)
    graph = build_graph(spec)
    blocked, replace = dict(blocked or {}), set(replace or ())
    recorded = dict(state.nodes) if state else {}
    known = set(graph.nodes) | set(recorded)
    for label, addrs in (("--target", targets or set()), ("--replace", replace)):
        unknown = sorted(a for a in addrs if a not in known)
        if unknown:
            raise TerminalError(
                f"{label}: unknown address {', '.join(unknown)}",
                hint="addresses: " + ", ".join(sorted(known, key=sort_key)),
            )
    scope = set(graph.nodes)
    if targets is not None:
        scope = set()
        for t in targets:
            if t in graph.nodes:
                scope |= {t} | graph.dependencies(t)

    planner = _Planner(spec, state, observed, graph, blocked, replace)
    changes = [planner.decide(graph.nodes[a]) for a in graph.order() if a in scope]
    gone = [a for a in recorded if a not in graph.nodes and (targets is None or a in targets)]
    for addr in sorted(gone, key=lambda a: (-KIND_RANK.get(address_kind(a), 9), a)):
        changes.append(_delete(recorded[addr]))

    total = Estimate()
    for c in changes:
        if c.action in OUTPUT_CHANGING:
            total = add(total, c.estimate)
    created_at = time.time() if created_at is None else created_at
    budget, marks = check_budget(spec, state, _planned_costs(changes), now=created_at)
    changes = [c.model_copy(update={"over_budget": marks[c.address]}) if c.address in marks else c for c in changes]
    return Plan(
        spec=spec_path, spec_name=spec.name, backend=spec.backend,
        serial=state.serial if state else 0, lineage=state.lineage if state else "",
        created_at=created_at,
        changes=changes, total=total, warnings=_warnings(observed, planner.warnings),
        refreshed=observed.refreshed, budget=budget,
    )


def _planned_costs(changes: list[PlannedChange]) -> list[PlannedCost]:
    """The stages the plan starts, with their estimates, for the budget check."""
    return [
        PlannedCost(
            address=c.address, estimate=c.estimate,
            known=c.total_steps is not None and (c.estimate.steps == 0 or c.estimate.seconds_per_step is not None),
        )
        for c in changes if c.action in OUTPUT_CHANGING and address_kind(c.address) == "stage"
    ]


def reached_step(rec: NodeRecord) -> int:
    """How far a stage got: its final checkpoint step once finished, else its progress."""
    final = rec.outputs.get("final_step")
    return final if isinstance(final, int) else rec.steps_done


def state_owner(spec: Spec) -> str:
    """The name a state records as its owner: `state.key`, else the spec's name."""
    return spec.state.key or spec.name


def _check_owner(spec: Spec, state: State | None) -> None:
    """Two specs sharing one state would treat each other's nodes as their own (and plan
    deletes for them): refuse instead of guessing."""
    if state is None or not state.spec_name or state.spec_name == state_owner(spec):
        return
    raise TerminalError(
        f"The state belongs to spec {state.spec_name!r}, not {state_owner(spec)!r}",
        "two specs sharing one state would plan deletes and reruns of each other's nodes",
        f"give this spec its own state (`state: {{path: .retool/{spec.name}}}`), or, if you renamed "
        f"the spec, keep its state with `state: {{key: {state.spec_name}}}`",
    )


# --------------------------------------------------------------------------- per node


@dataclass
class _Draft:
    """A decision under construction."""

    action: Action
    reasons: list[Reason]
    notes: list[str] = field(default_factory=list)
    resume_from: int | None = None
    discard: bool = False


@dataclass
class _Planner:
    spec: Spec
    state: State | None
    observed: Observed
    graph: Graph
    blocked: dict[str, str]
    replace: set[str]
    decided: dict[str, PlannedChange] = field(default_factory=dict)
    intended: dict[str, Action] = field(default_factory=dict)  # action before blocking
    warnings: list[str] = field(default_factory=list)

    def record(self, address: str) -> NodeRecord | None:
        return self.state.nodes.get(address) if self.state else None

    def decide(self, node: Node) -> PlannedChange:
        rec = self.record(node.address)
        obs = self.observed.nodes.get(node.address)
        up_ids, pending = self._inputs(node)
        fp = fingerprint(node, up_ids)
        diff = diff_configs(rec.config, node.config, node.policies, node.spec_path) if rec and rec.config else []
        draft = self._action(node, rec, obs, fp, diff, pending, up_ids)
        self.intended[node.address] = draft.action
        draft = self._block(node, draft)

        stage = self.spec.stages.get(node.name) if node.kind == "stage" else None
        total = self._total_steps(stage) if stage else None
        notes = list(draft.notes)
        if obs is not None and self.intended[node.address] in OUTPUT_CHANGING:
            # Noted in the plan that starts the stage, where they matter (what it resumes
            # from), not again on every plan that leaves it alone: a rerun's old identity
            # stays on the volume for good. `retool status` lists them every time.
            notes += [f"invalid checkpoint {c} (not resumed from)" for c in obs.invalid_checkpoints]
        est, discard_steps, discard_hours = Estimate(), 0, 0.0
        if stage is not None:
            # A blocked stage keeps the estimate of what it would do, so the plan prices it anyway.
            if draft.action in OUTPUT_CHANGING or self.intended[node.address] in OUTPUT_CHANGING:
                start = draft.resume_from or 0
                if total is None:
                    if not isinstance(stage, EvalStage):  # an eval stage always knows its rounds (samples)
                        notes.append(f"steps unknown until {stage.train} is prepared (set its expected_rows)")
                else:
                    est = self._estimate(stage, rec, total - start)
            if draft.discard and rec is not None:
                discard_steps, discard_hours = self._discard(rec, obs)
        elif draft.discard and rec is not None:
            discard_steps = rec.steps_done
        change = PlannedChange.of(
            node.address, draft.action, draft.reasons,
            diff=[f"{c.render()} ({c.policy})" for c in diff],
            resume_from=draft.resume_from if draft.action == "resume" else None,
            discard_steps=discard_steps, discard_gpu_hours=discard_hours, total_steps=total,
            estimate=est, notes=notes, fingerprints=fp, config=node.config,
        )
        self.decided[node.address] = change
        return change

    # -- inputs

    def _inputs(self, node: Node) -> tuple[dict[str, str], list[str]]:
        """Upstream output identities; a changing upstream gets a placeholder, so the
        restart identity moves and the reason can name it."""
        ids: dict[str, str] = {}
        pending: list[str] = []
        for d in node.identity_deps:
            oid = recorded_output_id(self.state, d)
            upstream = self.decided.get(d)
            if self.intended.get(d) in OUTPUT_CHANGING or oid is None:
                key = upstream.fingerprints.restart_id if upstream and upstream.fingerprints else d
                ids[d] = f"pending:{key}"
                pending.append(d)
            else:
                ids[d] = oid
        return ids, pending

    # -- the decision table

    def _action(
        self, node: Node, rec: NodeRecord | None, obs: Any, fp: Fingerprints,
        diff: list[FieldChange], pending: list[str], up_ids: dict[str, str],
    ) -> _Draft:
        if rec is None:
            return _Draft("create", [reason(ReasonCode.NOT_CREATED, "not yet created")])
        if obs is not None and not obs.exists:
            gone = f"recorded, but no longer exists: {obs.message or 'removed outside retool'}"
            return _Draft("create", [reason(ReasonCode.GONE, gone)])
        if node.address in self.replace:
            return _Draft("rerun", [reason(ReasonCode.REPLACE_REQUESTED, "forced by --replace")], discard=True)

        run_state = (obs.run_state if obs is not None and obs.run_state else None) or rec.status
        if fp.restart_id != rec.restart_id:
            draft = _Draft("rerun", self._restart_reasons(node, rec, diff, pending, up_ids), discard=True)
            if node.kind == "dataset" and rec.config.get(PREPARATION_KEY) != node.config.get(PREPARATION_KEY):
                draft.notes.append(
                    f"retool prepares format {node.config.get('format')} differently since this was prepared "
                    f"(revision {rec.config.get(PREPARATION_KEY, 1)} → {node.config.get(PREPARATION_KEY, 1)}): "
                    "prepared again, so what consumes it sees the rows retool writes now")
            if run_state == "running":
                draft.notes.append("cancels the running attempt first")
            return draft
        if run_state == "running":
            step = obs.step if obs is not None and obs.step is not None else rec.steps_done
            notes = ["apply re-attaches to it"]
            if fp.resume_hash != rec.resume_hash or fp.update_hash != rec.update_hash:
                notes.append("the other changes are planned once it finishes")
            return _Draft("no-op", [reason(ReasonCode.RUNNING, f"running (step {step})")], notes)
        if run_state != "succeeded":
            return self._recover(node, rec, obs, run_state)
        if rec.status == "running":  # finished while nobody watched; apply collects its outputs
            finished = reason(ReasonCode.FINISHED_UNRECORDED, "finished since the last apply")
            return _Draft("no-op", [finished], ["apply records its result"])
        if fp.resume_hash != rec.resume_hash and node.kind == "stage":
            return self._resume(node, rec, obs, diff)
        if fp.resume_hash != rec.resume_hash or fp.update_hash != rec.update_hash:
            draft = _Draft("update", _field_reasons(diff, ("update", "resume"), ReasonCode.UPDATE_FIELDS_CHANGED)
                           or [reason(ReasonCode.UPDATE_FIELDS_CHANGED, "update fields changed")])
            if node.kind == "image":
                draft.notes.append("finished stages are not rerun for an image change (--replace stage.X forces it)")
            return draft
        return _Draft("no-op", [])

    def _restart_reasons(
        self, node: Node, rec: NodeRecord, diff: list[FieldChange], pending: list[str], up_ids: dict[str, str]
    ) -> list[Reason]:
        reasons = _field_reasons(diff, ("restart",), ReasonCode.RESTART_FIELDS_CHANGED)
        for d in pending:
            reasons.append(reason(ReasonCode.INPUT_CHANGES, f"input {d} output changes"))
        for d, oid in up_ids.items():
            if d not in pending and rec.inputs and rec.inputs.get(d) not in (None, oid):
                reasons.append(reason(ReasonCode.INPUT_CHANGED, f"input {d} output changed since the last run"))
        return reasons or [reason(ReasonCode.RESTART_IDENTITY_CHANGED, "restart identity changed")]

    def _recover(self, node: Node, rec: NodeRecord, obs: Any, run_state: str) -> _Draft:
        code, why = _RECOVERY.get(run_state, (ReasonCode.RUN_UNFINISHED, f"last run {run_state}"))
        message = (obs.message if obs is not None and obs.message else "") or rec.message
        last = reason(code, f"{why}: {message}" if message else why)
        if node.kind == "stage":
            ckpt = self._checkpoint(rec, obs)
            if ckpt is not None:
                step, notes = ckpt
                return _Draft("resume", [last], notes, resume_from=step)
            if rec.steps_done > 0:
                return _Draft("rerun", [last, _NO_CHECKPOINT], discard=True)
            if rec.run is not None:  # it was launched (then cancelled, failed or lost) before any step
                return _Draft("rerun", [last, reason(ReasonCode.NO_STEP_REACHED, "no step was reached: from the start")])
        return _Draft("create" if rec.steps_done == 0 else "rerun", [last], discard=rec.steps_done > 0)

    def _checkpoint(self, rec: NodeRecord, obs: Any) -> tuple[int, list[str]] | None:
        """The step to resume from: the observed latest valid checkpoint; without a
        refresh, the recorded progress (flagged as unverified)."""
        if obs is not None and obs.latest_valid_checkpoint is not None:
            return obs.latest_valid_checkpoint, []
        if self.observed.refreshed and obs is not None:
            return None
        step = reached_step(rec)
        if step:
            return int(step), ["checkpoint not verified (plan made without refreshing)"]
        return None

    def _resume(self, node: Node, rec: NodeRecord, obs: Any, diff: list[FieldChange]) -> _Draft:
        stage = self.spec.stages[node.name]
        reasons = _field_reasons(diff, ("resume",), ReasonCode.RESUME_FIELDS_CHANGED) or [
            reason(ReasonCode.RESUME_FIELDS_CHANGED, "resume fields changed")
        ]
        done = reached_step(rec)
        total = self._total_steps(stage)
        if total is not None and total <= done:
            if isinstance(stage, EvalStage):
                note = f"already {done} samples per problem: {total} need no new draws (the recorded results keep all {done})"
                return _Draft("no-op", reasons, [note])
            return _Draft("no-op", reasons, [f"already at step {done}: the new total {total} needs no more steps"])
        ckpt = self._checkpoint(rec, obs)
        if ckpt is None:
            return _Draft("rerun", [*reasons, _NO_CHECKPOINT], discard=True)
        step, notes = ckpt
        return _Draft("resume", reasons, notes, resume_from=step)

    def _block(self, node: Node, draft: _Draft) -> _Draft:
        if draft.action in ("no-op", "delete"):
            return draft
        prose = "; ".join(r.text for r in draft.reasons)
        would = f"would {draft.action}" + (f": {prose}" if prose else "")
        if node.address in self.blocked:
            return _Draft("blocked", [reason(ReasonCode.BACKEND_CANNOT_RUN, self.blocked[node.address])], [would, *draft.notes])
        for d in node.deps:
            up = self.decided.get(d)
            if up is not None and up.action == "blocked":
                needs = reason(ReasonCode.UPSTREAM_BLOCKED, f"needs {d}, which is blocked")
                return _Draft("blocked", [needs], [would, *draft.notes])
        return draft

    # -- steps and cost

    def _total_steps(self, stage: SFTStage | RLStage | EvalStage) -> int | None:
        rec = None if isinstance(stage, EvalStage) else self.record(stage.train)
        fresh = rec is not None and rec.status == "succeeded" and self.intended.get(rec.address) not in OUTPUT_CHANGING
        return stage_total_steps(self.spec, stage, rec.outputs if fresh and rec else None)

    def _seconds_per_step(
        self, stage: SFTStage | RLStage | EvalStage, rec: NodeRecord | None
    ) -> tuple[float | None, Literal["measured", "spec", "none"]]:
        if rec is not None and rec.seconds_per_step:
            return rec.seconds_per_step, "measured"
        if stage.seconds_per_step:
            return stage.seconds_per_step, "spec"
        return None, "none"

    def _estimate(self, stage: SFTStage | RLStage | EvalStage, rec: NodeRecord | None, steps: int) -> Estimate:
        sps, source = self._seconds_per_step(stage, rec)
        res = stage.resources
        if res.gpu is not None and res.gpu not in self.spec.pricing.gpu_hour_usd:
            self.warnings.append(f"no price for GPU type {res.gpu}: add it to pricing.gpu_hour_usd")
        return with_basis(estimate(steps, res, self.spec.pricing, sps, source), stage)

    def _discard(self, rec: NodeRecord, obs: Any) -> tuple[int, float]:
        steps = max(rec.steps_done, obs.step if obs is not None and obs.step else 0)
        if rec.gpu_seconds > 0:
            return steps, round(rec.gpu_seconds / 3600, 4)
        sps = rec.seconds_per_step or rec.config.get("seconds_per_step") or 0.0
        res = rec.config.get("resources") or {}
        gpus = int(res.get("gpus_per_node") or 0) * int(res.get("nodes") or 1)
        return steps, round(steps * float(sps) * gpus / 3600, 4)


_RECOVERY: dict[str, tuple[ReasonCode, str]] = {
    "failed": (ReasonCode.RUN_FAILED, "last run failed"),
    "lost": (ReasonCode.RUN_LOST, "last run was lost"),
    "cancelled": (ReasonCode.RUN_CANCELLED, "last run cancelled"),
}
_NO_CHECKPOINT = reason(ReasonCode.NO_VALID_CHECKPOINT, "no valid checkpoint to resume from")


def _field_reasons(
    diff: list[FieldChange], policies: tuple[str, ...], code: ReasonCode, limit: int = 3
) -> list[Reason]:
    paths = list(dict.fromkeys(c.path for c in diff if c.policy in policies))
    if not paths:
        return []
    shown = ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
    return [reason(code, f"changed: {shown}")]


def _delete(rec: NodeRecord) -> PlannedChange:
    kind = address_kind(rec.address)
    if kind == "volume" and rec.config.get("protect"):
        notes = ["protected volume: kept even with --prune unless --allow-data-loss"]
    elif kind == "volume":
        notes = ["data kept (--prune deletes the volume)"]
    elif kind in ("dataset", "model", "stage"):
        volume = rec.config.get("volume")
        where = f" on volume.{volume}" if volume else ""
        notes = [f"record forgotten; its files stay{where} (--prune deletes volumes only)"]
    else:
        notes = []
    if rec.status == "running":
        notes.append("its running attempt is cancelled")
    removed = reason(ReasonCode.REMOVED_FROM_SPEC, "removed from the spec")
    return PlannedChange.of(rec.address, "delete", [removed], notes=notes, config=rec.config)


def _warnings(observed: Observed, extra: list[str]) -> list[str]:
    """The plan's warnings. What a backend has to say about the spec itself (e.g. Modal: a
    mutable image tag, packages that compile) arrives as refresh notes in `observed`."""
    out: list[str] = []
    if not observed.refreshed:
        out.append("not refreshed: the plan trusts the recorded state (running calls and checkpoints were not checked)")
    out += observed.notes
    out += extra
    return list(dict.fromkeys(out))

