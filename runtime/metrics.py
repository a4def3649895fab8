"""Per-step metrics from a trainer's stdout, a metrics.jsonl file, and a sparkline.

verl's console logger prints one line per step:

    step:12 - train/loss:0.84 - train/grad_norm:1.9 - train/lr:1e-05 - ...

often glued to a tqdm bar on the same line (tqdm ends with `\\r`, not a newline), and in
RL prefixed by Ray's `(TaskRunner pid=…)`. Values are `pprint` reprs, so numpy scalars
arrive as `np.float64(0.5)`. Several lines may carry the same step (validation metrics
are logged separately); they merge.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from pydantic import BaseModel, Field

from reconciler.metric_names import VAL_ACC

STEP_LINE = re.compile(r"(?:^|[\s\]|)])step:(\d+) - (.+)$")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)\b", re.IGNORECASE)
WANDB_URL = re.compile(r"https://(?:[\w.-]*\.)?wandb\.ai/\S+/runs/[\w-]+")
SPARK = "▁▂▃▄▅▆▇█"

# What `status` shows first, when present: SFT loss, RL reward and tool use (the keys verl
# 0.9.1's SFT trainer and main_ppo print), plus every validation accuracy (`val-core/...`).
HEADLINE_KEYS = (
    "train/loss", "val/loss", "train/grad_norm", "train/lr",
    "critic/score/mean", "critic/rewards/mean",
    "response_length/mean", "num_turns/mean", "actor/pg_loss", "actor/grad_norm", "actor/lr",
)
# The sparkline per run kind: SFT loss, RL reward.
SPARKLINE_KEYS = (("loss", "train/loss"), ("reward", "critic/score/mean"))


class MetricRecord(BaseModel):
    step: int
    values: dict[str, float] = Field(default_factory=dict)


def _number(text: str) -> float | None:
    """A metric value: plain number, or a repr such as `np.float64(0.5)` / `tensor(0.5)`."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = NUMBER.search(text.split("(", 1)[1]) if "(" in text else None
    if m is None:
        return None
    try:
        return float(m.group(0))
    except ValueError:
        return None


def parse_line(line: str) -> MetricRecord | None:
    """The metrics on one console line, or None if it carries no `step:N - ...`."""
    m = STEP_LINE.search(line.rstrip())
    if not m:
        return None
    values: dict[str, float] = {}
    for part in m.group(2).split(" - "):
        key, sep, raw = part.rpartition(":")
        if not sep or not key:
            continue
        value = _number(raw)
        if value is not None:
            values[key.strip()] = value
    return MetricRecord(step=int(m.group(1)), values=values)


def parse_text(text: str) -> list[MetricRecord]:
    """All step records in a log, one per step, in step order (same-step lines merged)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in re.split(r"[\r\n]+", text):
        if "step:" not in line:
            continue
        rec = parse_line(line)
        if rec is not None:
            by_step.setdefault(rec.step, {}).update(rec.values)
    return [MetricRecord(step=s, values=v) for s, v in sorted(by_step.items())]


def last_step(text: str) -> int | None:
    """The highest step the trainer reported."""
    steps = [int(m.group(1)) for line in re.split(r"[\r\n]+", text) if (m := STEP_LINE.search(line.rstrip()))]
    return max(steps) if steps else None


def wandb_url(text: str) -> str | None:
    found = WANDB_URL.findall(text)
    return found[-1] if found else None


class LogFollower:
    """Incremental parse of a growing log: each `update()` reads only the bytes appended
    since the last one (a partial last line waits for its end). Also remembers the W&B URL."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self.offset = 0
        self.pending = ""
        self.by_step: dict[int, dict[str, float]] = {}
        self.wandb_url: str | None = None
        self.changed = False  # whether the last update() saw new metrics

    def update(self) -> list[MetricRecord]:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return self.records()
        self.changed = False
        if chunk:
            self.offset += len(chunk)
            text = self.pending + chunk.decode("utf-8", errors="replace")
            cut = max(text.rfind("\n"), text.rfind("\r"))
            complete, self.pending = (text[: cut + 1], text[cut + 1:]) if cut >= 0 else ("", text)
            for rec in parse_text(complete):
                self.by_step.setdefault(rec.step, {}).update(rec.values)
                self.changed = True
            self.wandb_url = wandb_url(complete) or self.wandb_url
        return self.records()

    def records(self) -> list[MetricRecord]:
        return [MetricRecord(step=s, values=dict(v)) for s, v in sorted(self.by_step.items())]


def write_file(records: list[MetricRecord], out_path: Path) -> None:
    """(Re)write `out_path` as JSON lines `{"step", ...metrics}` when its content changed."""
    body = "".join(json.dumps({"step": r.step, **r.values}, sort_keys=True) + "\n" for r in records)
    try:
        if out_path.exists() and out_path.read_text() == body:
            return
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, out_path)
    except OSError:
        pass  # metrics are a convenience; never fail a poll over them


def sync_file(log_path: Path, out_path: Path) -> list[MetricRecord]:
    """Parse the whole of `log_path` and (re)write `out_path` when it changed. Returns the records."""
    follower = LogFollower(log_path)
    records = follower.update()
    if follower.pending:  # a finished log's last line needs no newline
        records = _merge(records, parse_text(follower.pending))
    write_file(records, out_path)
    return records


def _merge(a: list[MetricRecord], b: list[MetricRecord]) -> list[MetricRecord]:
    by_step = {r.step: dict(r.values) for r in a}
    for r in b:
        by_step.setdefault(r.step, {}).update(r.values)
    return [MetricRecord(step=s, values=v) for s, v in sorted(by_step.items())]


def read_file(path: Path) -> list[MetricRecord]:
    """Records from a metrics.jsonl file (bad lines skipped)."""
    out: list[MetricRecord] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
            out.append(MetricRecord(step=step, values={k: float(v) for k, v in row.items()}))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def latest(records: list[MetricRecord]) -> dict[str, float]:
    """Each metric's most recent value."""
    out: dict[str, float] = {}
    for r in records:
        out.update(r.values)
    return out


def headline(records: list[MetricRecord]) -> dict[str, float]:
    """The latest values of the metrics `status` shows first."""
    values = latest(records)
    keys = [*HEADLINE_KEYS, *sorted(k for k in values if VAL_ACC.match(k))]
    return {k: values[k] for k in keys if k in values}


def sparklines(records: list[MetricRecord], width: int = 24) -> dict[str, str]:
    """{"loss": "▇▆▄▂▁"} for an SFT run, {"reward": ...} for RL: the run's curve at a glance."""
    out: dict[str, str] = {}
    for name, key in SPARKLINE_KEYS:
        line = sparkline(series(records, key), width)
        if line:
            out[name] = line
    return out


def series(records: list[MetricRecord], key: str) -> list[float]:
    return [r.values[key] for r in records if key in r.values and math.isfinite(r.values[key])]


def sparkline(values: list[float], width: int = 24) -> str:
    """A one-line chart of `values`, squeezed into at most `width` buckets (each the mean of its slice)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        size = len(vals) / width
        vals = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := vals[int(i * size): max(int((i + 1) * size), int(i * size) + 1)])
        ]
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return SPARK[len(SPARK) // 2] * len(vals)
    scale = (len(SPARK) - 1) / (hi - lo)
    return "".join(SPARK[round((v - lo) * scale)] for v in vals)
