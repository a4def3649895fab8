"""After an eval run succeeded: its metrics as the stage's recorded outputs.

The metrics are recomputed from `samples.jsonl` for exactly `samples` per problem (the
spec's number, which a finished run may exceed after a decrease), so what `status` and the
report show always matches the spec. Speed comes from the run's `results.json`.
"""

from __future__ import annotations

from typing import Any

from reconciler.backend import Checkpoint, Outcome
from reconciler.errors import TerminalError
from runtime.eval import samples as sample_file
from runtime.eval.job import PROGRESS_FILE, Progress, Results
from runtime.eval.metrics import dataset_metrics
from runtime.eval.samples import RESULTS_FILE, SAMPLES_FILE


def eval_outcome(
    run_dir: str, n: int, checkpoint: Checkpoint, *, progress: str | None, samples: str | None, results: str | None,
) -> Outcome:
    """outputs: `results` (dataset -> metrics), `samples`, paths, speed, `final_step`; from
    the texts of the run's progress.json, samples.jsonl and results.json (any backend)."""
    try:
        seen = Progress.model_validate_json(progress) if progress else None
    except ValueError:
        seen = None
    if seen is None or not seen.problems:
        raise TerminalError(f"{run_dir}/{PROGRESS_FILE} is missing or unreadable", hint="rerun the stage (--replace)")
    drawn = sample_file.parse(samples or "")
    try:
        metrics = {d: dataset_metrics(d, drawn, n) for d in seen.problems}
    except ValueError as e:
        raise TerminalError(f"the eval run left too few samples for {n} per problem", str(e)) from e
    try:
        speed = Results.model_validate_json(results) if results else None
    except ValueError:
        speed = None
    outputs: dict[str, Any] = {
        "results": {d: m.model_dump(mode="json") for d, m in metrics.items()},
        "samples": n, "final_step": checkpoint.step,
        "samples_path": f"{run_dir}/{SAMPLES_FILE}", "results_path": f"{run_dir}/{RESULTS_FILE}", "run_dir": run_dir,
    }
    if speed is not None:
        outputs.update(engine=speed.engine, tokens_per_s=speed.tokens_per_s, device=speed.device)
    summary = "; ".join(f"{d} mean@{n} {m.mean_at_n:.3f}, maj@{n} {m.maj_at_n:.3f}" for d, m in metrics.items())
    return Outcome(change="created", outputs=outputs, message=f"{n} samples per problem: {summary}")
