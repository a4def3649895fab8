"""After an eval run succeeded: its metrics as the stage's recorded outputs.

The metrics are recomputed from `samples.jsonl` for exactly `samples` per problem (the
spec's number, which a finished run may exceed after a decrease), so what `status` and the
report show always matches the spec. Speed comes from the run's `results.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reconciler.backend import Checkpoint, Outcome
from reconciler.errors import TerminalError
from runtime.eval import samples as sample_file
from runtime.eval.job import PROGRESS_FILE, Progress, Results, read_model
from runtime.eval.metrics import dataset_metrics
from runtime.eval.samples import RESULTS_FILE, SAMPLES_FILE


def eval_outputs(run_dir: Path, n: int, checkpoint: Checkpoint) -> Outcome:
    """outputs: `results` (dataset -> metrics), `samples`, paths, speed, `final_step`."""
    progress = read_model(run_dir / PROGRESS_FILE, Progress)
    if progress is None or not progress.problems:
        raise TerminalError(f"{run_dir / PROGRESS_FILE} is missing or unreadable", hint="rerun the stage (--replace)")
    drawn = sample_file.read(run_dir / SAMPLES_FILE)
    try:
        metrics = {d: dataset_metrics(d, drawn, n) for d in progress.problems}
    except ValueError as e:
        raise TerminalError(f"the eval run left too few samples for {n} per problem", str(e)) from e
    speed = read_model(run_dir / RESULTS_FILE, Results)
    outputs: dict[str, Any] = {
        "results": {d: m.model_dump(mode="json") for d, m in metrics.items()},
        "samples": n, "final_step": checkpoint.step,
        "samples_path": str(run_dir / SAMPLES_FILE), "results_path": str(run_dir / RESULTS_FILE),
        "run_dir": str(run_dir),
    }
    if speed is not None:
        outputs.update(engine=speed.engine, tokens_per_s=speed.tokens_per_s, device=speed.device)
    summary = "; ".join(f"{d} mean@{n} {m.mean_at_n:.3f}, pass@{max(int(k) for k in m.pass_at_k)} "
                        f"{m.pass_at_k[str(max(int(k) for k in m.pass_at_k))]:.3f}" for d, m in metrics.items())
    return Outcome(change="created", outputs=outputs, message=f"{n} samples per problem: {summary}")
