"""After a local stage succeeded: merge its final checkpoint into a Hugging Face model and,
for an SFT stage with `tool_call_check`, measure how often that model calls the tool.

This is the local backend's part of finalize (runtime.stage_kind.ModelMerger); the stage
kind (runtime.verl.kind) renders the merge command and judges the check's rate. Both
results are cached in `<run dir>/merged.json` (the merged step, the check's result), so
finalizing again — a retry, or a later apply — does no work twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import TerminalError
from reconciler.spec import ProblemSet, ToolCallCheck
from runtime import records as rec
from runtime.records import MergeRecord
from runtime import metrics as met
from runtime import processes as procs
from reconciler.backend import Change, Checkpoint, RenderedCommand
from runtime.stage_kind import MergeResult, ToolCallMeasure
from runtime import tracking
from runtime.local.runs import read_active
from runtime.verl.common import StagePaths

MERGE_RECORD = "merged.json"


@dataclass(frozen=True)
class LocalMerger:
    """runtime.stage_kind.ModelMerger on this machine: `verl.model_merger` as a subprocess
    (its log under `logs_dir`), the tool-call check in this process; both cached in the run
    directory's merged.json."""

    stage: str
    restart_id: str
    paths: StagePaths
    logs_dir: Path
    executable: Callable[[list[str]], list[str]]

    def merge(
        self, command: Callable[[str], RenderedCommand], checkpoint: Checkpoint, check: ToolCallCheck | None,
    ) -> MergeResult:
        merged, record_path = Path(self.paths.merged_dir), Path(self.paths.stage_dir) / MERGE_RECORD
        record = rec.load(MergeRecord, record_path)
        change: Change = "unchanged"
        if record is None or record.step != checkpoint.step or not (merged / "config.json").is_file():
            log_path = self.logs_dir / f"{self.stage}-{self.restart_id[:8]}-merge-{time.strftime('%Y%m%d-%H%M%S')}.log"
            merge_checkpoint(command, Path(checkpoint.path), merged, log_path, self.executable)
            record = MergeRecord(step=checkpoint.step, checkpoint=checkpoint.path)
            rec.save(record_path, record)
            change = "created"
        outputs: dict[str, Any] = {}
        records = met.read_file(Path(self.paths.stage_dir) / "metrics.jsonl")
        if records:  # for `status` (never part of the output identity: that is final_step only)
            outputs["final_metrics"] = met.headline(records) or met.latest(records)
            outputs["sparklines"] = met.sparklines(records)
        url = latest_wandb_url(self.logs_dir, self.stage, self.restart_id)
        if url:
            outputs["wandb_url"] = url
        launched = read_active(Path(self.paths.stage_dir))
        run = tracking.observed_local(launched.wandb if launched else None, self.paths.stage_dir, url)
        if run is not None:  # for `status` and `report` (not part of the output identity either)
            outputs["wandb"] = run.model_dump(mode="json")
        if check is None:
            return MergeResult(change=change, outputs=outputs)
        measured_for = (record.tool_check or {}).get("prompts"), (record.tool_check or {}).get("problems", "mixed")
        if measured_for != (check.prompts, check.problems):
            record = record.model_copy(update={"tool_check": measure_tool_calls(merged, check.prompts, check.problems)})
            rec.save(record_path, record)
        assert record.tool_check is not None
        measured = ToolCallMeasure(
            rate=record.tool_check["rate"], prompts=record.tool_check["n"], examples=tool_check_examples(record.tool_check),
        )
        return MergeResult(change=change, outputs=outputs, tool_check=measured)


def merge_checkpoint(
    command: Callable[[str], RenderedCommand], checkpoint_dir: Path, merged: Path, log_path: Path,
    executable: Callable[[list[str]], list[str]],
) -> None:
    """`command` into a temporary folder, then swap it in (a failed merge leaves the
    previous merged model untouched)."""
    tmp = merged.with_name(merged.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = command(str(tmp))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        done = subprocess.run(
            executable(cmd.argv), env={**os.environ, **cmd.env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=str(merged.parent), check=False,
        )
    if done.returncode != 0 or not (tmp / "config.json").is_file():
        tail = procs.tail(log_path, 15)
        raise TerminalError(
            f"merging {checkpoint_dir.name} failed (exit {done.returncode})", "\n".join(tail), f"full log: {log_path}"
        )
    if merged.exists():
        shutil.rmtree(merged)
    os.replace(tmp, merged)


def measure_tool_calls(model_dir: Path, prompts: int, problems: ProblemSet) -> dict[str, Any]:
    """runtime.toolcheck on held-out generated prompts with the code_interpreter schema."""
    from runtime.hf_quiet import quiet
    from runtime.toolcheck import measure

    result = quiet(measure, model_dir, prompts, problems)
    return {"prompts": prompts, "problems": problems, **result.model_dump()}


def tool_check_examples(result: dict[str, Any]) -> str:
    """A few of the check's completions, one a line (shown when the rate is too low)."""
    return "\n".join(
        f"- {e['prompt'][:60]!r} -> {e['completion'][:120]!r} ({e['reason'] or 'ok'})"
        for e in result.get("examples", [])[:4]
    )


def latest_wandb_url(logs_dir: Path, stage: str, restart_id: str) -> str | None:
    """The W&B run URL printed in the newest log of this stage's runs, if any."""
    for log in sorted(logs_dir.glob(f"{stage}-{restart_id[:8]}-*.log"), reverse=True):
        try:
            url = met.wandb_url(log.read_text(errors="replace"))
        except OSError:
            continue
        if url:
            return url
    return None
