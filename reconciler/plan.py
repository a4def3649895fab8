"""The plan: a pure function from (spec, recorded state, observed reality) to frozen data.

`make_plan` decides one action per node and says why; it prints nothing and does no I/O
(STYLE.md #1). Views render it (reconciler/views.py); apply walks it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.fingerprint import Fingerprints

Action = Literal["create", "update", "resume", "rerun", "no-op", "delete", "blocked"]
RunState = Literal["running", "succeeded", "failed", "lost"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ObservedNode(Frozen):
    """What the runtime sees of one node right now (refresh), independent of the state file."""

    exists: bool = True
    run_state: RunState | None = None
    step: int | None = None
    latest_valid_checkpoint: int | None = None
    invalid_checkpoints: list[str] = Field(default_factory=list)  # "global_step_40: missing shard rank 3 of 8"
    message: str = ""


class Observed(Frozen):
    nodes: dict[str, ObservedNode] = Field(default_factory=dict)
    refreshed: bool = True  # False: plan made from recorded state only (`--refresh=false` or unreachable)
    notes: list[str] = Field(default_factory=list)


class Estimate(Frozen):
    steps: int = 0
    gpu_hours: float = 0.0
    usd: float = 0.0
    segments: int = 0  # attempts of at most resources.timeout_hours each
    seconds_per_step: float | None = None
    source: Literal["measured", "spec", "none"] = "none"


class PlannedChange(Frozen):
    address: str
    action: Action
    reasons: list[str] = Field(default_factory=list)
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


class Plan(Frozen):
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

    @property
    def has_changes(self) -> bool:
        return any(c.action != "no-op" for c in self.changes)

    def change(self, address: str) -> PlannedChange | None:
        return next((c for c in self.changes if c.address == address), None)
