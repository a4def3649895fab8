"""How many steps a stage runs, and what running them costs.

Steps follow verl's own arithmetic: both trainers drop the last partial batch, so an
epoch is `rows // train_batch_size` steps, times `epochs`, capped by `max_steps`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from reconciler.spec import Dataset, EvalStage, Pricing, Resources, RLStage, SFTStage, Spec


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)

    steps: int = 0
    gpu_hours: float = 0.0
    usd: float = 0.0
    segments: int = 0  # attempts of at most resources.timeout_hours each
    seconds_per_step: float | None = None
    source: Literal["measured", "spec", "none"] = "none"
    # What the spec says of its own figure (`seconds_per_step_basis`), kept beside a
    # measured one too, so the plan shows how close the estimate was.
    spec_seconds_per_step: float | None = None
    basis: Literal["measured", "derived", "guess"] | None = None
    basis_detail: str = ""
    low_s: float | None = None
    high_s: float | None = None


def total_steps(stage_spec: SFTStage | RLStage | EvalStage, train_rows: int | None) -> int | None:
    """Optimizer steps the stage runs in total; None when the data size is unknown and
    no `max_steps` bounds it. An eval stage's steps are sample rounds: `samples`."""
    if isinstance(stage_spec, EvalStage):
        return stage_spec.samples
    if train_rows is None:
        return stage_spec.max_steps
    total = (train_rows // stage_spec.train_batch_size) * stage_spec.epochs
    if stage_spec.max_steps is not None:
        total = min(total, stage_spec.max_steps)
    return total


def stage_total_steps(
    spec: Spec, stage: SFTStage | RLStage | EvalStage, train_outputs: dict[str, Any] | None
) -> int | None:
    """Total steps of a stage: from its train dataset's measured rows (`train_outputs`, that
    dataset's recorded outputs while they still hold), else its expected rows. The plan and
    the apply engine both count with this."""
    if isinstance(stage, EvalStage):
        return total_steps(stage, None)  # sample rounds
    dataset = spec.datasets.get(stage.train.partition(".")[2])
    if dataset is None:
        return stage.max_steps
    return total_steps(stage, dataset_rows(dataset, train_outputs))


def dataset_rows(dataset: Dataset, recorded_outputs: dict[str, Any] | None) -> int | None:
    """Rows of a dataset: measured when it was prepared (`outputs["rows"]`), else the
    spec's `expected_rows`, else a builtin generator's `options.rows`; capped by max_rows."""
    rows: int | None = None
    if recorded_outputs and isinstance(recorded_outputs.get("rows"), int):
        return int(recorded_outputs["rows"])
    if dataset.expected_rows is not None:
        rows = dataset.expected_rows
    elif dataset.source.startswith("builtin:") and isinstance(dataset.options.get("rows"), int):
        rows = int(dataset.options["rows"])
    if rows is not None and dataset.max_rows is not None:
        rows = min(rows, dataset.max_rows)
    return rows


def gpu_count(resources: Resources) -> int:
    return resources.gpus_per_node * resources.nodes


def hourly_usd(resources: Resources, pricing: Pricing) -> float | None:
    """Price of one hour of the stage's whole allocation; None when the GPU has no price."""
    if resources.gpu is None:
        return pricing.cpu_hour_usd * resources.nodes
    price = pricing.gpu_hour_usd.get(resources.gpu)
    return None if price is None else price * gpu_count(resources)


def segments_for(hours: float, timeout_hours: float) -> int:
    """Attempts of at most `timeout_hours` each needed to run `hours` (60 h at 24 h per
    attempt: 3). The plan's estimate and the Modal backend's segment chain use this one rule."""
    if hours <= 0:
        return 0
    return max(1, math.ceil(round(hours / timeout_hours, 9)))


def estimate(
    steps: int, resources: Resources, pricing: Pricing, seconds_per_step: float | None,
    source: Literal["measured", "spec", "none"],
) -> Estimate:
    """GPU-hours, dollars and 24 h-style segments for `steps` more steps."""
    if steps <= 0:
        return Estimate(seconds_per_step=seconds_per_step, source=source)
    if seconds_per_step is None:
        return Estimate(steps=steps, segments=1, source="none")
    wall_hours = steps * seconds_per_step / 3600
    per_hour = hourly_usd(resources, pricing) or 0.0
    return Estimate(
        steps=steps,
        gpu_hours=round(wall_hours * gpu_count(resources), 4),
        usd=round(wall_hours * per_hour, 2),
        segments=max(1, segments_for(wall_hours, resources.timeout_hours)),
        seconds_per_step=seconds_per_step,
        source=source,
    )


def with_basis(est: Estimate, stage: SFTStage | RLStage | EvalStage) -> Estimate:
    """`est` plus what the stage's spec says of its step time (source, detail, range)."""
    basis = stage.seconds_per_step_basis
    update: dict[str, Any] = {"spec_seconds_per_step": stage.seconds_per_step}
    if basis is not None:
        update |= {"basis": basis.source, "basis_detail": basis.detail, "low_s": basis.low, "high_s": basis.high}
    return est.model_copy(update=update)


def add(a: Estimate, b: Estimate) -> Estimate:
    """Sum of two estimates (seconds per step and source do not add up: dropped)."""
    return Estimate(
        steps=a.steps + b.steps, gpu_hours=round(a.gpu_hours + b.gpu_hours, 4),
        usd=round(a.usd + b.usd, 2), segments=a.segments + b.segments,
    )
