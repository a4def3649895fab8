"""How apply runs one stage: launch it detached, record its handle at once, follow it to
the end (Ctrl-C detaches), then discover its checkpoints and finalize. A stage already
running under the same restart identity is re-attached, never relaunched; one running
under an old identity is cancelled first; a stage whose checkpoints already reach its
total is finalized without training again."""

from __future__ import annotations

from reconciler.apply.context import (
    ApplyContext, ApplyEvent, Detached, NodeFailed, Result, planned_total_steps, stage_context,
)
from reconciler.errors import RetoolError, TransientError
from reconciler.fingerprint import Fingerprints, output_id
from reconciler.graph import Node
from reconciler.plan import PlannedChange, ReasonCode
from reconciler.state.base import NodeRecord, RunHandle
from reconciler.steps import gpu_count, hourly_usd
from reconciler.backend import Checkpoint, RunStatus, latest_resumable


class StageRunner:
    """Takes one planned stage change to its end state (or raises NodeFailed / Detached)."""

    def __init__(self, ctx: ApplyContext) -> None:
        self.ctx = ctx

    def run(self, change: PlannedChange, node: Node) -> tuple[Result, str]:
        fp = self.ctx.fingerprints(node)
        rec = self.ctx.state.nodes.get(node.address)
        action = change.action
        if rec is not None and rec.status == "running" and rec.run is not None:
            if rec.restart_id != fp.restart_id or action == "rerun":
                self.cancel_run(rec, "its restart identity changed" if rec.restart_id != fp.restart_id else "replaced")
            else:
                if action == "update":
                    self.ctx.record_config(node, fp)
                done = self._follow(node, rec, fp)
                if done is not None and done[0] == "running":  # --no-wait: leave it be
                    return done
                more = planned_total_steps(self.ctx.loaded, self.ctx.state, node.name)
                if done is not None and not (action == "resume" and more is not None and more > rec.steps_done):
                    return done
                if done is None and action in ("no-op", "update"):
                    raise NodeFailed(rec.message or f"run {rec.status}", keep_status=True)
                # planned to (re)launch: resume from its checkpoints (more steps, or after a failure)
        if action == "update":
            self.ctx.record_config(node, fp)
            return "updated", "recorded new settings; nothing reruns"
        if action == "no-op":
            return "unchanged", ""
        return self._launch(change, node, fp)

    def _launch(self, change: PlannedChange, node: Node, fp: Fingerprints) -> tuple[Result, str]:
        rec = self.ctx.state.nodes.get(node.address)
        total = planned_total_steps(self.ctx.loaded, self.ctx.state, node.name)
        total = change.total_steps if total is None else total
        # Only --replace discards the identity's checkpoints; a rerun planned from a failure (or from
        # a plan whose refresh could not read them) still resumes from what the backend holds.
        replacing = ReasonCode.REPLACE_REQUESTED in change.reason_codes and rec is not None and rec.restart_id == fp.restart_id
        latest = None if replacing else self._latest_checkpoint(node, fp.restart_id)
        if latest is not None and total is not None and latest.step >= total:
            # Everything is trained already (e.g. finalize failed last time): finish it.
            rec = self.ctx.rec(node)
            self.ctx.set_identity(rec, node, fp)
            rec.total_steps = total
            return self._finish(node, rec, fp, latest)
        resume_from = latest.step if latest is not None else None
        run_ctx = stage_context(
            self.ctx.loaded, self.ctx.state, node, restart_id=fp.restart_id, total=total,
            resume_from=resume_from, state_dir=self.ctx.state_dir,
        )
        handle = self.ctx.runtime.launch_stage(run_ctx)
        if handle.reattached:  # an earlier apply started it, then died
            resume_from = handle.resume_from
        rec = self.ctx.rec(node)
        if rec.restart_id != fp.restart_id or replacing:
            # The lifetime tally keeps what the old identity spent (older records had only these).
            rec.spent_gpu_seconds = max(rec.spent_gpu_seconds, rec.gpu_seconds)
            rec.spent_usd = max(rec.spent_usd, rec.cost_usd)
            rec.gpu_seconds, rec.cost_usd, rec.outputs, rec.output_id = 0.0, 0.0, {}, None
        self.ctx.set_identity(rec, node, fp)
        rec.status = "running"
        rec.run = handle
        rec.total_steps = total
        rec.steps_done = resume_from or 0
        rec.started_at = handle.started_at
        rec.finished_at = None
        rec.message = f"resumed from step {resume_from}" if resume_from is not None else "started"
        if handle.reattached:
            rec.message = f"re-attached to the run an earlier apply started ({rec.message})"
        self.ctx.commit(rec)
        self.ctx.emit(ApplyEvent(kind="note", address=node.address, message=rec.message, step=resume_from, total=total))
        if handle.wandb is not None and handle.wandb.mode == "offline":
            self.ctx.note_once("wandb-offline", (
                "W&B logs offline (no WANDB_API_KEY reaches the trainer): each run is written beside its "
                "checkpoints; `retool status` shows its folder and the `wandb sync` command that uploads it"
            ), node.address)
        done = self._follow(node, rec, fp)
        if done is None:
            raise NodeFailed(rec.message, keep_status=True)  # _follow recorded failed or lost
        return done

    def _follow(self, node: Node, rec: NodeRecord, fp: Fingerprints) -> tuple[Result, str] | None:
        """Watch a recorded run to its end. Returns the node's result once it succeeded,
        None when it ended otherwise (the record says how), or raises NodeFailed."""
        assert rec.run is not None
        status = self._watch(node.address, rec.run)
        if status is None:
            return "running", "still running (--no-wait)"
        self._account(rec, status, node)
        if status.state == "succeeded":
            if status.step is not None:  # what it reached counts even if finalizing fails below
                rec.steps_done = max(rec.steps_done, status.step)
            rec.message = "run finished; finalizing"
            self.ctx.commit(rec)
            latest = self._latest_checkpoint(node, fp.restart_id)
            if latest is None:
                rec.status = "failed"
                rec.message = "the run finished but left no valid checkpoint"
                self.ctx.commit(rec)
                raise NodeFailed(rec.message)
            return self._finish(node, rec, fp, latest)
        rec.status = "lost" if status.state == "lost" else "failed"
        rec.message = status.message or f"run {status.state}"
        if status.step is not None:
            rec.steps_done = max(rec.steps_done, status.step)
        rec.finished_at = self.ctx.clock()
        self.ctx.commit(rec)
        return None

    def _watch(self, address: str, handle: RunHandle) -> RunStatus | None:
        """Poll until the run ends; None if it is still running and we do not wait
        (--no-wait polls once). Ctrl-C detaches."""
        failures = 0
        try:
            while True:
                try:
                    status = self.ctx.runtime.poll_stage(handle)
                    failures = 0
                except TransientError as e:
                    failures += 1
                    if failures > self.ctx.retries:
                        raise NodeFailed(
                            f"cannot reach the run ({e.summary}); it was not relaunched: "
                            "`retool status` or `retool apply` re-attaches", keep_status=True,
                        ) from e
                    self.ctx.sleep(self.ctx.backoff(failures))
                    continue
                except RetoolError as e:
                    raise NodeFailed(
                        f"cannot observe the run ({e.summary}); it was not relaunched", keep_status=True
                    ) from e
                self.ctx.emit(ApplyEvent(
                    kind="progress", address=address, step=status.step, total=status.total,
                    message=status.message or status.state,
                ))
                if status.state != "running":
                    return status
                if not self.ctx.wait:
                    return None
                self.ctx.sleep(self.ctx.poll_interval)
        except KeyboardInterrupt:
            raise Detached(address) from None

    def _finish(self, node: Node, rec: NodeRecord, fp: Fingerprints, checkpoint: Checkpoint) -> tuple[Result, str]:
        run_ctx = stage_context(
            self.ctx.loaded, self.ctx.state, node, restart_id=fp.restart_id, total=rec.total_steps,
            resume_from=None, state_dir=self.ctx.state_dir,
        )
        outcome = self.ctx.retry(lambda: self.ctx.runtime.finalize_stage(run_ctx, checkpoint))
        outputs = dict(outcome.outputs)
        outputs.setdefault("final_step", checkpoint.step)
        outputs.setdefault("checkpoint", checkpoint.path)
        rec.outputs = outputs
        rec.output_id = output_id(fp.restart_id, outputs)
        rec.steps_done = int(outputs["final_step"])
        rec.status = "succeeded"
        rec.message = outcome.message or f"finished at step {rec.steps_done}"
        rec.finished_at = self.ctx.clock()
        self.ctx.commit(rec)
        return "succeeded", rec.message

    def _account(self, rec: NodeRecord, status: RunStatus, node: Node) -> None:
        """Measured speed and spend of the attempt that just ended, counted once per run
        (the handle remembers it, so a crash before finalizing cannot count it twice)."""
        assert rec.run is not None
        if rec.run.accounted_s is not None:
            return
        elapsed = status.elapsed_s if status.elapsed_s is not None else max(0.0, self.ctx.clock() - rec.run.started_at)
        stage = self.ctx.spec.stages[node.name]
        end_step = status.step if status.step is not None else rec.steps_done
        steps_run = (end_step or 0) - rec.steps_done
        if steps_run > 0 and elapsed > 0:
            rec.seconds_per_step = round(elapsed / steps_run, 3)
        gpu_seconds = elapsed * gpu_count(stage.resources)
        usd = elapsed / 3600 * (hourly_usd(stage.resources, self.ctx.spec.pricing) or 0.0)
        rec.gpu_seconds += gpu_seconds
        rec.cost_usd = round(rec.cost_usd + usd, 4)
        # Records from before the lifetime tally start from what they had counted.
        rec.spent_gpu_seconds = max(rec.spent_gpu_seconds, rec.gpu_seconds - gpu_seconds) + gpu_seconds
        rec.spent_usd = round(max(rec.spent_usd, rec.cost_usd - usd) + usd, 4)
        rec.run = rec.run.model_copy(update={"accounted_s": elapsed})

    def _latest_checkpoint(self, node: Node, restart_id: str) -> Checkpoint | None:
        found = self.ctx.retry(lambda: self.ctx.runtime.discover_checkpoints(self.ctx.spec, node.name, restart_id))
        return latest_resumable(found, restart_id)

    def cancel_run(self, rec: NodeRecord, why: str) -> None:
        """Stop a recorded run that must not go on (old identity, replaced, removed)."""
        assert rec.run is not None
        self.ctx.retry(lambda: self.ctx.runtime.cancel_stage(rec.run))  # type: ignore[arg-type]
        rec.status = "cancelled"
        rec.message = f"cancelled: {why}"
        rec.finished_at = self.ctx.clock()
        self.ctx.commit(rec)
        self.ctx.emit(ApplyEvent(kind="note", address=rec.address, message=rec.message))
