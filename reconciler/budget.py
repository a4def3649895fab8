"""The spend guard: a spec's `budget` against measured spend plus the plan's estimate.

Per budget scope (`spec`, `stage.<name>`):

    spent      = what the state's records measured: GPU time of every run (reruns
                 included) at the price table, plus the running attempt so far
    planned    = the plan's estimate for the stages it starts (create, rerun, resume)
    projected  = spent + planned
    exceeded   = the plan has work in the scope and projected > the cap (or, once an
                 over-budget plan was approved, > the projected total that approval accepted);
                 a planned stage with no cost estimate exceeds every capped scope it is in

A plan that exceeds a scope needs `retool apply --approve-cost AMOUNT` where AMOUNT is the
plan's estimate (`BudgetCheck.amount_usd`) to the cent: a changed estimate asks again.
Pure functions over frozen data; the CLI enforces, the apply engine records approvals.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field

from reconciler.errors import TerminalError
from reconciler.records import Frozen
from reconciler.spec import Budget, Resources, Spec
from reconciler.state.base import CostApproval, NodeRecord, State
from reconciler.steps import Estimate, gpu_count, hourly_usd

SPEC_SCOPE = "spec"
# Cents: amounts are shown and approved to the cent; GPU-hours are shown to a tenth.
USD_SLACK = 0.005
GPU_HOURS_SLACK = 0.05


class BudgetExceededError(TerminalError):
    """An apply of an over-budget plan without the matching `--approve-cost`."""

    exit_code = 3


class BudgetScope(Frozen):
    """One capped scope: its cap, what was spent, what the plan adds, and what it exceeds."""

    scope: str  # "spec" or "stage.<name>"
    limit_usd: float | None = None
    limit_gpu_hours: float | None = None
    approved_usd: float | None = None  # projected total an earlier approval accepted
    approved_gpu_hours: float | None = None
    spent_usd: float = 0.0
    spent_gpu_hours: float = 0.0
    planned_usd: float = 0.0
    planned_gpu_hours: float = 0.0
    unknown: list[str] = Field(default_factory=list)  # planned stages without a cost estimate (not yet approved)
    exceeded: list[str] = Field(default_factory=list)  # "usd", "gpu_hours", "unknown cost"

    @property
    def projected_usd(self) -> float:
        return round(self.spent_usd + self.planned_usd, 2)

    @property
    def projected_gpu_hours(self) -> float:
        return round(self.spent_gpu_hours + self.planned_gpu_hours, 4)

    @property
    def ceiling_usd(self) -> float | None:
        return _ceiling(self.limit_usd, self.approved_usd)

    @property
    def ceiling_gpu_hours(self) -> float | None:
        return _ceiling(self.limit_gpu_hours, self.approved_gpu_hours)


class BudgetCheck(Frozen):
    """The plan against the spec's budget. `amount_usd` is the plan's estimate: the figure
    `--approve-cost` must name when `over`."""

    scopes: list[BudgetScope] = Field(default_factory=list)
    amount_usd: float = 0.0

    @property
    def over(self) -> bool:
        return any(s.exceeded for s in self.scopes)

    def scope(self, name: str) -> BudgetScope | None:
        return next((s for s in self.scopes if s.scope == name), None)


def _ceiling(limit: float | None, approved: float | None) -> float | None:
    if limit is None:
        return None
    return limit if approved is None else max(limit, approved)


# --------------------------------------------------------------------------- spend


def record_spend(rec: NodeRecord, resources: Resources | None, price_per_hour: float | None, now: float) -> tuple[float, float]:
    """(dollars, GPU-hours) a stage's record measured: every accounted run, reruns included,
    plus the running attempt's elapsed time so far (accounted only once it ends)."""
    usd = max(rec.spent_usd, rec.cost_usd)
    gpu_seconds = max(rec.spent_gpu_seconds, rec.gpu_seconds)
    if rec.status == "running" and rec.run is not None and rec.run.accounted_s is None and resources is not None:
        running_for = max(0.0, now - rec.run.started_at)
        gpu_seconds += running_for * gpu_count(resources)
        usd += running_for / 3600 * (price_per_hour or 0.0)
    return round(usd, 4), round(gpu_seconds / 3600, 4)


def spent_by_stage(spec: Spec, state: State | None, now: float) -> dict[str, tuple[float, float]]:
    """Measured spend per recorded stage name (stages no longer in the spec included)."""
    out: dict[str, tuple[float, float]] = {}
    for addr, rec in (state.nodes if state else {}).items():
        kind, _, name = addr.partition(".")
        if kind != "stage":
            continue
        stage = spec.stages.get(name)
        resources = stage.resources if stage is not None else _recorded_resources(rec)
        price = hourly_usd(resources, spec.pricing) if resources is not None else None
        out[name] = record_spend(rec, resources, price, now)
    return out


def _recorded_resources(rec: NodeRecord) -> Resources | None:
    """The resources a removed stage ran with, from its recorded config."""
    raw = rec.config.get("resources")
    if not isinstance(raw, dict):
        return None
    try:
        return Resources.model_validate(raw)
    except ValueError:
        return None


# --------------------------------------------------------------------------- the check


class PlannedCost(Frozen):
    """What the plan would start for one stage (the budget's view of a planned change)."""

    address: str
    estimate: Estimate
    known: bool  # False: no seconds_per_step or unknown step count


def check_budget(
    spec: Spec, state: State | None, planned: Iterable[PlannedCost], *, now: float,
) -> tuple[BudgetCheck | None, dict[str, list[str]]]:
    """The budget check of a plan, and the scopes each planned stage pushes over its cap
    (by address); (None, {}) when the spec has no budget."""
    budget = spec.budget
    planned = list(planned)
    amount = round(sum(p.estimate.usd for p in planned), 2)
    if budget is None:
        return None, {}
    spent = spent_by_stage(spec, state, now)
    approval = state.cost_approvals[-1] if state and state.cost_approvals else None
    scopes: list[BudgetScope] = []
    marks: dict[str, list[str]] = {}
    for scope, limit_usd, limit_gpu, members in _scopes(budget, spec):
        in_scope = [p for p in planned if members is None or p.address.partition(".")[2] in members]
        spent_usd = sum(u for n, (u, _) in spent.items() if members is None or n in members)
        spent_gpu = sum(g for n, (_, g) in spent.items() if members is None or n in members)
        line = BudgetScope(
            scope=scope, limit_usd=limit_usd, limit_gpu_hours=limit_gpu,
            approved_usd=approval.projected_usd.get(scope) if approval else None,
            approved_gpu_hours=approval.projected_gpu_hours.get(scope) if approval else None,
            spent_usd=round(spent_usd, 2), spent_gpu_hours=round(spent_gpu, 4),
            planned_usd=round(sum(p.estimate.usd for p in in_scope), 2),
            planned_gpu_hours=round(sum(p.estimate.gpu_hours for p in in_scope), 4),
            unknown=[p.address for p in in_scope if not p.known and not (approval and p.address in approval.unpriced)],
        )
        exceeded, crossing = _exceeded(line, in_scope)
        scopes.append(line.model_copy(update={"exceeded": exceeded}))
        for address in crossing:
            marks.setdefault(address, []).append(scope)
    return BudgetCheck(scopes=scopes, amount_usd=amount), marks


def _scopes(budget: Budget, spec: Spec) -> list[tuple[str, float | None, float | None, set[str] | None]]:
    out: list[tuple[str, float | None, float | None, set[str] | None]] = []
    if budget.usd is not None or budget.gpu_hours is not None:
        out.append((SPEC_SCOPE, budget.usd, budget.gpu_hours, None))
    for name, cap in budget.stages.items():
        out.append((f"stage.{name}", cap.usd, cap.gpu_hours, {name}))
    return out


def _exceeded(line: BudgetScope, in_scope: list[PlannedCost]) -> tuple[list[str], list[str]]:
    """What the plan exceeds in this scope, and the planned stages from which on it does
    (in plan order: the first one that crosses a cap, and every one after it)."""
    if not in_scope:
        return [], []  # the plan adds nothing here: an overspent scope is status's news, not the plan's
    exceeded: list[str] = []
    usd_cap, gpu_cap = line.ceiling_usd, line.ceiling_gpu_hours
    if usd_cap is not None and line.projected_usd > usd_cap + USD_SLACK:
        exceeded.append("usd")
    if gpu_cap is not None and line.projected_gpu_hours > gpu_cap + GPU_HOURS_SLACK:
        exceeded.append("gpu_hours")
    if line.unknown:
        exceeded.append("unknown cost")
    crossing: list[str] = []
    crossed = False
    usd, gpu = line.spent_usd, line.spent_gpu_hours
    for p in in_scope:
        usd, gpu = usd + p.estimate.usd, gpu + p.estimate.gpu_hours
        crossed = crossed or ("usd" in exceeded and usd_cap is not None and usd > usd_cap + USD_SLACK)
        crossed = crossed or ("gpu_hours" in exceeded and gpu_cap is not None and gpu > gpu_cap + GPU_HOURS_SLACK)
        if crossed or p.address in line.unknown:
            crossing.append(p.address)
    return exceeded, crossing


# --------------------------------------------------------------------------- approval


def parse_amount(text: str) -> float:
    """`16000`, `16,000.00` or `$16,000.00` -> 16000.0; a clear error otherwise."""
    cleaned = text.strip().replace(",", "").replace("_", "").removeprefix("$").strip()
    try:
        value = float(cleaned)
    except ValueError:
        raise TerminalError(
            f"--approve-cost {text!r} is not an amount", hint="name the dollars the plan shows, e.g. --approve-cost 1234.56",
        ) from None
    if not value >= 0 or value == float("inf"):
        raise TerminalError(f"--approve-cost {text!r} is not an amount", hint="name a dollar amount of 0 or more")
    return round(value, 2)


def money(usd: float) -> str:
    return f"${usd:,.2f}"


def approval_problem(check: BudgetCheck | None, approved: float | None) -> str | None:
    """Why an apply of this plan must be refused (None: it may go ahead)."""
    if check is None or not check.over:
        return None
    what = "; ".join(f"{scope_label(s.scope)}: {exceeded_text(s)}" for s in check.scopes if s.exceeded)
    if approved is None:
        return f"the plan exceeds the budget ({what})"
    if round(approved, 2) != round(check.amount_usd, 2):
        return (f"--approve-cost {money(approved)} does not match the plan's estimate {money(check.amount_usd)} "
                f"(a changed estimate needs a new approval) and the plan exceeds the budget ({what})")
    return None


def require_approval(check: BudgetCheck | None, approved: float | None) -> None:
    problem = approval_problem(check, approved)
    if problem is None:
        return
    assert check is not None
    raise BudgetExceededError(
        "Over budget: nothing was applied",
        problem,
        f"review the plan's cost, then approve exactly it: `retool apply ... --approve-cost {check.amount_usd:.2f}` "
        "(or raise `budget` in the spec)",
    )


def approval_record(check: BudgetCheck, by: str, now: float) -> CostApproval:
    """What state remembers of an approved over-budget plan: later plans may reach the
    projected totals it accepted without asking again."""
    return CostApproval(
        usd=check.amount_usd, by=by, at=now,
        projected_usd={s.scope: s.projected_usd for s in check.scopes if s.limit_usd is not None},
        projected_gpu_hours={s.scope: s.projected_gpu_hours for s in check.scopes if s.limit_gpu_hours is not None},
        unpriced=sorted({a for s in check.scopes for a in s.unknown}),
    )


# --------------------------------------------------------------------------- wording


def scope_label(scope: str) -> str:
    return "the spec" if scope == SPEC_SCOPE else scope


def exceeded_text(line: BudgetScope) -> str:
    """`$16,000.00 projected > $10,000.00 cap` and the like, for one scope."""
    parts: list[str] = []
    if "usd" in line.exceeded:
        parts.append(f"{money(line.projected_usd)} projected > {money(line.ceiling_usd or 0)}"
                     f"{' approved' if line.ceiling_usd != line.limit_usd else ' cap'}")
    if "gpu_hours" in line.exceeded:
        parts.append(f"{line.projected_gpu_hours:,.1f} GPU-h projected > {line.ceiling_gpu_hours or 0:,.1f} GPU-h"
                     f"{' approved' if line.ceiling_gpu_hours != line.limit_gpu_hours else ' cap'}")
    if "unknown cost" in line.exceeded:
        parts.append(f"cost unknown for {', '.join(line.unknown)} (no seconds_per_step or step count)")
    return ", ".join(parts)


def scope_text(line: BudgetScope) -> str:
    """`spent $120.00 + plan $900.00 = $1,020.00 of $1,000.00 · ... — OVER`, for one scope."""
    parts: list[str] = []
    if line.limit_usd is not None:
        parts.append(f"spent {money(line.spent_usd)} + plan {money(line.planned_usd)} = "
                     f"{money(line.projected_usd)} of {money(line.limit_usd)}")
    if line.limit_gpu_hours is not None:
        parts.append(f"spent {line.spent_gpu_hours:,.1f} + plan {line.planned_gpu_hours:,.1f} = "
                     f"{line.projected_gpu_hours:,.1f} of {line.limit_gpu_hours:,.1f} GPU-h")
    if line.approved_usd is not None or line.approved_gpu_hours is not None:
        approved = [money(line.approved_usd)] if line.approved_usd is not None else []
        approved += [f"{line.approved_gpu_hours:,.1f} GPU-h"] if line.approved_gpu_hours is not None else []
        parts.append(f"approved up to {' / '.join(approved)}")
    verdict = "OVER" if line.exceeded else "within"
    return f"{' · '.join(parts)} — {verdict}"
