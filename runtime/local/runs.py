"""A local stage run directory's detached runs: the active-run record that makes a launch
idempotent, and what a run's process, exit file and log say about it now.

`launch_stage` writes `<run dir>/active_run.json` (the RunHandle it returns: its LocalRun
reference — pid, kernel start ticks, run tag, log and exit paths — and resume_from, total_steps) atomically before it
returns. If `retool apply` dies after starting the run but before the engine recorded the
handle, the next launch of the same stage and restart identity finds that record, sees
the process still running (same pid *and* start ticks, no exit file) and re-attaches to it
instead of moving the directory aside and starting a second run over the first. A record
whose run ended is never reused; trainer processes it left behind are stopped first.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from reconciler.errors import TerminalError
from reconciler.state.base import LocalRun, RunHandle
from runtime import checkpoints as ckpts
from runtime.atomic import write_json, write_text_atomic
from runtime.local import resources as res
from runtime import metrics as met
from runtime import processes as procs
from runtime.records import ExitRecord
from runtime import tracking
from reconciler.backend import RunStatus, StageContext

ACTIVE_RUN_FILE = "active_run.json"
TAIL_LINES = 40


# --------------------------------------------------------------------------- the active-run record


def write_active(run_dir: Path, handle: RunHandle) -> None:
    """Record `handle` as the run training into `run_dir` (atomic: temporary file, rename)."""
    write_json(run_dir / ACTIVE_RUN_FILE, handle.model_dump(mode="json"))


def read_active(run_dir: Path) -> RunHandle | None:
    raw = res.read_json(run_dir / ACTIVE_RUN_FILE)
    if not isinstance(raw, dict):
        return None
    try:
        return RunHandle.model_validate(raw)
    except ValidationError:
        return None


def local_ref(handle: RunHandle) -> LocalRun:
    """The process-group reference of a run this backend started."""
    if not isinstance(handle.ref, LocalRun):
        raise TerminalError("this run was not started by the local backend", f"handle backend {handle.backend}")
    return handle.ref


def exit_path_of(handle: RunHandle) -> Path:
    ref = local_ref(handle)
    log_path = Path(ref.log_path)
    return Path(ref.exit_path or log_path.with_name(log_path.stem + ".exit.json"))


def is_running(handle: RunHandle) -> bool:
    """Whether the run's wrapper is the very process that was started (pid and start ticks)
    and has not written its exit file yet."""
    ref = local_ref(handle)
    if procs.read_exit(exit_path_of(handle)) is not None:
        return False
    return procs.is_alive(ref.pid, ref.start_ticks)


def live_run(run_dir: Path) -> RunHandle | None:
    """The recorded run of `run_dir` if it is still running, else None."""
    handle = read_active(run_dir)
    return handle if handle is not None and is_running(handle) else None


def stop(handle: RunHandle, grace_s: float = 20.0) -> None:
    """Stop every process of a recorded run (its group and everything carrying its tag)."""
    ref = local_ref(handle)
    pgid = ref.pgid if is_running(handle) else None
    if procs.run_members(pgid, ref.tag):
        procs.terminate_run(pgid, ref.tag, grace_s=grace_s)


def move_aside(run_dir: Path) -> None:
    """A from-scratch launch over an earlier run of the same identity keeps that run, out of
    the way, under `.replaced/`. Never a directory a live run still writes into."""
    if not run_dir.is_dir() or not any(p.name != ckpts.MARKER_FILE for p in run_dir.iterdir()):
        return
    live = live_run(run_dir)
    if live is not None:
        raise TerminalError(
            f"{run_dir} still has a running trainer (pid {local_ref(live).pid})",
            "a from-scratch launch would move its checkpoints away while it writes them",
            "`retool cancel` the stage first",
        )
    dest = run_dir.parent / ".replaced" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(run_dir, dest)


def prepare_run_dir(run_dir: Path, ctx: StageContext, world_size: int, inputs: dict[str, str]) -> None:
    """Make `run_dir` ready for a launch: a from-scratch run moves an earlier run of the same
    identity aside; then the marker and the stage kind's input files."""
    if ctx.resume_from is None:
        move_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / ckpts.MARKER_FILE
    if not marker.exists():
        write_text_atomic(marker, ckpts.marker_content(ctx.restart_id, ctx.stage, world_size) + "\n")
    for name, text in inputs.items():
        write_text_atomic(run_dir / name, text)


# --------------------------------------------------------------------------- observing a run


def follower_for(handle: RunHandle) -> met.LogFollower:
    """A follower of the run's log that starts from the steps the run resumed from (kept in
    the run dir's metrics.jsonl), so a resumed run's metrics and sparkline cover every step."""
    ref = local_ref(handle)
    return resumed_follower(Path(ref.log_path), ref.metrics_path, handle.resume_from)


def resumed_follower(log_path: Path, metrics_path: str, resume_from: int | None) -> met.LogFollower:
    """A follower of `log_path` that already holds the steps up to `resume_from` recorded
    in `metrics_path` (the run dir's metrics.jsonl of the runs before)."""
    follower = met.LogFollower(log_path)
    if resume_from is not None and metrics_path:
        for rec in met.read_file(Path(metrics_path)):
            if rec.step <= resume_from:
                follower.by_step[rec.step] = dict(rec.values)
    return follower


def progress(handle: RunHandle, follower: met.LogFollower, metrics_path: Path, stage_dir: str) -> dict[str, Any]:
    """What a run's log says so far (step, metrics, sparklines, its W&B run), kept in
    `metrics_path`: the RunStatus fields every backend that follows a log fills the same way."""
    records = follower.update()
    if follower.changed:
        met.write_file(records, metrics_path)
    return {
        "step": records[-1].step if records else None, "total": handle.total_steps,
        "metrics": met.headline(records) or met.latest(records),
        "sparklines": met.sparklines(records), "wandb_url": follower.wandb_url,
        "wandb": tracking.observed_local(handle.wandb, stage_dir, follower.wandb_url) if stage_dir else None,
    }


def running_status(handle: RunHandle, seen: dict[str, Any], log_path: Path) -> RunStatus:
    step, url = seen["step"], seen["wandb_url"]
    return RunStatus(
        state="running", elapsed_s=time.time() - handle.started_at, log_tail=procs.tail(log_path, 5), **seen,
        message=(f"step {step}/{handle.total_steps}" if step is not None else "starting") + (f" · W&B {url}" if url else ""),
    )


def finished_status(handle: RunHandle, done: ExitRecord, seen: dict[str, Any], log_path: Path) -> RunStatus:
    """A run whose commands ended (its exit record): succeeded, cancelled or failed, and why."""
    step, total = seen["step"], handle.total_steps
    elapsed = done.finished_at - handle.started_at
    tail = procs.tail(log_path, TAIL_LINES)
    if done.returncode == 0 and handle.kind == "sft" and total and (step or 0) < total:
        # SFT data is never filtered, so ending early means verl's loop ran out of epochs.
        return RunStatus(
            state="failed", elapsed_s=elapsed, log_tail=tail, **seen,
            message=f"the trainer exited at step {step} of {total} (it ran out of epochs); apply resumes it",
        )
    if done.returncode == 0:
        return RunStatus(
            state="succeeded", elapsed_s=elapsed, log_tail=tail[-5:], **seen,
            message=f"finished at step {step}" if step is not None else "finished",
        )
    why = f"cancelled ({done.signal})" if done.cancelled else f"exited with code {done.returncode}"
    error = "" if done.cancelled else procs.error_line(procs.tail(log_path, 400, max_bytes=1 << 20))
    return RunStatus(
        state="failed", elapsed_s=elapsed, log_tail=tail, **seen, message=why + (f": {error}" if error else ""),
    )


def observe(handle: RunHandle, follower: met.LogFollower) -> RunStatus:
    """The run's state now, from its exit file, its process and its log."""
    ref = local_ref(handle)
    log_path = Path(ref.log_path)
    seen = progress(handle, follower, Path(ref.metrics_path or log_path.with_suffix(".metrics.jsonl")), ref.stage_dir)
    done = procs.read_exit(exit_path_of(handle))
    if done is None and not procs.is_alive(ref.pid, ref.start_ticks):
        done = procs.read_exit(exit_path_of(handle))  # it may have finished between the two looks
        if done is None:
            # Trainer processes that outlived their leader (torchrun workers run in their own
            # sessions) would race a relaunch over the same checkpoints: stop them first.
            leftovers = procs.run_members(None, ref.tag)
            if leftovers:
                procs.terminate_run(None, ref.tag, grace_s=10)
            tail = procs.tail(log_path, TAIL_LINES)
            return RunStatus(
                state="lost", log_tail=tail, elapsed_s=None, **seen,
                message=f"process {ref.pid} is gone and left no exit status (killed, or the machine restarted)"
                + (f"; stopped {len(leftovers)} leftover trainer process(es)" if leftovers else "")
                + (f"; last log line: {tail[-1]}" if tail else ""),
            )
    if done is None:
        return running_status(handle, seen, log_path)
    return finished_status(handle, done, seen, log_path)
