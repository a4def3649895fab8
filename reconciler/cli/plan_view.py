"""Views of a plan: rich text for people, JSON for machines, Markdown for PR comments.

The plan is data (reconciler/plan.py); these functions only format it (docs/architecture.md, "The plan is a value").
Text is built from `rich.text.Text` pieces, never markup strings, so spec values such as
`image.pip[2]` are never read as rich markup.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.text import Text

from reconciler.budget import BudgetCheck, exceeded_text, scope_label, scope_text
from reconciler.plan import Plan, PlannedChange
from reconciler.steps import Estimate

SYMBOL = {
    "create": "+", "update": "~", "resume": ">", "rerun": "-/+", "no-op": "=", "delete": "-", "blocked": "!",
}
STYLE = {
    "create": "green", "update": "yellow", "resume": "cyan", "rerun": "magenta", "no-op": "dim",
    "delete": "red", "blocked": "bold red",
}
ORDER = ("create", "update", "resume", "rerun", "delete", "blocked")
RUNS = frozenset({"create", "rerun", "resume"})


# --------------------------------------------------------------------------- shared wording


def summary_line(plan: Plan) -> str:
    counts = plan.counts()
    parts = [f"{counts[a]} to {a}" for a in ORDER if counts.get(a) and a != "blocked"]
    if counts.get("blocked"):
        parts.append(f"{counts['blocked']} blocked")
    unchanged = counts.get("no-op", 0)
    if not parts:
        return f"No changes: all {unchanged} nodes are in sync."
    return f"Plan: {', '.join(parts)}, {unchanged} unchanged."


def money(usd: float) -> str:
    return f"${usd:,.2f}"


def hours(h: float) -> str:
    return f"{h:,.1f} GPU-h"


def gpu_text(config: dict[str, Any]) -> str:
    res = config.get("resources") or {}
    if not res.get("gpu"):
        return "CPU"
    text = f"{res['gpu']}:{res.get('gpus_per_node', 0)}"
    nodes = int(res.get("nodes") or 1)
    return f"{text} x {nodes} nodes" if nodes > 1 else text


def estimate_text(change: PlannedChange) -> str | None:
    est = change.estimate
    if (change.action not in RUNS and change.action != "blocked") or est.steps <= 0:
        return None
    on = gpu_text(change.config)
    if est.seconds_per_step is None:
        return f"{est.steps} steps on {on} (no seconds_per_step: cost unknown)"
    wall = f"{est.steps * est.seconds_per_step / 3600:,.1f} h wall"
    segs = f", {est.segments} segment{'s' if est.segments != 1 else ''}"
    cost = f"{hours(est.gpu_hours)} ({wall})" if on != "CPU" else wall
    return (
        f"{est.steps} steps × {est.seconds_per_step:g} s/step ({source_label(est, on)}) on {on} ≈ {cost}, "
        f"{money(est.usd)}{segs}"
    )


BASIS_LABEL = {"measured": "measured", "derived": "derived", "guess": "spec guess"}


def source_label(est: Estimate, on: str) -> str:
    """Where the step time comes from: this stage's own run, or the spec's basis."""
    if est.source == "measured":
        return f"measured on {on} by this stage's run"
    return BASIS_LABEL[est.basis or "guess"]


def step_time_text(change: PlannedChange) -> str | None:
    """The step time's basis and uncertainty: the spec's range priced like the estimate, or,
    once a run measured it, how far the spec's figure was from the measurement."""
    est = change.estimate
    if (change.action not in RUNS and change.action != "blocked") or est.steps <= 0 or not est.seconds_per_step:
        return None
    if est.source == "measured":
        text = f"measured {est.seconds_per_step:g} s/step (elapsed / steps of the last attempt)"
        if est.spec_seconds_per_step:
            off = est.seconds_per_step / est.spec_seconds_per_step - 1
            text += f"; the spec's {BASIS_LABEL[est.basis or 'guess']} {est.spec_seconds_per_step:g} s was {off:+.0%} off"
        return text
    if est.basis is None:
        return None  # "(spec guess)" on the estimate line says it all
    low, high = est.low_s or est.seconds_per_step, est.high_s or est.seconds_per_step
    scale = est.usd / est.seconds_per_step
    return (
        f"{est.basis_detail}; {low:g}–{high:g} s/step ≈ {money(low * scale)}–{money(high * scale)}"
    )


def detail_lines(change: PlannedChange) -> list[str]:
    """The indented lines under a node: field diffs, resume point, discards, estimate, notes."""
    lines = list(change.diff)
    if change.action == "resume" and change.resume_from is not None:
        of = f" of {change.total_steps}" if change.total_steps is not None else ""
        lines.append(f"resume from step {change.resume_from}{of}")
    if change.action == "rerun" and change.discard_steps:
        lines.append(f"discards {change.discard_steps} finished steps ({hours(change.discard_gpu_hours)})")
    est = estimate_text(change)
    if est:
        lines.append(f"estimate{' once unblocked' if change.action == 'blocked' else ''}: {est}")
        basis = step_time_text(change)
        if basis:
            lines.append(f"step time: {basis}")
    if change.over_budget:
        lines.append(f"over budget: {', '.join(scope_label(s) for s in change.over_budget)}")
    lines += [f"note: {n}" for n in change.notes]
    return lines


def budget_lines(budget: BudgetCheck | None) -> list[str]:
    """The budget under the plan's totals: one line per capped scope, then what to do."""
    if budget is None:
        return []
    lines = [f"Budget for {scope_label(s.scope)}: {scope_text(s)}" for s in budget.scopes]
    if budget.over:
        lines += [f"Over budget for {scope_label(s.scope)}: {exceeded_text(s)}" for s in budget.scopes if s.exceeded]
        lines.append(f"Apply refuses this plan unless approved: `retool apply --approve-cost {budget.amount_usd:.2f}`.")
    return lines


def total_line(total: Estimate) -> str:
    if total.steps <= 0:
        return "Estimate: nothing to run."
    return f"Estimate: {hours(total.gpu_hours)}, {money(total.usd)} for {total.steps} steps."


# --------------------------------------------------------------------------- rich text


def render_plan(plan: Plan, console: Console, *, show_unchanged: bool = True) -> None:
    """One line per node (symbol, action, address, reasons), details indented, totals."""
    serial = f"state serial {plan.serial}" if plan.lineage else "no recorded state"
    console.print(Text(f"retool plan · {plan.spec_name} ({plan.backend}) · {serial}", style="bold"))
    console.print()
    shown = [c for c in plan.changes if show_unchanged or c.action != "no-op" or c.notes]
    width = max((len(c.address) for c in shown), default=0)
    for change in shown:
        style = STYLE[change.action]
        line = Text("  ")
        line.append(f"{SYMBOL[change.action]:>3} {change.action:<7} ", style=style)
        address_style = "bold" if change.action != "no-op" else "dim"
        if change.reasons:
            line.append(change.address.ljust(width), style=address_style)
            line.append("  " + "; ".join(change.reasons), style="dim" if change.action == "no-op" else "")
        else:
            line.append(change.address, style=address_style)
        console.print(line, soft_wrap=True)  # long lines wrap in the terminal, not mid-word by rich
        for detail in detail_lines(change):
            style = "yellow" if detail.startswith("note:") else ""
            console.print(Text("        " + detail, style=style), soft_wrap=True)
    console.print()
    console.print(Text(summary_line(plan), style="bold"))
    console.print(Text(total_line(plan.total)))
    for budget_line in budget_lines(plan.budget):
        alarm = budget_line.startswith(("Over budget", "Apply refuses"))
        console.print(Text(budget_line, style="bold red" if alarm else ""), soft_wrap=True)
    blocked = [c.estimate for c in plan.changes if c.action == "blocked" and c.estimate.steps > 0]
    if blocked:
        gpu_h, usd = sum(e.gpu_hours for e in blocked), sum(e.usd for e in blocked)
        console.print(Text(f"Blocked stages, once they can run: {hours(gpu_h)}, {money(usd)}.", style="yellow"))
    for warning in plan.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))


def plan_text(plan: Plan, *, width: int = 100) -> str:
    """The rich rendering as plain text (no colour): golden files, logs, `--out` previews."""
    console = Console(width=width, color_system=None, force_terminal=False, record=True, file=io.StringIO())
    render_plan(plan, console)
    return console.export_text(styles=False)


# --------------------------------------------------------------------------- Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def plan_markdown(plan: Plan) -> str:
    """A PR comment: summary, a table of the nodes that change, their diffs, warnings."""
    out = [f"### retool plan: `{plan.spec_name}` ({plan.backend})", ""]
    est = "" if plan.total.steps <= 0 else f" · estimate **{hours(plan.total.gpu_hours)}, {money(plan.total.usd)}**"
    out += [f"**{summary_line(plan)}**{est}", ""]
    if plan.budget is not None:
        head = "**Over budget**" if plan.budget.over else "Within budget"
        out += [f"{head} · cost of this plan **{money(plan.budget.amount_usd)}**", ""]
        out += [f"- {_cell(line)}" for line in budget_lines(plan.budget)]
        out.append("")
    changed = [c for c in plan.changes if c.action != "no-op" or c.notes]
    if changed:
        out += ["| | Address | Action | Why | Estimate |", "|---|---|---|---|---|"]
        for c in changed:
            action: str = c.action
            if c.action == "resume" and c.resume_from is not None:
                action += f" from step {c.resume_from}"
            if c.action == "rerun" and c.discard_steps:
                action += f" (discards {c.discard_steps} steps)"
            if c.over_budget:
                action += " **over budget**"
            cost = "" if c.action not in RUNS or c.estimate.steps <= 0 else (
                f"{c.estimate.steps} steps, {hours(c.estimate.gpu_hours)}, {money(c.estimate.usd)}"
            )
            out.append(
                f"| `{SYMBOL[c.action]}` | `{c.address}` | {_cell(action)} | {_cell('; '.join(c.reasons))} | {cost} |"
            )
        out.append("")
    details = [(c, [d for d in detail_lines(c) if not d.startswith("estimate:")]) for c in changed]
    details = [(c, lines) for c, lines in details if lines]
    if details:
        out += ["<details><summary>Details</summary>", "", "```"]
        for c, lines in details:
            out.append(f"{SYMBOL[c.action]} {c.address}")
            out += [f"    {line}" for line in lines]
        out += ["```", "", "</details>", ""]
    for warning in plan.warnings:
        out.append(f"> **warning:** {_cell(warning)}")
    if plan.warnings:
        out.append("")
    return "\n".join(out)
