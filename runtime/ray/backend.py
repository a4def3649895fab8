"""The Ray backend: the spec on the user's own Ray cluster, through Ray's Jobs API.

Everything that lives in files is the local backend's, moved into the cluster's shared
storage (`ray.storage`, mounted at the same path on every node and on the machine that runs
retool): volumes are folders under `<storage>/volumes/`, datasets and models are prepared
into them, checkpoints are discovered and merged from them (runtime.local.backend, which
this class extends). What runs is Ray's: each stage run is a Ray job (runtime.ray.jobs)
whose entrypoint (runtime.ray.job) runs the stage kind's commands on the cluster, and the
sandbox is a long-running Ray job of its own (runtime.ray.sandbox_job).

Layout (in the shared storage):

    <storage>/volumes/<volume>/...                 as the local backend's volumes
    <stage run dir>/ray/<submission id>.plan.json  what the job runs (RunPlan)
    <stage run dir>/ray/<submission id>.exit.json  how its commands ended (ExitRecord)
    <storage>/.retool-sandbox/<spec>/<id>.json      where the sandbox job serves (RaySandbox)
    <storage>/.retool-state/<key>/                  state and its lease lock (reconciler.state.shared_dir)

Decisions:
- A launch first looks for a live job of the same stage and restart identity (by its
  submission id, runtime.ray.jobs): one is attached to, never doubled.
- RL jobs ask Ray for one CPU for their entrypoint: verl's own workers ask the cluster for
  their GPUs (`trainer.nnodes` x `trainer.n_gpus_per_node`). SFT and eval entrypoints run
  the trainer themselves, so they ask for the stage's GPUs, CPUs and memory.
- An SFT stage on N > 1 nodes is a job whose entrypoint (runtime.ray.multinode) reserves one
  bundle per node (STRICT_SPREAD placement group) and runs one rank of runtime.cluster's
  leader/member role in each: torchrun once per node, `--node_rank r`, rank 0's address.
- The job's log is read with `get_job_logs` into a copy under `<state dir>/logs/`, which
  the same log follower as the local backend's parses (progress, metrics, sparklines).
- The merge and the tool-call check run on this machine, from the shared storage
  (runtime.local.finalize), as on the local backend.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.backend import ChecksReadiness, Outcome, RenderedCommand, ReportsCapacity, RunStatus, StageContext
from reconciler.errors import TerminalError, TransientError
from reconciler.readiness import DoctorCheck
from reconciler.spec import Image, Sandbox, Spec, Stage
from reconciler.state.base import RayRun, RunHandle, StateStore, WandbRun
from runtime import processes as procs
from runtime import records, tracking
from runtime.local import resources as res
from runtime.local import runs
from runtime.local.backend import LocalRuntime
from runtime.ray import cluster, jobs
from runtime.cluster.liveness import liveness_text
from runtime.records import ExitRecord, MultiNodePlan, PlannedCommand, RayLiveness, RaySandbox, RunPlan
from runtime.stage_kind import Machine
from runtime.stage_kinds import kind_of
from runtime.stamps import short_hash
from runtime.verl.common import StagePaths

SANDBOX_NODE = "sandbox"
SANDBOX_READY_S = 300.0
STOP_WAIT_S = "60"  # `ray job stop`: SIGTERM, then SIGKILL after this long (verl finishes a save)
# verl's `ray.init` arguments for a Ray it starts itself; a job joins the cluster, whose
# nodes declare their resources (`ray start --num-gpus ...`), and Ray refuses them there.
RAY_INIT_RESOURCES = ("+ray_kwargs.ray_init.num_gpus=", "ray_kwargs.ray_init.num_cpus=")


def stage_node(stage: str) -> str:
    return f"stage-{stage}"


def ray_ref(handle: RunHandle) -> RayRun:
    if not isinstance(handle.ref, RayRun):
        raise TerminalError("this run was not started by the Ray backend", f"handle backend {handle.backend}")
    return handle.ref


def run_tag(run_dir: str) -> str:
    """One tag per run directory: every attempt's processes carry it (runtime.ray.job)."""
    return "ray-" + hashlib.sha256(run_dir.encode()).hexdigest()[:16]


def job_file(run_dir: Path, sid: str, what: str) -> Path:
    """A job's own file beside its run: `<run dir>/ray/<submission id>.<what>.json` (plan,
    exit, nodes, ranks, liveness)."""
    return run_dir / "ray" / f"{sid}.{what}.json"


def spans_nodes(stage: Stage) -> bool:
    """A stage whose job places one rank per node itself (runtime.ray.multinode)."""
    return stage.kind == "sft" and stage.resources.nodes > 1


def entrypoint_resources(stage: Stage) -> dict[str, Any]:
    """What Ray reserves for a stage job's entrypoint (see the module docstring)."""
    if stage.kind == "rl":
        return {"entrypoint_num_cpus": 1}
    if spans_nodes(stage):  # the entrypoint only drives; each node's bundle holds the trainer's share
        return {"entrypoint_num_cpus": 0}
    share = cluster.node_share(stage)
    out: dict[str, Any] = {"entrypoint_num_cpus": share.cpus}
    if share.gpus:
        out["entrypoint_num_gpus"] = share.gpus
    if share.memory_bytes:
        out["entrypoint_memory"] = share.memory_bytes
    if share.accelerator:
        out["entrypoint_resources"] = {share.accelerator: 0.001}
    return out


class RayRuntime(LocalRuntime, ChecksReadiness, ReportsCapacity):
    """`reconciler.backend.Runtime` on a Ray cluster (its Jobs API and shared storage)."""

    name = "ray"

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self._clients: dict[str, Any] = {}

    # ------------------------------------------------------------------ layout

    @staticmethod
    def storage(spec: Spec) -> Path:
        if not spec.ray.storage:
            raise TerminalError("ray.storage is not set", hint="set `ray: {storage: /shared/retool}`")
        return Path(spec.ray.storage).expanduser()

    def volumes_root(self, spec: Spec) -> Path:
        return self.storage(spec) / "volumes"

    def sandbox_dir(self, spec: Spec) -> Path:
        return self.storage(spec) / ".retool-sandbox" / spec.name

    def _client(self, spec: Spec) -> Any:
        return self._client_at(jobs.address_of(spec))

    def _client_at(self, address: str) -> Any:
        if address not in self._clients:
            self._clients[address] = jobs.client_at(address)
        return self._clients[address]

    def wandb_run(self, spec: Spec, stage: str, restart_id: str) -> WandbRun | None:
        """The W&B run of a stage's run: the jobs see none of this machine's environment, so
        online only when one of the stage's secrets carries WANDB_API_KEY (runtime.tracking)."""
        return tracking.wandb_run(spec, stage, restart_id, key_available=tracking.key_declared(spec, stage))

    def stage_machine(self, stage: Stage) -> Machine:
        """The cluster's nodes as a stage kind sees them: the GPUs the stage asks for (CPU
        when none); modules as this machine has them (the jobs run the same environment)."""
        r = stage.resources
        gpu = r.gpu is not None
        return Machine(
            device="cuda" if gpu else "cpu", gpus=r.gpus_per_node,
            attn_implementation=None if not gpu or importlib.util.find_spec("flash_attn") else "sdpa",
            has_module=lambda name: importlib.util.find_spec(name) is not None,
            wandb_key=False,  # a job sees the key only through the stage's secrets (its runtime_env)
        )

    # ------------------------------------------------------------------ checks

    def preflight(self, spec: Spec) -> list[str]:
        problems = self.state_dir_problems()
        storage = self.storage(spec)
        if not storage.is_dir() or not os.access(storage, os.W_OK):
            problems.append(f"ray.storage {storage} is not a writable directory on this machine (mount it here too)")
        if importlib.util.find_spec("ray") is None:
            problems.append("ray is not installed (pip install 'ray[default]')")
            return problems
        try:
            self._client(spec)
        except (TerminalError, TransientError) as e:
            problems.append(e.summary + (f": {e.detail}" if getattr(e, "detail", "") else ""))
        return problems

    def blocked_reason(self, spec: Spec, address: str) -> str | None:
        kind, _, name = address.partition(".")
        if kind != "stage" or name not in spec.stages:
            return None
        stage = spec.stages[name]
        if stage.resources.nodes > 1 and stage.kind not in ("rl", "sft"):
            return (
                f"asks for {stage.resources.nodes} nodes; on Ray only SFT (one torchrun per node) and RL (verl's "
                f"trainer.nnodes) stages span nodes, not {stage.kind}; set resources.nodes: 1"
            )
        return kind_of(stage).blocker(stage, self.stage_machine(stage))

    def capacity_note(self, spec: Spec) -> str | None:
        """The cluster's free GPUs now (the dashboard's cluster status over HTTP: no `import
        ray`), next to what each GPU stage asks for."""
        if not spec.stages:
            return None
        address = jobs.address_of(spec)
        needs = ", ".join(
            f"stage.{n} needs {cluster.need_text(s)}"
            for n, s in spec.stages.items() if s.resources.gpus_per_node or s.resources.nodes > 1
        ) or "the stages need no GPU"
        try:
            free, total = cluster.free_gpus(address)
        except Exception as e:  # noqa: BLE001 - any failure is the note's answer
            return f"Ray cluster at {address}: free GPUs unknown ({type(e).__name__}: {str(e)[:120]}); {needs}"
        return f"Ray cluster at {address}: {free} of {total} GPUs free; {needs}"

    def doctor_checks(
        self, spec: Spec, open_store: Callable[[], StateStore], *, build_image: bool = True
    ) -> list[DoctorCheck]:
        from runtime.ray.doctor import doctor_checks

        return doctor_checks(self, spec, open_store)

    # ------------------------------------------------------------------ environment

    def build_image(self, image: Image, spec: Spec) -> Outcome:
        """The jobs run the cluster's Python with retool's packages shipped as `py_modules`:
        record (and check) this machine's environment, which finalize runs in."""
        return res.record_environment(
            self.state_dir / "image.json", image, device="ray", needs_training=bool(spec.stages),
        )

    def runtime_env(self, spec: Spec, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        return jobs.ray_runtime_env(spec, {"RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S, **(extra_env or {})})

    # ------------------------------------------------------------------ sandbox (a Ray job)

    def _sandbox_jobs(self, spec: Spec) -> list[Any]:
        head = f"retool-{jobs.slug(spec.name)}-{SANDBOX_NODE}-"
        return [j for j in jobs.list_jobs(self._client(spec)) if (j.submission_id or "").startswith(head)]

    def _sandbox_record(self, spec: Spec, submission_id: str) -> RaySandbox | None:
        return records.load(RaySandbox, self.sandbox_dir(spec) / f"{submission_id}.json")

    def missing_reason(self, spec: Spec, address: str) -> str | None:
        # The sandbox job never idles out: when Ray has no running one (a restarted head, a
        # stopped job), apply starts it again. Files in the storage are trusted as recorded.
        if address == "sandbox" and spec.sandbox is not None and not self._live_sandbox_url(spec, hold=False):
            return "the sandbox job is not running on the Ray cluster"
        return None

    def idle_reason(self, spec: Spec, address: str) -> str | None:
        return None

    def _sandbox_url(self, spec: Spec) -> str | None:
        return self._live_sandbox_url(spec)

    def _live_sandbox_url(self, spec: Spec, *, hold: bool = True) -> str | None:
        if spec.sandbox is None:
            return None
        for job in reversed(self._sandbox_jobs(spec)):
            if jobs.status_name(job) != "RUNNING":
                continue
            record = self._sandbox_record(spec, job.submission_id or "")
            if record is not None and res.ping(record.url):
                return record.url
        return None

    def ensure_sandbox(self, sandbox: Sandbox, spec: Spec) -> Outcome:
        """Find the sandbox job of these settings serving, or (re)start it; other settings'
        sandbox jobs are stopped."""
        jc = self._client(spec)
        config = short_hash(sandbox.model_dump(mode="json"))
        every = self._sandbox_jobs(spec)
        mine = jobs.jobs_of(every, spec.name, SANDBOX_NODE, config)
        change = "updated" if every else "created"
        for job in every:
            if job not in mine and jobs.status_name(job) not in jobs.TERMINAL:
                jobs.stop(jc, job.submission_id or "")
        for job in reversed(mine):
            if jobs.status_name(job) in jobs.TERMINAL:
                continue
            url = self._wait_for_sandbox(spec, job.submission_id or "")
            if url is not None:
                return Outcome(change="unchanged", outputs={"url": url, "submission_id": job.submission_id})
            jobs.stop(jc, job.submission_id or "")  # running, but not answering
        sid = jobs.next_submission_id(spec.name, SANDBOX_NODE, config, mine)
        record_path = self.sandbox_dir(spec) / f"{sid}.json"
        record_path.parent.mkdir(parents=True, exist_ok=True)
        # A restarted head numbers attempts afresh: never read the record of an earlier cluster's job.
        record_path.unlink(missing_ok=True)
        entrypoint = shlex.join(
            ["python", "-m", "runtime.ray.sandbox_job", str(record_path), sid, sandbox.model_dump_json()]
        )
        jobs.submit(
            jc, sid, entrypoint=entrypoint, runtime_env=self.runtime_env(spec), entrypoint_num_cpus=1,
            metadata={"retool_spec": spec.name, "retool_node": SANDBOX_NODE, "retool_config": config},
        )
        url = self._wait_for_sandbox(spec, sid)
        if url is None:
            raise TerminalError(f"the sandbox job {sid} did not start serving", self._job_tail(jc, sid))
        return Outcome(change=change, outputs={"url": url, "submission_id": sid}, message=f"sandbox at {url} (Ray job {sid})")

    def _wait_for_sandbox(self, spec: Spec, sid: str) -> str | None:
        """The URL the sandbox job `sid` serves at once it answers; None when the job ended."""
        jc = self._client(spec)
        deadline = time.time() + SANDBOX_READY_S
        while time.time() < deadline:
            record = self._sandbox_record(spec, sid)
            if record is not None and res.ping(record.url):
                return record.url
            job = jobs.job_info(jc, sid)
            if job is None or jobs.status_name(job) in jobs.TERMINAL:
                return None
            time.sleep(1.0)
        return None

    @staticmethod
    def _job_tail(jc: Any, sid: str, lines: int = 15) -> str:
        try:
            return "\n".join(str(jc.get_job_logs(sid)).splitlines()[-lines:])
        except (RuntimeError, ConnectionError):
            return ""

    # ------------------------------------------------------------------ stages: commands

    def _train_commands(self, ctx: StageContext, paths: StagePaths, *, sandbox_url: str | None) -> list[RenderedCommand]:
        stage = ctx.spec.stages[ctx.stage]
        commands = kind_of(stage).commands(ctx, paths, self.stage_machine(stage), sandbox_url)
        return [c.model_copy(update={"argv": [a for a in c.argv if not a.startswith(RAY_INIT_RESOURCES)]})
                for c in commands]

    # ------------------------------------------------------------------ stages: runs

    def launch_stage(self, ctx: StageContext) -> RunHandle:
        """Submit the stage's job, or attach to the live job an earlier launch of the same
        stage and restart identity submitted (runtime.ray.jobs)."""
        spec, stage = ctx.spec, ctx.spec.stages[ctx.stage]
        kind = kind_of(stage)
        paths = self.stage_paths(spec, ctx.stage, ctx.restart_id)
        run_dir = Path(paths.stage_dir)
        jc = self._client(spec)
        node = stage_node(ctx.stage)
        attempts = jobs.jobs_of(jobs.list_jobs(jc), spec.name, node, ctx.restart_id)
        live = [j for j in attempts if jobs.status_name(j) not in jobs.TERMINAL]
        if live and (live[-1].metadata or {}).get("retool_total_steps") == str(ctx.total_steps):
            meta = live[-1].metadata or {}
            resumed = meta.get("retool_resume_from", "")
            return self._handle(ctx, paths, live[-1].submission_id or "", reattached=True,
                                resume_from=int(resumed) if resumed.isdigit() else None)
        for job in live:  # another step count: that run is replaced, from its checkpoints
            jobs.stop(jc, job.submission_id or "")
        sandbox_url = self._live_sandbox_url(spec) if kind.uses_sandbox else None
        commands = self._train_commands(ctx, paths, sandbox_url=sandbox_url)
        secret_names = sorted({n for c in commands for n in c.secret_env})
        missing = [n for n in secret_names if not os.environ.get(n)]
        if missing:
            raise TerminalError(f"stage.{ctx.stage} needs {', '.join(missing)} in the environment (secrets)")
        runs.prepare_run_dir(
            run_dir, ctx, stage.resources.world_size, kind.run_inputs(ctx, paths, self.stage_machine(stage), sandbox_url),
        )
        # The commands' environment also goes to every Ray worker the job starts (verl's RL
        # workers are started by the cluster's raylets, not by the entrypoint); verl's own
        # `ray.init(runtime_env=...)` is merged with the job's, key by key.
        job_env = {k: v for c in commands for k, v in c.env.items()} | {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
        sid = jobs.next_submission_id(spec.name, node, ctx.restart_id, attempts)
        plan_path, exit_path = job_file(run_dir, sid, "plan"), job_file(run_dir, sid, "exit")
        planned = [PlannedCommand(argv=c.argv, env=c.env, cwd=c.cwd or str(run_dir)) for c in commands]
        run_plan = RunPlan(commands=planned, exit_path=str(exit_path))
        records.save(plan_path, run_plan)
        entrypoint = ["python", "-m", "runtime.ray.job", str(plan_path), run_tag(str(run_dir))]
        if spans_nodes(stage):
            nodes_path = job_file(run_dir, sid, "nodes")
            records.save(nodes_path, MultiNodePlan(
                run=run_plan, nodes=stage.resources.nodes, bundle=cluster.node_bundle(stage), run_tag=run_tag(str(run_dir)),
                cluster_id=sid, ranks_path=str(job_file(run_dir, sid, "ranks")),
                liveness_path=str(job_file(run_dir, sid, "liveness")),
            ))
            entrypoint = ["python", "-m", "runtime.ray.multinode", str(nodes_path)]
        submitted = jobs.submit(
            jc, sid,
            entrypoint=shlex.join(entrypoint),
            runtime_env=self.runtime_env(spec, {**job_env, **{n: os.environ[n] for n in secret_names}}),
            metadata={
                "retool_spec": spec.name, "retool_node": node, "retool_restart_id": ctx.restart_id,
                "retool_total_steps": str(ctx.total_steps), "retool_resume_from": str(ctx.resume_from or ""),
            },
            **entrypoint_resources(stage),
        )
        # Not submitted: a launch racing this one submitted this very attempt first; follow it.
        return self._handle(ctx, paths, sid, reattached=not submitted, resume_from=ctx.resume_from,
                            command=planned[-1].argv if planned else [])

    def _handle(
        self, ctx: StageContext, paths: StagePaths, sid: str, *, reattached: bool, resume_from: int | None,
        command: list[str] | None = None,
    ) -> RunHandle:
        run_dir = Path(paths.stage_dir)
        return RunHandle(
            ref=RayRun(
                submission_id=sid, address=jobs.address_of(ctx.spec), stage_dir=str(run_dir),
                exit_path=str(job_file(run_dir, sid, "exit")), log_path=str(self._log_copy(ctx.stage, ctx.restart_id, sid)),
                metrics_path=str(run_dir / "metrics.jsonl"),
            ),
            stage=ctx.stage, kind=ctx.spec.stages[ctx.stage].kind, restart_id=ctx.restart_id, command=command or [],
            total_steps=ctx.total_steps, resume_from=resume_from, reattached=reattached,
            wandb=self.wandb_run(ctx.spec, ctx.stage, ctx.restart_id),
        )

    def _log_copy(self, stage: str, restart_id: str, sid: str) -> Path:
        """This machine's copy of a job's log (named so runtime.local.finalize finds W&B URLs)."""
        return self.state_dir / "logs" / f"{stage}-{restart_id[:8]}-{sid}.log"

    def _fetch_log(self, jc: Any, sid: str, path: Path) -> None:
        """Append what the job logged since the last fetch to this machine's copy."""
        try:
            data = str(jc.get_job_logs(sid)).encode()
        except (RuntimeError, ConnectionError):
            return
        have = path.stat().st_size if path.exists() else 0
        if len(data) > have:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:
                fh.write(data[have:])

    def poll_stage(self, handle: RunHandle) -> RunStatus:
        ref = ray_ref(handle)
        jc = self._client_at(ref.address)
        job = jobs.job_info(jc, ref.submission_id)
        log_path = self._log_copy(handle.stage, handle.restart_id, ref.submission_id)
        if job is not None:
            self._fetch_log(jc, ref.submission_id, log_path)
        follower = self._followers.get(str(log_path))
        if follower is None:
            follower = self._followers[str(log_path)] = runs.resumed_follower(
                log_path, ref.metrics_path, handle.resume_from
            )
        seen = runs.progress(handle, follower, Path(ref.metrics_path), ref.stage_dir)
        done = procs.read_exit(Path(ref.exit_path))
        if job is None and done is None:
            return RunStatus(
                state="lost", log_tail=procs.tail(log_path, runs.TAIL_LINES), **seen,
                message=f"the Ray cluster no longer knows job {ref.submission_id} (its head restarted?)",
            )
        status = jobs.status_name(job) if job is not None else "SUCCEEDED"
        if status not in jobs.TERMINAL:
            running = runs.running_status(handle, seen, log_path)
            if status == "PENDING":
                return running.model_copy(update={"message": f"Ray job {ref.submission_id} waits for the cluster's resources"})
            assert job is not None
            waits = cluster.pending_placement(ref.address, job.job_id) if job.job_id else None
            notes = [note for note in (waits, self._liveness(ref)) if note]
            return running.model_copy(update={"message": "; ".join([running.message, *notes])}) if notes else running
        if done is None:  # the entrypoint died before writing its exit record (SIGKILL, runtime_env failure)
            assert job is not None
            code = job.driver_exit_code if job.driver_exit_code is not None else -9
            done = ExitRecord(
                returncode=code if code != 0 else 1, cancelled=status == "STOPPED",
                signal="SIGTERM" if status == "STOPPED" else None,
                finished_at=(job.end_time / 1000.0) if job.end_time else time.time(),
            )
            failed = runs.finished_status(handle, done, seen, log_path)
            return failed.model_copy(update={"message": failed.message + (f" ({job.message})" if job.message else "")})
        return runs.finished_status(handle, done, seen, log_path)

    @staticmethod
    def _liveness(ref: RayRun) -> str:
        """`nodes: 0 alive, 1 alive` for a multi-node job (rank 0's record), else ""."""
        path = Path(ref.exit_path.removesuffix(".exit.json") + ".liveness.json")  # beside the exit record
        try:
            seen = records.load(RayLiveness, path)
        except records.RecordError:
            return ""
        if seen is None:
            return ""
        ranks = {r: info.model_dump() for r, info in seen.ranks.items()}
        return liveness_text(ranks, time.time(), updated_at=seen.updated_at)

    def cancel_stage(self, handle: RunHandle) -> None:
        """`ray job stop`: the entrypoint passes SIGTERM to the trainer; checkpoints stay."""
        ref = ray_ref(handle)
        jobs.stop(self._client_at(ref.address), ref.submission_id)
