"""The evaluation table: every finished eval stage's metrics per dataset, with the spec's
expected values beside them (pure: recorded state and the spec in, rows out).

An eval stage's finalize records `outputs["results"]`: dataset -> {mean_at_n, pass_at_k,
maj_at_n, mean_tool_calls, mean_response_tokens, truncated_share, ...}. One row per
(stage, dataset, metric); `retool status` draws them as model × dataset with one column
per metric, `--json` and `retool report` carry every row (the whole pass@k curve too).

Expectations (`expect:` on the eval stage) name a metric as `<dataset>/<metric>`, e.g.
`aime_2024/mean@n` or `aime_2025/pass@16`; `mean@<n>` and `maj@<n>` for the stage's own n
mean the same as `@n`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reconciler.spec import EvalStage, Spec
from reconciler.state.base import State

# Columns of the status table, in order (the pass@k curve beyond its largest k is in --json).
SUMMARY = ("mean@n", "pass@k", "maj@n", "tool_calls", "response_length", "truncated")


class EvalRow(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    stage: str  # stage.<name>
    model: str  # what it evaluated: model.<name> or stage.<name>
    dataset: str
    samples: int
    metric: str  # mean@n, pass@<k>, maj@n, tool_calls, response_length, truncated
    value: float
    expected: str | None = None  # the bound, e.g. ">= 0.4"
    met: bool | None = None
    source: str | None = None  # where the expected number comes from


class EvalTable(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    rows: list[EvalRow] = Field(default_factory=list)
    unmatched: list[str] = Field(default_factory=list)  # expectations naming no recorded metric

    def datasets(self, stage: str) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.rows if r.stage == stage))

    def stages(self) -> list[str]:
        return list(dict.fromkeys(r.stage for r in self.rows))

    def row(self, stage: str, dataset: str, metric: str) -> EvalRow | None:
        return next((r for r in self.rows if (r.stage, r.dataset, r.metric) == (stage, dataset, metric)), None)

    def pass_curve(self, stage: str, dataset: str) -> list[tuple[int, float]]:
        """[(k, pass@k)] in k order."""
        found = [(int(r.metric[5:]), r.value) for r in self.rows
                 if (r.stage, r.dataset) == (stage, dataset) and r.metric.startswith("pass@")]
        return sorted(found)


def metric_values(result: dict[str, Any]) -> dict[str, float]:
    """One dataset's recorded metrics under their table names."""
    out: dict[str, float] = {}
    for key, name in (("mean_at_n", "mean@n"), ("maj_at_n", "maj@n"), ("mean_tool_calls", "tool_calls"),
                      ("mean_response_tokens", "response_length"), ("truncated_share", "truncated")):
        if isinstance(result.get(key), int | float):
            out[name] = float(result[key])
    passes = result.get("pass_at_k")
    if isinstance(passes, dict):
        for k, v in sorted(passes.items(), key=lambda kv: int(kv[0])):
            if isinstance(v, int | float):
                out[f"pass@{int(k)}"] = float(v)
    return out


def _canonical(metric: str, n: int) -> str:
    base, _, arg = metric.partition("@")
    if base in ("mean", "maj") and arg == str(n):
        return f"{base}@n"
    return metric


def eval_table(spec: Spec, state: State | None) -> EvalTable:
    """Rows for every eval stage of the spec that has recorded results."""
    rows: list[EvalRow] = []
    unmatched: list[str] = []
    for name, stage in spec.stages.items():
        if not isinstance(stage, EvalStage):
            continue
        rec = state.nodes.get(f"stage.{name}") if state else None
        results = rec.outputs.get("results") if rec is not None else None
        if not isinstance(results, dict):
            continue
        n = int(rec.outputs.get("samples") or stage.samples) if rec is not None else stage.samples
        expectations = {}
        for exp in getattr(stage, "expect", None) or []:
            dataset, _, metric = str(exp.metric).partition("/")
            expectations[(dataset, _canonical(metric, n))] = exp
        seen: set[tuple[str, str]] = set()
        for dataset, result in results.items():
            if not isinstance(result, dict):
                continue
            for metric, value in metric_values(result).items():
                exp = expectations.get((dataset, metric))
                seen.add((dataset, metric))
                rows.append(EvalRow(
                    stage=f"stage.{name}", model=stage.model, dataset=dataset, samples=n, metric=metric, value=value,
                    expected=exp.bound_text() if exp is not None else None,
                    met=exp.met_by(value) if exp is not None else None,
                    source=getattr(exp, "source", None) if exp is not None else None,
                ))
        unmatched += [f"stage.{name}: {d}/{m}" for (d, m) in expectations if (d, m) not in seen]
    return EvalTable(rows=rows, unmatched=unmatched)
