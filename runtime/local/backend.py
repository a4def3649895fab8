"""The local backend: volumes are directories, stages are detached process groups on this
machine (on CPU through runtime.verl.cpu_platform when there is no GPU), the sandbox is a
local server process. What a stage runs, how its checkpoints are judged and what it
outputs is its stage kind's (runtime.stage_kinds); this backend supplies paths, this
machine, its files and processes. Helpers: runtime.local.resources (environment record,
data/models, sandbox), runtime.processes (detached runs), runtime.local.runs (the
active-run record, re-attach, a run's state), runtime.local.finalize (the merge and tool
check as a subprocess), runtime.local.stage_files (a run directory's files).

Layout (`state dir` is `<repo>/.retool` unless the spec says otherwise):

    <volumes root>        spec.local.root (relative: to the state dir's parent) or <state dir>/volumes
    volume                <volumes root>/<volume>/
    dataset               <volume>/datasets/<name>/{train.parquet, meta.json}  (+ .<name>.prepared.json beside it)
    model                 <volume>/models/<name>/                              (+ .<name>.prepared.json beside it)
    stage run dir         <volume>/<stage>/<restart_id[:16]>/
        retool.json                          marker: full restart id, stage, world size
        global_step_N/, latest_checkpointed_iteration.txt   verl's checkpoints and tracker
        merged/, merged.json                 Hugging Face model of the final checkpoint (+ what was merged)
        metrics.jsonl                        per-step metrics parsed from the log
        active_run.json                      the handle of the run launched into it (re-attach)
    replaced runs         <volume>/<stage>/.replaced/<restart_id[:16]>-<time>/  (a forced rerun moves, never deletes)
    logs                  <state dir>/logs/<stage>-<restart_id[:8]>-<time>.log  (+ .exit.json, .plan.json)
    sandbox               <state dir>/sandbox.json, <state dir>/logs/sandbox-<time>.log
    environment record    <state dir>/image.json

Decisions:
- A launch with `resume_from=None` trains from scratch: checkpoints already under that
  restart identity (a `--replace`) are moved to `.replaced/`. With `resume_from=N` verl is
  told `trainer.resume_from_path=.../global_step_N` (the step the plan named).
- A launch finds `active_run.json` first: if that run still runs (same pid and start ticks),
  it returns its handle instead of starting a second run over it (apply died before
  recording the handle). A directory whose run is alive is never moved aside.
- The merge runs in `finalize_stage`, not in the detached run: it merges exactly the
  checkpoint the reconciler validated, and is skipped when `merged.json` already names it.
- `tool_call_check`: finalize measures the merged model; a rate below `min_rate` fails the
  stage with the rate, examples and a hint (the checkpoints and merged model stay; more
  epochs resume). The result is cached in merged.json, so a retry does not re-measure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

from reconciler.errors import TerminalError
from reconciler.spec import Dataset, Image, Model, Sandbox, Spec, Volume
from reconciler.state.base import LocalRun, RunHandle, WandbRun
from runtime import checkpoints as ckpts
from runtime.local import resources as res
from runtime.local import runs
from runtime import metrics as met
from runtime import processes as procs
from reconciler.backend import Checkpoint, ChecksPresence, Outcome, ReadsMetrics, RenderedCommand, RunStatus, StageContext
from runtime.local.finalize import LocalMerger
from runtime.local.stage_files import LocalStageFiles
from runtime.stage_kind import Machine
from runtime.stage_kinds import kind_of
from runtime import tracking
from runtime.verl.common import StagePaths, local_gpu_count, secret_env_names, with_planned_inputs

DEVICE_ENV = "RETOOL_LOCAL_DEVICE"  # "cpu" or "cuda": override GPU detection


class LocalRuntime(ChecksPresence, ReadsMetrics):
    """`reconciler.backend.Runtime` on this machine."""

    name = "local"

    def __init__(self, state_dir: str) -> None:
        self.state_dir = Path(state_dir).resolve()
        self._followers: dict[str, met.LogFollower] = {}  # log path -> incremental parser

    # ------------------------------------------------------------------ layout

    def volumes_root(self, spec: Spec) -> Path:
        if spec.local.root:
            root = Path(spec.local.root).expanduser()
            return root if root.is_absolute() else (self.state_dir.parent / root).resolve()
        return self.state_dir / "volumes"

    def volume_dir(self, spec: Spec, volume: str) -> Path:
        return self.volumes_root(spec) / volume

    def stage_root(self, spec: Spec, stage: str) -> Path:
        return self.volume_dir(spec, spec.stages[stage].volume) / stage

    def stage_paths(self, spec: Spec, stage: str, restart_id: str) -> StagePaths:
        run_dir = self.stage_root(spec, stage) / ckpts.restart_dir_name(restart_id)
        return StagePaths(stage_dir=str(run_dir), ckpt_dir=str(run_dir), merged_dir=str(run_dir / "merged"))

    def wandb_run(self, spec: Spec, stage: str, restart_id: str) -> WandbRun | None:
        """The W&B run of a stage's run: online when WANDB_API_KEY is in this environment
        (the trainer inherits it), else offline into the run directory (runtime.tracking)."""
        key = bool(os.environ.get(tracking.API_KEY_ENV)) or tracking.key_declared(spec, stage)
        return tracking.wandb_run(spec, stage, restart_id, key_available=key)

    def use_cpu(self) -> bool:
        forced = os.environ.get(DEVICE_ENV, "").strip().lower()
        if forced in ("cpu", "cuda"):
            return forced == "cpu"
        return local_gpu_count() == 0

    def machine(self) -> Machine:
        """This machine for a stage kind: its device, its GPUs, its modules."""
        cpu = self.use_cpu()
        return Machine(
            device="cpu" if cpu else "cuda", gpus=0 if cpu else local_gpu_count(),
            # verl defaults to FlashAttention 2 on GPU; without flash_attn installed, sdpa.
            attn_implementation=None if cpu or importlib.util.find_spec("flash_attn") else "sdpa",
            has_module=lambda name: importlib.util.find_spec(name) is not None,
            wandb_key=bool(os.environ.get(tracking.API_KEY_ENV)),  # the trainer inherits this environment
        )

    def stage_files(self, spec: Spec, stage: str, restart_id: str) -> LocalStageFiles:
        return LocalStageFiles(
            root=self.stage_root(spec, stage), run=Path(self.stage_paths(spec, stage, restart_id).stage_dir)
        )

    # ------------------------------------------------------------------ checks

    def state_dir_problems(self) -> list[str]:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return [f"state directory {self.state_dir} is not writable: {e}"]
        return []

    def preflight(self, spec: Spec) -> list[str]:
        problems = self.state_dir_problems()
        if spec.stages:
            for module in ("torch", "verl", "transformers"):
                if importlib.util.find_spec(module) is None:
                    problems.append(
                        f"{module} is not installed (install the training extra: "
                        "pip install -c constraints.txt -e '.[train]')"
                    )
        for name, stage in spec.stages.items():
            try:
                names = secret_env_names(spec, stage.secrets)
            except TerminalError as e:
                problems.append(f"stage.{name}: {e.summary}")
                continue
            missing = [n for n in names if not os.environ.get(n)]
            if missing:
                problems.append(f"stage.{name} needs environment variable(s) {', '.join(missing)} (secrets)")
        return problems

    def blocked_reason(self, spec: Spec, address: str) -> str | None:
        kind, _, name = address.partition(".")
        if kind != "stage" or name not in spec.stages:
            return None
        stage, machine = spec.stages[name], self.machine()
        res = stage.resources
        if res.nodes > 1:
            return (
                f"asks for {res.nodes} nodes, but the local backend runs on one machine; run it with "
                "`backend: modal` (a clustered function), or set resources.nodes: 1"
            )
        if res.gpu is not None:
            if machine.gpus < res.gpus_per_node:
                return (
                    f"asks for {res.gpus_per_node}× {res.gpu} but this machine has {machine.gpus} GPU(s); "
                    "run it with `backend: modal`, or drop `resources.gpu` to train on this machine"
                )
        return kind_of(stage).blocker(stage, machine)

    # ------------------------------------------------------------------ volumes and environment

    def ensure_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome:
        path = self.volume_dir(spec, name)
        if path.is_dir():
            return Outcome(change="unchanged", outputs={"path": str(path)})
        path.mkdir(parents=True, exist_ok=True)
        return Outcome(change="created", outputs={"path": str(path)}, message=f"created {path}")

    def delete_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome:
        if volume.protect:
            raise TerminalError(f"volume.{name} is protected", hint="set `protect: false` first if you mean it")
        path = self.volume_dir(spec, name)
        if not path.exists():
            return Outcome(change="unchanged", message=f"{path} does not exist")
        shutil.rmtree(path)
        return Outcome(change="updated", message=f"deleted {path}")

    def build_image(self, image: Image, spec: Spec) -> Outcome:
        """Locally there is no image to build: record (and check) the Python environment."""
        gpus = 0 if self.use_cpu() else local_gpu_count()
        return res.record_environment(
            self.state_dir / "image.json", image, device=f"cuda x{gpus}" if gpus else "cpu",
            needs_training=bool(spec.stages),
        )

    # ------------------------------------------------------------------ data and models

    def prepare_dataset(self, name: str, dataset: Dataset, spec: Spec, spec_dir: str) -> Outcome:
        from runtime import data

        out_dir = self.volume_dir(spec, dataset.volume) / "datasets" / name
        return res.prepare_once(
            dataset, out_dir, spec_dir, data.read_outputs,
            lambda: data.prepare(name, dataset, out_dir, Path(spec_dir), sandbox_url=self._live_sandbox_url(spec)),
            lambda o: f"{o.rows} rows" + (f", {o.skipped} skipped" if o.skipped else ""),
        )

    def prepare_model(self, name: str, model: Model, spec: Spec, spec_dir: str) -> Outcome:
        from runtime import models
        from runtime.hf_quiet import quiet

        out_dir = self.volume_dir(spec, model.volume) / "models" / name
        return res.prepare_once(
            model, out_dir, spec_dir, models.read_outputs,
            lambda: quiet(models.prepare, name, model, out_dir, Path(spec_dir)), lambda o: o.path,
        )

    # ------------------------------------------------------------------ sandbox

    def missing_reason(self, spec: Spec, address: str) -> str | None:
        # Nothing local is gone in a way refresh should act on: volumes, data and models are
        # trusted as recorded, and a stopped sidecar is idle (below), not missing.
        return None

    def idle_reason(self, spec: Spec, address: str) -> str | None:
        # The sidecar ends by design once nothing has used it for a while, and whatever needs
        # it starts it again (`_sandbox_url`): a stopped sidecar is idle, never drift. Volumes,
        # data and models are trusted as recorded (recreating them would change their output
        # identity and rerun every stage downstream).
        if address == "sandbox" and spec.sandbox is not None and not self._live_sandbox_url(spec, hold=False):
            return "idle, starts on demand (the sidecar is stopped: nothing has used it for a while)"
        return None

    def ensure_sandbox(self, sandbox: Sandbox, spec: Spec) -> Outcome:
        return res.ensure_sandbox(sandbox, self.state_dir / "sandbox.json", self.state_dir / "logs")

    def _live_sandbox_url(self, spec: Spec, *, hold: bool = True) -> str | None:
        return res.live_sandbox_url(self.state_dir / "sandbox.json", hold=hold)

    def _sandbox_url(self, spec: Spec) -> str | None:
        """The sidecar's URL for work about to call it (data generation, an RL or eval run),
        held up by this process's lease; started on demand when it idled out since the apply
        that created it. None only when the spec declares no sandbox and none runs."""
        url = self._live_sandbox_url(spec)
        if url is None and spec.sandbox is not None:
            url = str(self.ensure_sandbox(spec.sandbox, spec).outputs["url"])
        return url

    # ------------------------------------------------------------------ stages: commands

    def render_stage(self, ctx: StageContext) -> list[RenderedCommand]:
        """The stage's command(s), then the merge `finalize_stage` runs on the final checkpoint.
        Inputs not prepared yet are shown where they will be (`retool render` before `apply`)."""
        ctx = self._with_planned_inputs(ctx)
        paths = self.stage_paths(ctx.spec, ctx.stage, ctx.restart_id)
        sandbox = self._live_sandbox_url(ctx.spec, hold=False) or f"http://127.0.0.1:{(ctx.spec.sandbox and ctx.spec.sandbox.port) or '<port>'}"
        commands = self._train_commands(ctx, paths, sandbox_url=sandbox)
        return [*commands, *kind_of(ctx.spec.stages[ctx.stage]).finalize_commands(ctx, paths)]

    def _with_planned_inputs(self, ctx: StageContext) -> StageContext:
        spec = ctx.spec
        return with_planned_inputs(
            ctx,
            dataset_dir=lambda n: str(self.volume_dir(spec, spec.datasets[n].volume) / "datasets" / n),
            model_dir=lambda n: str(self.volume_dir(spec, spec.models[n].volume) / "models" / n),
            stage_root=lambda n: str(self.stage_root(spec, n)),
        )

    def _train_commands(self, ctx: StageContext, paths: StagePaths, *, sandbox_url: str | None) -> list[RenderedCommand]:
        return kind_of(ctx.spec.stages[ctx.stage]).commands(ctx, paths, self.machine(), sandbox_url)

    @staticmethod
    def _executable(argv: list[str]) -> list[str]:
        return procs.this_interpreter(argv)

    # ------------------------------------------------------------------ stages: runs

    def launch_stage(self, ctx: StageContext) -> RunHandle:
        """Start the stage detached, or re-attach to the run an earlier launch of the same
        stage and restart identity started and that still runs (runtime.local.runs)."""
        stage = ctx.spec.stages[ctx.stage]
        kind = kind_of(stage)
        paths = self.stage_paths(ctx.spec, ctx.stage, ctx.restart_id)
        run_dir = Path(paths.stage_dir)
        prior = runs.read_active(run_dir)
        if prior is not None and runs.is_running(prior) and prior.total_steps == ctx.total_steps:
            return prior.model_copy(update={"reattached": True})
        # RL and eval call the sandbox: start it again if it idled out since it was created.
        sandbox_url = self._sandbox_url(ctx.spec) if stage.kind in ("rl", "eval") else self._live_sandbox_url(ctx.spec)
        commands = self._train_commands(ctx, paths, sandbox_url=sandbox_url)
        missing = [n for c in commands for n in c.secret_env if not os.environ.get(n)]
        if missing:
            raise TerminalError(f"stage.{ctx.stage} needs {', '.join(missing)} in the environment (secrets)")
        if prior is not None:
            # Nobody recorded that run (or it ended): stop it, and any trainers it left behind.
            runs.stop(prior)
        runs.prepare_run_dir(
            run_dir, ctx, stage.resources.world_size, kind.run_inputs(ctx, paths, self.machine(), sandbox_url),
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log_path = self.state_dir / "logs" / f"{ctx.stage}-{ctx.restart_id[:8]}-{stamp}.log"
        exit_path = log_path.with_name(log_path.stem + ".exit.json")
        planned = [
            procs.PlannedCommand(argv=self._executable(c.argv), env=c.env, cwd=c.cwd or str(run_dir)) for c in commands
        ]
        info = procs.start_detached(planned, log_path=log_path, exit_path=exit_path, cwd=str(run_dir))
        if kind.uses_sandbox:
            # The run calls the sidecar for as long as it runs, also after apply exits (--no-wait):
            # its leader's lease keeps the sidecar from idling out between rollouts.
            res.take_lease(self.state_dir, info.pid)
        handle = RunHandle(
            ref=LocalRun(
                pid=info.pid, pgid=info.pgid, start_ticks=info.start_ticks, tag=info.tag, log_path=str(log_path),
                exit_path=str(exit_path), metrics_path=str(run_dir / "metrics.jsonl"), stage_dir=paths.stage_dir,
                device="cpu" if self.use_cpu() else "cuda",
            ),
            stage=ctx.stage, kind=stage.kind, restart_id=ctx.restart_id, command=planned[-1].argv,
            total_steps=ctx.total_steps, resume_from=ctx.resume_from,
            wandb=self.wandb_run(ctx.spec, ctx.stage, ctx.restart_id),
        )
        runs.write_active(run_dir, handle)  # before returning: a relaunch finds it (see local_runs)
        return handle

    def poll_stage(self, handle: RunHandle) -> RunStatus:
        ref = runs.local_ref(handle)
        follower = self._followers.get(ref.log_path)
        if follower is None:
            follower = self._followers[ref.log_path] = runs.follower_for(handle)
        return runs.observe(handle, follower)

    def cancel_stage(self, handle: RunHandle) -> None:
        ref = runs.local_ref(handle)
        exit_path = runs.exit_path_of(handle)
        if not procs.run_members(ref.pgid, ref.tag):
            return
        killed = procs.terminate_run(ref.pgid, ref.tag)
        if exit_path.name and procs.read_exit(exit_path) is None:  # it died before it could write one
            sig = "SIGKILL" if killed else "SIGTERM"
            procs.write_exit(exit_path, procs.ExitRecord(returncode=-9 if killed else -15, signal=sig, cancelled=True))

    def discover_checkpoints(self, spec: Spec, stage: str, restart_id: str) -> list[Checkpoint]:
        definition = spec.stages[stage]
        return kind_of(definition).discover(
            self.stage_files(spec, stage, restart_id), world_size=definition.resources.world_size, restart_id=restart_id,
        )

    # ------------------------------------------------------------------ finalize

    def finalize_stage(self, ctx: StageContext, checkpoint: Checkpoint) -> Outcome:
        """The stage kind's finalize (runtime.verl.kind: merge into `merged/`, skipped when
        merged.json names the checkpoint, and the SFT tool-call check; runtime.eval.kind:
        metrics), with this machine's files and merge (runtime.local.finalize)."""
        paths = self.stage_paths(ctx.spec, ctx.stage, ctx.restart_id)
        merger = LocalMerger(
            stage=ctx.stage, restart_id=ctx.restart_id, paths=paths, logs_dir=self.state_dir / "logs",
            executable=self._executable,
        )
        return kind_of(ctx.spec.stages[ctx.stage]).finalize(
            ctx, checkpoint, paths, self.stage_files(ctx.spec, ctx.stage, ctx.restart_id), merger,
        )

    def read_metrics(self, spec: Spec, stage: str, restart_id: str) -> list[tuple[int, dict[str, float]]]:
        """A run's per-step metrics (its metrics.jsonl), for `retool report`."""
        path = Path(self.stage_paths(spec, stage, restart_id).stage_dir) / "metrics.jsonl"
        return [(r.step, dict(r.values)) for r in met.read_file(path)]
