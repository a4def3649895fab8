"""`retool report`: one self-contained HTML page about a pipeline (no network, no script).

Sections: each training stage's curves from its per-step metrics (SFT loss; RL reward,
response length, tool calls per response, validation accuracy), the evaluation table
(eval stage × dataset × metric, expected beside reached), and pass@k curves per evaluated
model. Charts are inline SVG drawn here; styles are inline CSS. `render_report` is pure:
the command gathers the data (state, the backend's metric files) and hands it over.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from reconciler.backend import ReadsMetrics
from reconciler.evaluations import SUMMARY, EvalTable, eval_table
from reconciler.spec import Spec
from reconciler.state.base import State, WandbRun
from reconciler.status import stage_wandb

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777")

Series = list[tuple[float, float]]


class StageCurves(BaseModel):
    """One training stage's per-step metrics (trainer keys -> [(step, value)])."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    address: str
    kind: str
    status: str = ""
    steps: str = ""  # "96/96"
    series: dict[str, Series] = Field(default_factory=dict)
    note: str = ""  # why there are no curves, when there are none
    wandb: WandbRun | None = None  # where the same metrics are in W&B


class ReportData(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    spec_name: str
    backend: str
    serial: int = 0
    created_at: float = Field(default_factory=time.time)
    stages: list[StageCurves] = Field(default_factory=list)
    evaluations: EvalTable = Field(default_factory=EvalTable)


# Which charts a stage kind gets: (title, [(trainer key, legend)], y label).
CHARTS: dict[str, list[tuple[str, list[tuple[str, str]], str]]] = {
    "sft": [("loss", [("train/loss", "train"), ("val/loss", "validation")], "loss")],
    "rl": [
        ("reward", [("critic/score/mean", "mean reward")], "reward"),
        ("response length", [("response_length/mean", "mean"), ("response_length/max", "max")], "tokens"),
        ("tool calls per response", [("tool_calls", "mean")], "calls"),
    ],
}


def _rl_extra(series: dict[str, Series]) -> dict[str, Series]:
    """Tool calls from verl's num_turns ((turns - 2) / 2, the reward's own counting)."""
    out = dict(series)
    if "num_turns/mean" in series and "tool_calls" not in series:
        out["tool_calls"] = [(x, (y - 2) / 2) for x, y in series["num_turns/mean"]]
    return out


def _val_keys(series: dict[str, Series]) -> list[str]:
    return sorted(k for k in series if k.startswith("val-core/") and "/acc/" in k)


# --------------------------------------------------------------------------- SVG


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_chart(
    title: str, lines: Sequence[tuple[str, Series]], *, x_label: str = "step", y_label: str = "",
    width: int = 440, height: int = 240, log2_x: bool = False, y_range: tuple[float, float] | None = None,
) -> str:
    """An inline SVG line chart (points marked when a line has few of them)."""
    lines = [(name, [(x, y) for x, y in pts if math.isfinite(y)]) for name, pts in lines]
    lines = [(name, pts) for name, pts in lines if pts]
    esc = html.escape
    if not lines:
        return f'<div class="chart empty">{esc(title)}: no data</div>'
    left, right, top, bottom = 56, 12, 28, 40
    pw, ph = width - left - right, height - top - bottom
    tx = (lambda x: math.log2(x)) if log2_x else (lambda x: x)
    xs = [tx(x) for _, pts in lines for x, _ in pts]
    ys = [y for _, pts in lines for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
    px = lambda x: left + (tx(x) - x0) / (x1 - x0) * pw  # noqa: E731
    py = lambda y: top + (1 - (y - y0) / (y1 - y0)) * ph  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(title)}">',
        f'<text x="{left}" y="16" class="t">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
    ]
    for v in _ticks(y0, y1):
        y = py(v)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="ax" text-anchor="end">{_fmt(v)}</text>')
    if log2_x:
        xticks = [2 ** k for k in range(int(x0), int(x1) + 1)]
    else:
        xticks = _ticks(x0, x1)
    for v in xticks:
        x = px(v)
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" class="ax" text-anchor="middle">{_fmt(v)}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" class="ax" text-anchor="middle">{esc(x_label)}</text>')
    if y_label:
        parts.append(
            f'<text x="14" y="{top + ph / 2:.1f}" class="ax" text-anchor="middle" '
            f'transform="rotate(-90 14 {top + ph / 2:.1f})">{esc(y_label)}</text>'
        )
    for i, (name, pts) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(pts) <= 24:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{color}"/>' for x, y in pts]
        ly = top + 14 + 14 * i
        parts.append(f'<rect x="{left + 8}" y="{ly - 8}" width="10" height="3" fill="{color}"/>')
        parts.append(f'<text x="{left + 22}" y="{ly - 4}" class="lg">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb}
h3{font-size:15px;margin:16px 0 6px} .meta{color:#6b7280}
.charts{display:flex;flex-wrap:wrap;gap:12px} .chart.empty{color:#6b7280;padding:8px}
svg .t{font-size:13px;font-weight:600;fill:#111827} svg .ax{font-size:10px;fill:#6b7280}
svg .lg{font-size:10px;fill:#374151} svg .frame{fill:none;stroke:#d1d5db} svg .grid{stroke:#f3f4f6}
table{border-collapse:collapse;margin:6px 0} th,td{padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:right}
th:nth-child(-n+3),td:nth-child(-n+3){text-align:left} .ok{color:#15803d} .bad{color:#b91c1c}
"""


def _wandb_line(run: WandbRun | None) -> str:
    """The stage's W&B run as text (a link would make the page fetch nothing, but a click
    would leave it): the URL online, else the folder(s) and the command that uploads them."""
    if run is None:
        return ""
    esc = html.escape
    if run.url:
        return f"<p class=meta>W&amp;B run: <code>{esc(run.url)}</code></p>"
    if run.mode == "online":
        return f"<p class=meta>W&amp;B run: <code>{esc(run.project)}/{esc(run.run_id)}</code> (online)</p>"
    where = esc(run.where()) if run.run_dirs else f"run {esc(run.run_id)}, nothing written yet"
    sync = f" · upload with <code>{esc(run.sync_command)}</code>" if run.sync_command else ""
    return f"<p class=meta>W&amp;B offline: <code>{where}</code>{sync}</p>"


def _stage_section(stage: StageCurves) -> str:
    esc = html.escape
    head = f"<h3>{esc(stage.address)} <span class=meta>({esc(stage.kind)}, {esc(stage.status)}"
    head += f", step {esc(stage.steps)})</span></h3>" if stage.steps else ")</span></h3>"
    head += _wandb_line(stage.wandb)
    if not stage.series:
        return head + f"<p class=meta>{esc(stage.note or 'no metrics recorded')}</p>"
    series = _rl_extra(stage.series) if stage.kind == "rl" else stage.series
    charts = []
    for title, keys, unit in CHARTS.get(stage.kind, []):
        lines = [(legend, series[key]) for key, legend in keys if key in series]
        if lines:
            charts.append(line_chart(title, lines, y_label=unit))
    val = _val_keys(series)
    if val:
        lines = [(k.removeprefix("val-core/"), series[k]) for k in val]
        charts.append(line_chart("validation accuracy", lines, y_label="accuracy"))
    return head + '<div class="charts">' + "".join(charts) + "</div>"


def _eval_section(table: EvalTable) -> str:
    esc = html.escape
    if not table.rows:
        return "<p class=meta>No evaluation results yet (add `kind: eval` stages and apply).</p>"
    head = "".join(f"<th>{esc(c)}</th>" for c in ("stage", "model", "dataset", "n", *SUMMARY))
    body = []
    for stage in table.stages():
        for dataset in table.datasets(stage):
            curve = table.pass_curve(stage, dataset)
            first = next(r for r in table.rows if r.stage == stage and r.dataset == dataset)
            cells = [esc(stage), esc(first.model), esc(dataset), str(first.samples)]
            for metric in SUMMARY:
                name = f"pass@{curve[-1][0]}" if metric == "pass@k" and curve else metric
                row = table.row(stage, dataset, name)
                if row is None:
                    cells.append("")
                    continue
                text = f"{row.value:.1f}" if metric == "response_length" else f"{row.value:.3f}"
                if metric == "pass@k":
                    text = f"{esc(name)}: {text}"
                if row.expected is not None:
                    cls = "ok" if row.met else "bad"
                    title = f' title="{esc(row.source or "")}"' if row.source else ""
                    text += f' <span class={cls}{title}>(expected {esc(row.expected)} {"✓" if row.met else "✗"})</span>'
                cells.append(text)
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    if table.unmatched:
        out += "<p class=bad>Expected but not recorded: " + esc(", ".join(table.unmatched)) + "</p>"
    return out


def _pass_section(table: EvalTable) -> str:
    charts = []
    for stage in table.stages():
        first = next(r for r in table.rows if r.stage == stage)
        lines = [(d, [(float(k), v) for k, v in table.pass_curve(stage, d)]) for d in table.datasets(stage)]
        charts.append(line_chart(
            f"{first.model} ({stage})", lines, x_label="k", y_label="pass@k", log2_x=True, y_range=(0.0, 1.0),
        ))
    return '<div class="charts">' + "".join(charts) + "</div>" if charts else ""


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string."""
    esc = html.escape
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(data.created_at))
    training = [s for s in data.stages if s.kind in ("sft", "rl")]
    sections = [
        f"<h1>retool report · {esc(data.spec_name)}</h1>",
        f"<p class=meta>backend {esc(data.backend)} · state serial {data.serial} · generated {when}</p>",
        "<h2>Training</h2>",
        "".join(_stage_section(s) for s in training) or "<p class=meta>No training stages recorded yet.</p>",
        "<h2>Evaluation</h2>", _eval_section(data.evaluations),
    ]
    if data.evaluations.rows:
        sections += ["<h2>pass@k by model</h2>", _pass_section(data.evaluations)]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>retool report · {esc(data.spec_name)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{CSS}</style></head><body>" + "".join(sections) + "</body></html>\n"
    )


# --------------------------------------------------------------------------- gathering


def gather_report(spec: Spec, state: State | None, runtime: object | None) -> ReportData:
    """The report's data: recorded stages, their metric files through the backend (where it
    declares `ReadsMetrics`), and the evaluation table."""
    reader = runtime if isinstance(runtime, ReadsMetrics) else None
    stages: list[StageCurves] = []
    for name, stage in spec.stages.items():
        address = f"stage.{name}"
        rec = state.nodes.get(address) if state else None
        if rec is None or stage.kind == "eval":
            continue
        steps = f"{rec.steps_done}/{rec.total_steps}" if rec.total_steps else str(rec.steps_done)
        series: dict[str, Series] = {}
        note = ""
        if reader is None:
            note = f"the {spec.backend} backend cannot read metric files from here"
        elif rec.restart_id:
            try:
                for step, values in reader.read_metrics(spec, name, rec.restart_id):
                    for key, value in values.items():
                        series.setdefault(key, []).append((float(step), float(value)))
            except Exception as e:  # a report is best effort: say what is missing
                note = f"metrics unavailable: {e}"
        stages.append(StageCurves(
            address=address, kind=stage.kind, status=rec.status, steps=steps, series=series, note=note,
            wandb=stage_wandb(rec),
        ))
    return ReportData(
        spec_name=spec.name, backend=spec.backend, serial=state.serial if state else 0, stages=stages,
        evaluations=eval_table(spec, state),
    )
