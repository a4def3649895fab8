"""An in-memory Runtime (reconciler/backend.py's protocol) with a call record and injectable failures.

It simulates what a backend does, deterministically and without time:

- volumes, image, datasets, models and the sandbox are dict entries; ensure/prepare calls are
  idempotent and say `created | unchanged | updated`;
- a launched stage is a `FakeRun` that advances `steps_per_poll` steps on every poll, writes a
  checkpoint every `save_freq` steps and at its last step, and then succeeds (or fails / is
  lost at a scripted step, see `script_run`);
- `launch_stage` is idempotent per (stage, restart identity): a run of that identity that is
  still running is returned instead of a second one (what real backends do with their run
  markers), so a crash between launch and recording the handle never duplicates work.

Every call is appended to `calls`. `executions` counts real effects per address (a new run,
a dataset materialised, a model merged...), which is how tests prove that nothing that already
succeeded ran again. Failures: `fail_at(k, kind)` makes the k-th call (0-based, counting all
calls) fail; `fail_when(predicate, kind)` fails every call matching a predicate. Kinds:
`transient` / `terminal` raise the retool error before any effect; `crash` raises
`InjectedCrash` (a stand-in for the process dying) before the effect, `crash_after` after it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from reconciler.errors import TerminalError, TransientError
from reconciler.spec import Dataset, Image, Model, Sandbox, Spec, Volume
from reconciler.state.base import OpaqueRun, RunHandle
from reconciler.backend import Checkpoint, Outcome, PollsAtOwnPace, RenderedCommand, RunStatus, StageContext

FailureKind = Literal["transient", "terminal", "crash", "crash_after"]
FAILURE_KINDS: tuple[FailureKind, ...] = ("transient", "terminal", "crash", "crash_after")
T = TypeVar("T")


class InjectedCrash(Exception):
    """Simulates the apply process dying mid-call (not a RetoolError: nothing catches it)."""


@dataclass
class Call:
    index: int
    method: str
    address: str
    failed: FailureKind | None = None


@dataclass
class FakeRun:
    run_id: str
    stage: str
    restart_id: str
    total: int
    save_freq: int
    step: int
    resume_from: int | None
    state: Literal["running", "succeeded", "failed", "lost"] = "running"
    polls: int = 0


@dataclass
class RunScript:
    """How the next run of a stage ends: `fail` or `lost` once it reaches `at_step`."""

    outcome: Literal["fail", "lost"]
    at_step: int
    times: int = 1  # how many runs this script applies to


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class MemoryRuntime(PollsAtOwnPace):
    name: str = "memory"
    poll_interval_s: float = 0.0  # nothing to wait for: runs advance per poll
    steps_per_poll: int = 5
    default_total: int = 10
    preflight_problems: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)  # address -> reason

    calls: list[Call] = field(default_factory=list)
    executions: Counter[str] = field(default_factory=Counter)
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    image_id: str | None = None
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    sandbox: dict[str, Any] | None = None
    runs: dict[str, FakeRun] = field(default_factory=dict)
    # (stage, restart_id) -> {step: (valid, reason)}
    checkpoints: dict[tuple[str, str], dict[int, tuple[bool, str]]] = field(default_factory=dict)
    merged: dict[tuple[str, str, int], str] = field(default_factory=dict)
    scripts: dict[str, RunScript] = field(default_factory=dict)
    _fail_at: dict[int, FailureKind] = field(default_factory=dict)
    _fail_when: list[tuple[Callable[[Call], bool], FailureKind]] = field(default_factory=list)

    # ----------------------------------------------------------------- failure injection

    def fail_at(self, index: int, kind: FailureKind = "transient") -> None:
        self._fail_at[index] = kind

    def fail_when(self, predicate: Callable[[Call], bool], kind: FailureKind = "terminal") -> None:
        self._fail_when.append((predicate, kind))

    def clear_failures(self) -> None:
        self._fail_at.clear()
        self._fail_when.clear()

    def script_run(self, stage: str, outcome: Literal["fail", "lost"], at_step: int, times: int = 1) -> None:
        self.scripts[stage] = RunScript(outcome, at_step, times)

    def calls_to(self, method: str, address: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.method == method and (address is None or c.address == address)]

    def _call(self, method: str, address: str, effect: Callable[[], T]) -> T:
        call = Call(len(self.calls), method, address)
        self.calls.append(call)
        kind = self._fail_at.pop(call.index, None)
        if kind is None:
            kind = next((k for pred, k in self._fail_when if pred(call)), None)
        call.failed = kind
        if kind == "transient":
            raise TransientError(f"injected transient failure in {method}({address})")
        if kind == "terminal":
            raise TerminalError(f"injected terminal failure in {method}({address})")
        if kind == "crash":
            raise InjectedCrash(f"crash before {method}({address})")
        result = effect()
        if kind == "crash_after":
            raise InjectedCrash(f"crash after {method}({address})")
        return result

    # ----------------------------------------------------------------- environment

    def preflight(self, spec: Spec) -> list[str]:
        return self._call("preflight", "", lambda: list(self.preflight_problems))

    def blocked_reason(self, spec: Spec, address: str) -> str | None:
        return self._call("blocked_reason", address, lambda: self.blocked.get(address))

    # ----------------------------------------------------------------- resources

    def ensure_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome:
        def effect() -> Outcome:
            if name in self.volumes:
                return Outcome(change="unchanged", outputs=self.volumes[name])
            self.volumes[name] = {"path": f"/volumes/{name}"}
            self.executions[f"volume.{name}"] += 1
            return Outcome(change="created", outputs=self.volumes[name])

        return self._call("ensure_volume", f"volume.{name}", effect)

    def delete_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome:
        def effect() -> Outcome:
            if self.volumes.pop(name, None) is None:
                return Outcome(change="unchanged", message="already gone")
            return Outcome(change="updated", message="deleted")

        return self._call("delete_volume", f"volume.{name}", effect)

    def build_image(self, image: Image, spec: Spec) -> Outcome:
        def effect() -> Outcome:
            image_id = "im-" + _digest(image.model_dump(mode="json"))[:12]
            if image_id == self.image_id:
                return Outcome(change="unchanged", outputs={"image_id": image_id})
            change = "created" if self.image_id is None else "updated"
            self.image_id = image_id
            self.executions["image"] += 1
            return Outcome(change=change, outputs={"image_id": image_id})

        return self._call("build_image", "image", effect)

    def prepare_dataset(self, name: str, dataset: Dataset, spec: Spec, spec_dir: str) -> Outcome:
        def effect() -> Outcome:
            digest = _digest(dataset.model_dump(mode="json", exclude={"expected_rows"}))
            current = self.datasets.get(name)
            if current is not None and current["digest"] == digest:
                return Outcome(change="unchanged", outputs=current)
            rows = int(dataset.options.get("rows", dataset.max_rows or 64))
            self.datasets[name] = {"path": f"/volumes/{dataset.volume}/{name}.parquet", "digest": digest, "rows": rows}
            self.executions[f"dataset.{name}"] += 1
            return Outcome(change="created" if current is None else "updated", outputs=self.datasets[name])

        return self._call("prepare_dataset", f"dataset.{name}", effect)

    def prepare_model(self, name: str, model: Model, spec: Spec, spec_dir: str) -> Outcome:
        def effect() -> Outcome:
            digest = _digest(model.model_dump(mode="json"))
            current = self.models.get(name)
            if current is not None and current["digest"] == digest:
                return Outcome(change="unchanged", outputs=current)
            self.models[name] = {"path": f"/volumes/{model.volume}/{name}", "digest": digest}
            self.executions[f"model.{name}"] += 1
            return Outcome(change="created" if current is None else "updated", outputs=self.models[name])

        return self._call("prepare_model", f"model.{name}", effect)

    def ensure_sandbox(self, sandbox: Sandbox, spec: Spec) -> Outcome:
        def effect() -> Outcome:
            config = sandbox.model_dump(mode="json")
            if self.sandbox is not None and self.sandbox["config"] == config:
                return Outcome(change="unchanged", outputs={"url": self.sandbox["url"]})
            change = "created" if self.sandbox is None else "updated"
            self.sandbox = {"config": config, "url": "http://127.0.0.1:8080"}
            self.executions["sandbox"] += 1
            return Outcome(change=change, outputs={"url": self.sandbox["url"]})

        return self._call("ensure_sandbox", "sandbox", effect)

    # ----------------------------------------------------------------- stages

    def render_stage(self, ctx: StageContext) -> list[RenderedCommand]:
        def effect() -> list[RenderedCommand]:
            stage = ctx.spec.stages[ctx.stage]
            entry = "verl.trainer.sft_trainer" if stage.kind == "sft" else "verl.trainer.main_ppo"
            argv = ["python", "-m", entry, f"trainer.total_training_steps={ctx.total_steps}"]
            if ctx.resume_from is not None:
                argv.append(f"trainer.resume_from_path=global_step_{ctx.resume_from}")
            secret_env = [n for key in stage.secrets for n in ctx.spec.secrets[key].env]
            return [RenderedCommand(argv=argv, env={"RETOOL_STAGE": ctx.stage, **stage.env}, secret_env=secret_env)]

        return self._call("render_stage", f"stage.{ctx.stage}", effect)

    def launch_stage(self, ctx: StageContext) -> RunHandle:
        def effect() -> RunHandle:
            total = ctx.total_steps or self.default_total
            for run in self.runs.values():
                if run.stage == ctx.stage and run.restart_id == ctx.restart_id and run.state == "running":
                    run.total = total
                    return self._handle(run)
            start = ctx.resume_from or 0
            if ctx.resume_from is not None:
                valid = self.checkpoints.get((ctx.stage, ctx.restart_id), {}).get(ctx.resume_from)
                if not valid or not valid[0]:
                    raise TerminalError(f"no valid checkpoint global_step_{ctx.resume_from} to resume from")
            run = FakeRun(
                run_id=f"run-{len(self.runs)}", stage=ctx.stage, restart_id=ctx.restart_id, total=total,
                save_freq=ctx.spec.stages[ctx.stage].save_freq, step=start, resume_from=ctx.resume_from,
            )
            self.runs[run.run_id] = run
            self.executions[f"stage.{ctx.stage}"] += 1
            return self._handle(run)

        return self._call("launch_stage", f"stage.{ctx.stage}", effect)

    @staticmethod
    def _handle(run: FakeRun) -> RunHandle:
        return RunHandle(ref=OpaqueRun(run_id=run.run_id), stage=run.stage)

    def _run(self, handle: RunHandle) -> FakeRun | None:
        return self.runs.get(handle.ref.run_id) if isinstance(handle.ref, OpaqueRun) else None

    def poll_stage(self, handle: RunHandle) -> RunStatus:
        def effect() -> RunStatus:
            run = self._run(handle)
            if run is None:
                return RunStatus(state="lost", message="no such run")
            if run.state == "running":
                self._advance(run)
            return RunStatus(state=run.state, step=run.step, total=run.total, elapsed_s=float(run.polls))

        return self._call("poll_stage", f"stage.{handle.stage}", effect)

    def _advance(self, run: FakeRun) -> None:
        run.polls += 1
        script = self.scripts.get(run.stage)
        for _ in range(self.steps_per_poll):
            if run.step >= run.total:
                break
            run.step += 1
            if run.step % run.save_freq == 0 or run.step == run.total:
                self.checkpoints.setdefault((run.stage, run.restart_id), {})[run.step] = (True, "")
            if script is not None and script.times > 0 and run.step >= script.at_step:
                script.times -= 1
                run.state = "failed" if script.outcome == "fail" else "lost"
                return
        if run.step >= run.total:
            run.state = "succeeded"

    def cancel_stage(self, handle: RunHandle) -> None:
        def effect() -> None:
            run = self._run(handle)
            if run is not None and run.state == "running":
                run.state = "failed"

        self._call("cancel_stage", f"stage.{handle.stage}", effect)

    def discover_checkpoints(self, spec: Spec, stage: str, restart_id: str) -> list[Checkpoint]:
        def effect() -> list[Checkpoint]:
            found = []
            for (st, rid), steps in self.checkpoints.items():
                if st != stage:
                    continue
                for step, (valid, reason) in sorted(steps.items()):
                    if rid != restart_id:
                        valid, reason = False, "written under another restart identity"
                    found.append(Checkpoint(
                        step=step, path=f"/volumes/checkpoints/{stage}/{rid[:16]}/global_step_{step}",
                        valid=valid, reason=reason, restart_id=rid,
                    ))
            return found

        return self._call("discover_checkpoints", f"stage.{stage}", effect)

    def finalize_stage(self, ctx: StageContext, checkpoint: Checkpoint) -> Outcome:
        def effect() -> Outcome:
            key = (ctx.stage, ctx.restart_id, checkpoint.step)
            change = "unchanged"
            if key not in self.merged:
                self.merged[key] = f"/volumes/models/{ctx.stage}/{ctx.restart_id[:16]}/step_{checkpoint.step}"
                self.executions[f"finalize:stage.{ctx.stage}"] += 1
                change = "created"
            return Outcome(change=change, outputs={"model_path": self.merged[key], "final_step": checkpoint.step})

        return self._call("finalize_stage", f"stage.{ctx.stage}", effect)


def make_runtime(spec: Spec, state_dir: str) -> MemoryRuntime:
    """Factory for `RETOOL_TEST_RUNTIME=tests.fakes.memory_runtime:make_runtime`."""
    return MemoryRuntime()
