"""After a local stage succeeded: merge its final checkpoint into a Hugging Face model and,
for an SFT stage with `tool_call_check`, measure how often that model calls the tool.

Both results are cached in `<run dir>/merged.json` (the merged step, the check's result),
so finalizing again — a retry, or a later apply — does no work twice. A tool-call rate
below `min_rate` fails the stage with the rate, a few completions and a hint; the merged
model and checkpoints stay, and more epochs resume the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from reconciler.errors import TerminalError
from reconciler.spec import SFTStage, ToolCallCheck
from runtime.atomic import write_json
from runtime.local import resources as res
from runtime import metrics as met
from runtime import processes as procs
from runtime import tracking
from runtime.local.runs import read_active
from reconciler.backend import Checkpoint, Outcome, StageContext
from runtime.verl.common import StagePaths
from runtime.verl.sft import render_merge

MERGE_RECORD = "merged.json"


class MergeRecord(BaseModel):
    step: int
    checkpoint: str
    tool_check: dict[str, Any] | None = None  # ToolCheckResult fields + "prompts"


def finalize_run(
    ctx: StageContext, checkpoint: Checkpoint, paths: StagePaths, *, logs_dir: Path,
    executable: Callable[[list[str]], list[str]],
) -> Outcome:
    if not checkpoint.valid:
        raise TerminalError(f"checkpoint {checkpoint.path} is not valid", checkpoint.reason)
    stage = ctx.spec.stages[ctx.stage]
    merged, record_path = Path(paths.merged_dir), Path(paths.stage_dir) / MERGE_RECORD
    raw = res.read_json(record_path)
    record = MergeRecord.model_validate(raw) if isinstance(raw, dict) else None
    change = "unchanged"
    if record is None or record.step != checkpoint.step or not (merged / "config.json").is_file():
        log_path = logs_dir / f"{ctx.stage}-{ctx.restart_id[:8]}-merge-{time.strftime('%Y%m%d-%H%M%S')}.log"
        merge_checkpoint(Path(checkpoint.path), merged, log_path, executable)
        record = MergeRecord(step=checkpoint.step, checkpoint=checkpoint.path)
        write_json(record_path, record.model_dump())
        change = "created"
    outputs: dict[str, Any] = {"model_path": str(merged), "final_step": checkpoint.step, "checkpoint": checkpoint.path}
    records = met.read_file(Path(paths.stage_dir) / "metrics.jsonl")
    if records:  # for `status` (never part of the output identity: that is final_step only)
        outputs["final_metrics"] = met.headline(records) or met.latest(records)
        outputs["sparklines"] = met.sparklines(records)
    url = latest_wandb_url(logs_dir, ctx.stage, ctx.restart_id)
    if url:
        outputs["wandb_url"] = url
    launched = read_active(Path(paths.stage_dir))
    run = tracking.observed_local(launched.wandb if launched else None, paths.stage_dir, url)
    if run is not None:  # for `status` and `report` (not part of the output identity either)
        outputs["wandb"] = run.model_dump(mode="json")
    message = f"merged step {checkpoint.step} into {merged}"
    if isinstance(stage, SFTStage) and stage.tool_call_check is not None:
        check = stage.tool_call_check
        if record.tool_check is None or record.tool_check.get("prompts") != check.prompts:
            record = record.model_copy(update={"tool_check": measure_tool_calls(merged, check.prompts)})
            write_json(record_path, record.model_dump())
        assert record.tool_check is not None
        outputs.update({
            "tool_call_rate": record.tool_check["rate"], "tool_call_prompts": record.tool_check["n"],
            "tool_call_min_rate": check.min_rate,
        })
        message += "; " + enforce_tool_calls(ctx.stage, check, record.tool_check, merged)
    return Outcome(change=change, outputs=outputs, message=message)


def merge_checkpoint(
    checkpoint_dir: Path, merged: Path, log_path: Path, executable: Callable[[list[str]], list[str]]
) -> None:
    """`verl.model_merger` into a temporary folder, then swap it in (a failed merge leaves
    the previous merged model untouched)."""
    source = checkpoint_dir / "actor" if (checkpoint_dir / "actor").is_dir() else checkpoint_dir
    tmp = merged.with_name(merged.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = render_merge(str(source), str(tmp))
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


def measure_tool_calls(model_dir: Path, prompts: int) -> dict[str, Any]:
    """runtime.toolcheck on held-out generated prompts with the code_interpreter schema."""
    from runtime.hf_quiet import quiet
    from runtime.toolcheck import measure

    result = quiet(measure, model_dir, prompts)
    return {"prompts": prompts, **result.model_dump()}


def enforce_tool_calls(stage: str, check: ToolCallCheck, result: dict[str, Any], merged: Path) -> str:
    """The check's one-line summary; TerminalError when the rate is below `min_rate`."""
    from runtime.toolcheck import require_rate

    examples = "\n".join(
        f"- {e['prompt'][:60]!r} -> {e['completion'][:120]!r} ({e['reason'] or 'ok'})"
        for e in result.get("examples", [])[:4]
    )
    return require_rate(stage, check.min_rate, result["rate"], result["n"], str(merged), examples)


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
