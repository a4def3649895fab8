"""Status: where every node stands, from recorded state plus what the runtime observes.

Per node (docs/plan-apply-status.md, "Status"): sync (in sync / out of sync / missing) comes from the same
plan `retool plan` shows, so both agree on what changed and why; health (healthy /
idle / progressing / failed / lost) from the record and the observed run; plus the fingerprint
it last ran with and, for stages, step/total, latest valid checkpoint, elapsed time and
cost so far, the latest metrics (loss, lr, grad_norm; RL reward, response length, tool calls)
with a sparkline of loss/reward and the W&B run URL — the running run's as observed, a
finished one's as finalize recorded them. `compute_status` is pure; `render_status` draws it.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from reconciler.budget import GPU_HOURS_SLACK, USD_SLACK, BudgetCheck
from reconciler.evaluations import SUMMARY, EvalTable, eval_table
from reconciler.graph import address_kind
from reconciler.plan import Observed, ObservedNode, Plan, PlannedChange, ReasonCode
from reconciler.spec import Expectation, RLStage, SFTStage, Spec
from reconciler.state.base import LockInfo, NodeRecord, State, WandbRun
from reconciler.steps import hourly_usd
from reconciler.metric_names import display

Sync = Literal["in sync", "out of sync", "missing"]
Health = Literal["healthy", "idle", "progressing", "failed", "lost"]  # idle: stopped on purpose, starts on demand
FINGERPRINT_CHARS = 12
FINGERPRINT_SHOWN = 8  # in the table; --json has FINGERPRINT_CHARS


class ExpectationStatus(BaseModel):
    """One `expect:` entry next to what the run reported: `met`, `below`, or `not measured` (no value yet)."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    metric: str
    expected: str  # ">= 0.4"
    at_step: int | None = None
    source: str
    reached: float | None = None
    verdict: Literal["met", "below", "not measured"] = "not measured"


class NodeStatus(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    address: str
    kind: str
    sync: Sync
    health: Health | None = None  # None: nothing exists yet
    action: str = "no-op"  # what `retool apply` would do
    reasons: list[str] = Field(default_factory=list)  # the plan's reasons for `action`
    reason_codes: list[ReasonCode] = Field(default_factory=list)  # one per reason (docs/plan-reasons.md)
    fingerprint: str | None = None  # restart identity it last ran with (short)
    step: int | None = None
    total: int | None = None
    latest_checkpoint: int | None = None
    invalid_checkpoints: list[str] = Field(default_factory=list)
    elapsed_s: float | None = None
    cost_usd: float = 0.0
    message: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)  # latest: loss, lr, grad_norm / reward, ...
    sparklines: dict[str, str] = Field(default_factory=dict)  # {"loss": "▇▅▃▂▁"} or {"reward": ...}
    wandb_url: str | None = None
    wandb: WandbRun | None = None  # its W&B run: URL online; run folder(s) and `wandb sync` offline
    expectations: list[ExpectationStatus] = Field(default_factory=list)  # the stage's `expect:`, vs reached


class BudgetSpend(BaseModel):
    """One budget scope: measured spend against its cap (and what `retool apply` would add)."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    scope: str  # "spec" or "stage.<name>"
    spent_usd: float
    spent_gpu_hours: float
    limit_usd: float | None = None
    limit_gpu_hours: float | None = None
    pending_usd: float = 0.0  # the current plan's estimate in this scope
    pending_gpu_hours: float = 0.0
    over: bool = False  # spent alone is above a cap

    def text(self) -> str:
        parts: list[str] = []
        if self.limit_usd is not None:
            parts.append(f"spent ${self.spent_usd:,.2f} of ${self.limit_usd:,.2f} ({_share(self.spent_usd, self.limit_usd)})")
        if self.limit_gpu_hours is not None:
            parts.append(f"{self.spent_gpu_hours:,.1f} of {self.limit_gpu_hours:,.1f} GPU-h "
                         f"({_share(self.spent_gpu_hours, self.limit_gpu_hours)})")
        if self.pending_usd or self.pending_gpu_hours:
            parts.append(f"apply would add ${self.pending_usd:,.2f}, {self.pending_gpu_hours:,.1f} GPU-h (estimate)")
        return f"{self.scope}: {' · '.join(parts)}"


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def budget_spend(check: BudgetCheck | None) -> list[BudgetSpend]:
    """Spent against each capped scope, from the plan's budget check (measured, not estimated)."""
    if check is None:
        return []
    return [
        BudgetSpend(
            scope=s.scope, spent_usd=round(s.spent_usd, 2), spent_gpu_hours=round(s.spent_gpu_hours, 4),
            limit_usd=s.limit_usd, limit_gpu_hours=s.limit_gpu_hours,
            pending_usd=s.planned_usd, pending_gpu_hours=s.planned_gpu_hours,
            over=(s.limit_usd is not None and s.spent_usd > s.limit_usd + USD_SLACK)
            or (s.limit_gpu_hours is not None and s.spent_gpu_hours > s.limit_gpu_hours + GPU_HOURS_SLACK),
        )
        for s in check.scopes
    ]


class StatusReport(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    spec: str
    spec_name: str
    backend: str
    serial: int
    lineage: str
    refreshed: bool
    notes: list[str] = Field(default_factory=list)
    lock: LockInfo | None = None
    nodes: list[NodeStatus] = Field(default_factory=list)
    cost_usd: float = 0.0
    evaluations: EvalTable = Field(default_factory=EvalTable)  # eval stages' metrics per dataset
    budget: list[BudgetSpend] = Field(default_factory=list)  # the spec's `budget`, scope by scope

    @property
    def in_sync(self) -> bool:
        return all(n.sync == "in sync" for n in self.nodes)


def _sync(rec: NodeRecord | None, change: PlannedChange | None) -> Sync:
    if rec is None:
        return "missing"
    if change is None or change.action == "no-op":
        return "in sync"
    return "out of sync"


def _health(rec: NodeRecord | None, seen: ObservedNode | None) -> tuple[Health | None, str]:
    """Health and the message explaining it."""
    if rec is None:
        return None, ""
    if rec.status == "running" and seen is not None and seen.run_state is not None:
        if seen.run_state == "running":
            return "progressing", seen.message or "running"
        if seen.run_state == "succeeded":
            return "progressing", "run finished; `retool apply` records its result"
        if seen.run_state == "lost":
            return "lost", seen.message or "the run is gone; `retool apply` resumes it from its latest checkpoint"
        return "failed", seen.message or "the run failed; `retool apply` resumes it from its latest checkpoint"
    if rec.status == "succeeded" and seen is not None and seen.idle:
        return "idle", seen.idle
    mapping: dict[str, Health | None] = {
        "succeeded": "healthy", "running": "progressing", "failed": "failed", "lost": "lost",
        "cancelled": "failed", "pending": None,
    }
    return mapping.get(rec.status), rec.message


def _elapsed(rec: NodeRecord, now: float) -> float | None:
    if rec.started_at is None:
        return None
    end = now if rec.status == "running" else (rec.finished_at or rec.updated_at)
    return max(0.0, end - rec.started_at)


def _latest(rec: NodeRecord | None, seen: ObservedNode | None) -> tuple[dict[str, float], object, object] | None:
    """(latest values by verl key, sparklines, W&B URL): the running run's as observed, or
    what finalize recorded for the finished one; None when there are none."""
    values: object
    lines: object
    url: object
    if seen is not None and seen.run_state is not None and (seen.metrics or seen.sparklines or seen.wandb_url):
        values, lines, url = seen.metrics, seen.sparklines, seen.wandb_url
    elif rec is not None and rec.status == "succeeded":
        values, lines, url = rec.outputs.get("final_metrics"), rec.outputs.get("sparklines"), rec.outputs.get("wandb_url")
    else:
        return None
    numbers = {k: float(v) for k, v in (values if isinstance(values, dict) else {}).items() if isinstance(v, int | float)}
    return numbers, lines, url


def _expectations(expect: list[Expectation], numbers: dict[str, float]) -> list[ExpectationStatus]:
    out: list[ExpectationStatus] = []
    for e in expect:
        reached = numbers.get(e.metric)
        verdict = "not measured" if reached is None else ("met" if e.met_by(reached) else "below")
        out.append(ExpectationStatus(
            metric=e.metric, expected=e.bound_text(), at_step=e.at_step, source=e.source, reached=reached,
            verdict=verdict,
        ))
    return out


def stage_wandb(rec: NodeRecord | None, seen: ObservedNode | None = None) -> WandbRun | None:
    """The stage's W&B run: as the backend observes it now, else as finalize recorded it,
    else as its launch named it."""
    if seen is not None and seen.wandb is not None:
        return seen.wandb
    if rec is None:
        return None
    recorded = rec.outputs.get("wandb") if rec.status == "succeeded" else None
    if isinstance(recorded, dict):
        try:
            return WandbRun.model_validate(recorded)
        except ValueError:
            pass
    return rec.run.wandb if rec.run is not None else None


def _metrics(rec: NodeRecord | None, seen: ObservedNode | None) -> dict[str, object]:
    """A stage's latest metrics (short names), sparkline and W&B run."""
    run = stage_wandb(rec, seen)
    out: dict[str, object] = {"wandb": run} if run is not None else {}
    latest = _latest(rec, seen)
    if latest is None:
        return out
    numbers, lines, url = latest
    return {
        **out, "metrics": display(numbers), "sparklines": dict(lines) if isinstance(lines, dict) else {},
        "wandb_url": url if isinstance(url, str) else (run.url if run is not None else None),
    }


def _node_status(
    address: str, rec: NodeRecord | None, change: PlannedChange | None, seen: ObservedNode | None,
    spec: Spec, now: float,
) -> NodeStatus:
    health, message = _health(rec, seen)
    fields: dict[str, object] = {}
    if address_kind(address) == "stage":
        step = seen.step if seen is not None and seen.step is not None else (rec.steps_done if rec else None)
        total = (rec.total_steps if rec and rec.total_steps is not None else None) or (change.total_steps if change else None)
        latest = seen.latest_valid_checkpoint if seen is not None else None
        if latest is None and rec is not None and rec.status == "succeeded":
            latest = rec.outputs.get("final_step")
        cost = rec.cost_usd if rec else 0.0
        elapsed = _elapsed(rec, now) if rec else None
        name = address.split(".", 1)[1]
        if rec is not None and rec.status == "running" and rec.run is not None and name in spec.stages:
            # The running attempt is not accounted in the record until it ends.
            running_for = max(0.0, now - rec.run.started_at)
            cost += running_for / 3600 * (hourly_usd(spec.stages[name].resources, spec.pricing) or 0.0)
        fields.update(
            step=step, total=total, latest_checkpoint=latest, elapsed_s=elapsed, cost_usd=round(cost, 2),
            invalid_checkpoints=list(seen.invalid_checkpoints) if seen is not None else [],
            **_metrics(rec, seen),
        )
        # Training stages; eval stages' expectations sit in the evaluation table (reconciler.evaluations).
        trained = spec.stages.get(name)
        expect = trained.expect if isinstance(trained, SFTStage | RLStage) else []
        if expect:
            fields["expectations"] = _expectations(expect, (_latest(rec, seen) or ({}, None, None))[0])
    if change is not None and change.action == "delete":
        message = message or "removed from the spec"
    elif change is not None and change.action == "blocked":
        message = "; ".join(change.reasons)
    return NodeStatus(
        address=address,
        kind=address_kind(address),
        sync=_sync(rec, change),
        health=health,
        action=change.action if change is not None else "no-op",
        reasons=list(change.reasons) if change is not None else [],
        reason_codes=list(change.reason_codes) if change is not None else [],
        fingerprint=rec.restart_id[:FINGERPRINT_CHARS] if rec and rec.restart_id else None,
        message=message,
        **fields,
    )


def compute_status(
    plan: Plan, spec: Spec, state: State | None, observed: Observed, *,
    lock: LockInfo | None = None, now: float | None = None,
) -> StatusReport:
    """One row per node of the plan (spec nodes in order, then removed ones)."""
    now = time.time() if now is None else now
    recs = state.nodes if state else {}
    addresses = [c.address for c in plan.changes]
    addresses += [a for a in sorted(recs) if a not in addresses]
    nodes = [
        _node_status(a, recs.get(a), plan.change(a), observed.nodes.get(a), spec, now) for a in addresses
    ]
    return StatusReport(
        spec=plan.spec, spec_name=plan.spec_name, backend=plan.backend,
        serial=state.serial if state else 0, lineage=state.lineage if state else "",
        refreshed=observed.refreshed, notes=list(observed.notes), lock=lock, nodes=nodes,
        cost_usd=round(sum(n.cost_usd for n in nodes), 2), evaluations=eval_table(spec, state),
        budget=budget_spend(plan.budget),
    )


# --------------------------------------------------------------------------- rendering

_SYNC_STYLE = {"in sync": "green", "out of sync": "yellow", "missing": "dim"}
_HEALTH_STYLE = {"healthy": "green", "idle": "green", "progressing": "cyan", "failed": "red", "lost": "magenta"}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def render_status(report: StatusReport, console: Console) -> None:
    """The human view of `retool status`."""
    head = Text(f"{report.spec_name} ({report.backend}) · state serial {report.serial}", style="bold")
    if not report.refreshed:
        head.append(" · not refreshed", style="yellow")
    console.print(head)
    for note in report.notes:
        console.print(Text(f"note: {note}", style="yellow"))
    if report.lock is not None:
        lk = report.lock
        console.print(Text(f"locked by {lk.who} (pid {lk.pid}) running `{lk.command}`, lock {lk.id}", style="yellow"))
    rows: list[list[Text]] = []
    for n in report.nodes:
        step = ""
        if n.kind == "stage" and (n.step is not None or n.total is not None):
            step = f"{n.step if n.step is not None else '?'}/{n.total if n.total is not None else '?'}"
        message = n.message
        if n.invalid_checkpoints:
            message = (message + "; " if message else "") + "invalid: " + ", ".join(n.invalid_checkpoints)
        if n.sync != "in sync" and n.reasons and not message:
            message = "; ".join(n.reasons)
        rows.append([
            Text(n.address),
            Text(n.sync, style=_SYNC_STYLE[n.sync]),
            Text(n.health or "-", style=_HEALTH_STYLE.get(n.health or "", "dim")),
            Text(n.fingerprint[:FINGERPRINT_SHOWN] if n.fingerprint else "-"),
            Text(step),
            Text("" if n.latest_checkpoint is None else str(n.latest_checkpoint)),
            Text(format_duration(n.elapsed_s)),
            Text(f"${n.cost_usd:,.2f}" if n.kind == "stage" and n.cost_usd else ""),
            Text(message),
        ])
    # Every column but the message keeps its full width; the message wraps, or, on a
    # terminal too narrow for it, goes under the table.
    headers = ("address", "sync", "health", "fingerprint", "step", "ckpt", "elapsed", "cost", "message")
    widths = [max([len(col), *(len(r[i].plain) for r in rows)]) for i, col in enumerate(headers[:-1])]
    inline = console.width - (sum(widths) + 2 * len(widths)) >= 24
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, width in zip(headers, widths):
        table.add_column(col, no_wrap=True, min_width=width)
    if inline:
        table.add_column("message", overflow="fold", ratio=1)
    for row in rows:
        table.add_row(*(row if inline else row[:-1]))
    console.print(table)
    if not inline:
        for row in rows:
            if row[-1].plain:
                console.print(Text(f"  {row[0].plain}: ").append(row[-1]))
    _render_metrics(report, console)
    _render_expectations(report, console)
    render_evaluations(report.evaluations, console)
    if report.cost_usd:
        console.print(Text(f"cost so far: ${report.cost_usd:,.2f}"))
    for line in report.budget:
        console.print(Text(f"budget {line.text()}", style="bold red" if line.over else ""), soft_wrap=True)


def metrics_line(node: NodeStatus) -> Text:
    """`loss 0.471 ▇▆▅▃▂▁ · grad_norm 0.233 · lr 1e-05`: each latest value, the sparkline
    after the metric it draws (or at the end when that metric has no latest value)."""
    line = Text()
    for i, (name, value) in enumerate(node.metrics.items()):
        if i:
            line.append(" · ", style="dim")
        line.append(f"{name} ", style="dim").append(f"{value:.4g}")
        if name in node.sparklines:
            line.append(f" {node.sparklines[name]}", style="cyan")
    for name, spark in node.sparklines.items():
        if name not in node.metrics:
            line.append(f"{' · ' if line.plain else ''}{name} ", style="dim").append(spark, style="cyan")
    return line


def _render_metrics(report: StatusReport, console: Console) -> None:
    shown = [n for n in report.nodes if n.metrics or n.sparklines or n.wandb_url or n.wandb]
    if not shown:
        return
    console.print(Text("metrics", style="bold"))
    width = max(len(n.address) for n in shown)
    for n in shown:
        pad = f"  {n.address:<{width}}  "
        if n.metrics or n.sparklines:
            console.print(Text(pad).append(metrics_line(n)))
            pad = " " * len(pad)
        for line in wandb_lines(n.wandb, n.wandb_url):
            console.print(Text(pad).append_text(line))
            pad = " " * len(pad)


def wandb_lines(run: WandbRun | None, url: str | None = None) -> list[Text]:
    """`W&B <url>` online; offline the run's folder(s) and the `wandb sync` that uploads them."""
    url = url or (run.url if run is not None else None)
    if url:
        return [Text("W&B ", style="dim").append(url, style="link " + url)]
    if run is None:
        return []
    if run.mode == "online":
        return [Text("W&B ", style="dim").append(f"{run.project}/{run.run_id}").append(" (online, no URL yet)", style="dim")]
    lines = [Text("W&B offline ", style="dim").append(run.where() if run.run_dirs else f"run {run.run_id}, nothing written yet")]
    if run.sync_command:
        lines.append(Text("    upload: ", style="dim").append(run.sync_command))
    return lines


def render_evaluations(table: EvalTable, console: Console) -> None:
    """`evaluation`: one row per (eval stage, dataset), one column per metric; an expected
    value sits beside the reached one (`0.412 (>= 0.4 ✓)`). pass@k shows its largest k."""
    if not table.rows:
        return
    console.print(Text("evaluation", style="bold"))
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("stage", "model", "dataset", "n", *SUMMARY):
        grid.add_column(col, no_wrap=True)
    stacked: list[tuple[Text, Text]] = []
    for stage in table.stages():
        for dataset in table.datasets(stage):
            curve = table.pass_curve(stage, dataset)
            cells: list[Text] = []
            line = Text()
            for metric in SUMMARY:
                name = f"pass@{curve[-1][0]}" if metric == "pass@k" and curve else metric
                row = table.row(stage, dataset, name)
                cells.append(_eval_cell(row.value, row.expected, row.met, name) if row is not None else Text(""))
                if row is not None:
                    line.append(" · " if line else "").append(f"{name} ", style="dim")
                    line.append_text(_eval_cell(row.value, row.expected, row.met, metric))
            first = next(r for r in table.rows if r.stage == stage and r.dataset == dataset)
            grid.add_row(Text(stage), Text(first.model), Text(dataset), Text(str(first.samples)), *cells)
            stacked.append((Text(f"{stage} · {dataset} · {first.model} · n {first.samples}"), line))
    if Measurement.get(console, console.options.update_width(10_000), grid).maximum <= console.width:
        console.print(grid)
    else:  # too narrow for one row per result: a block each, its metrics wrapped beneath
        for head, line in stacked:
            console.print(head)
            console.print(Padding(line, (0, 0, 0, 2)), soft_wrap=False)  # the CLI's console soft-wraps: padding would crop
    for item in table.unmatched:
        console.print(Text(f"  expected metric not recorded: {item}", style="yellow"))


def _eval_cell(value: float, expected: str | None, met: bool | None, metric: str) -> Text:
    shown = f"{value:.1f}" if metric == "response_length" else f"{value:.3f}"
    if metric.startswith("pass@") and metric != "pass@k":
        shown = f"{metric[5:]}: {shown}"
    cell = Text(shown)
    if expected is not None:
        cell.append(f" ({expected} {'✓' if met else '✗'})", style="green" if met else "red")
    return cell


_VERDICT_STYLE = {"met": "green", "below": "red", "not measured": "dim"}


def _render_expectations(report: StatusReport, console: Console) -> None:
    """`stage.dapo  val-core/aime_2024/acc/mean@30 >= 0.4 (at step 150) · reached 0.433 · met`,
    the source dimmed beneath."""
    shown = [n for n in report.nodes if n.expectations]
    if not shown:
        return
    console.print(Text("expected", style="bold"))
    width = max(len(n.address) for n in shown)
    for n in shown:
        for e in n.expectations:
            line = Text(f"  {n.address:<{width}}  ").append(f"{e.metric} {e.expected}")
            if e.at_step is not None:
                line.append(f" (at step {e.at_step})", style="dim")
            line.append(" · reached ", style="dim").append("-" if e.reached is None else f"{e.reached:.4g}")
            verdict = "below so far" if e.verdict == "below" and n.health == "progressing" else e.verdict
            line.append(" · ", style="dim").append(verdict, style=_VERDICT_STYLE[e.verdict])
            console.print(line, soft_wrap=True)
            console.print(Text(f"  {'':<{width}}  source: {e.source}", style="dim"), soft_wrap=True)
