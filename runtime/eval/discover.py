"""An eval run's "checkpoint": the sample rounds complete for every problem.

Eval stages reuse the reconciler's step arithmetic: a step is one sample round (one
sample for every problem), the total is `samples`, and the checkpoint a resume starts from
is the number of complete rounds `progress.json` records. It counts only under the restart
identity its run directory's marker names (samples drawn for another model or other
sampling settings are never reused). Both backends call this on a listing they read.
"""

from __future__ import annotations

import json

from reconciler.backend import Checkpoint
from runtime.eval.job import Progress


def eval_checkpoint(
    *, run_dir: str, restart_id: str, marker: str | None, progress: str | None,
) -> list[Checkpoint]:
    """[the run's checkpoint] from the texts of its marker and progress.json (None when
    missing), or [] when it has no complete round yet."""
    try:
        marked = json.loads(marker).get("restart_id") if marker else None
    except (ValueError, AttributeError):
        marked = None
    try:
        seen = Progress.model_validate_json(progress) if progress else None
    except ValueError:
        seen = None
    if seen is None or seen.rounds <= 0:
        return []
    if marked != restart_id:
        return [Checkpoint(
            step=seen.rounds, path=run_dir, valid=False, restart_id=marked,
            reason="written under another restart identity" if marked else "no identity marker",
        )]
    return [Checkpoint(step=seen.rounds, path=run_dir, valid=True, world_size=1, restart_id=restart_id)]
