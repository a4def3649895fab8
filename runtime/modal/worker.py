"""What runs inside Modal's containers: the entry points `runtime.modal.app` registers.

`run_stage` is one attempt of one segment of a training stage:

1. reload every volume (see what other containers committed);
2. find the latest *valid* committed checkpoint of this restart identity (the same rules
   as everywhere: `runtime.checkpoints`) and point verl at it — a preempted container
   restarts with the same input, and a later segment continues where the last one
   stopped, so the rendered `trainer.resume_*` arguments are replaced when a newer valid
   checkpoint exists (and resuming is disabled when only broken ones do);
3. start the sandbox sidecar on localhost and wait for `/v1/ping` (RL with `sidecar`);
4. run the rendered commands, streaming their output to Modal's log and to
   `<checkpoint dir>/_retool/logs/`, committing the volumes every `commit_every_s` and as
   soon as a new checkpoint is complete (Modal keeps only what was committed: a container
   preempted right after a save keeps that save);
5. when the attempt's training time runs out (Modal's 24 h limit is near), stop training,
   commit, spawn the next segment of the same function and return `continued`; when the
   commands finish, commit and return `finished`.

A crash raises, so Modal's retries (the spec's `retries`) restart the attempt, which
resumes from the latest committed checkpoint. Problems no retry can fix (a secret not
attached) are returned as `failed` instead of raised.

Files under `<checkpoint dir>/_retool/` (their models: `runtime.records`): `run.json` (the
call running the stage now), `progress.json` (step, total, active seconds), `result.json`
(final), `attempts.jsonl`, `logs/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from runtime import records
from runtime.metrics import parse_line
from runtime.modal.adapter import ModalAdapter
from runtime.modal.live_logs import LiveLogs
from runtime.modal.models import FinalizePayload, PreparePayload, SidecarSettings, StagePayload
from runtime.modal.layout import RUN_DIR
from runtime.modal.roles import Role, Solo, role_for
from runtime.records import Attempt, StageProgress, StageResult, StageRun
from runtime.verl.common import TRACKER_FILE

from runtime.verl.sft import MERGE_MODULE

if TYPE_CHECKING:
    from runtime.sandbox_process import SandboxProcess

STOP_GRACE_S = 120.0
CLUSTER_STOP_GRACE_S = 20.0  # a rank stopping because its cluster broke: nothing to save
SANDBOX_URL_ENV = "RETOOL_SANDBOX_URL"  # read by runtime/verl/recipe/tool_config.yaml
LOG_TAIL_LINES = 40
# how often the container looks for a newly completed checkpoint to commit at once (a listing
# of the stage's folder; the timed commit every `commit_every_s` goes on besides)
CHECKPOINT_LOOK_S = 5.0


class StageFailed(Exception):
    """A failure no retry can fix: returned to the caller as `failed`, not raised to Modal."""


def _adapter() -> ModalAdapter:
    from runtime.modal.adapter import SdkAdapter

    return SdkAdapter()


# --------------------------------------------------------------------------- entry points


def run_stage(payload: dict[str, Any]) -> dict[str, Any]:
    return ContainerSegment(StagePayload.model_validate(payload), _adapter()).run()


def prepare(payload: dict[str, Any]) -> dict[str, Any]:
    return run_prepare(PreparePayload.model_validate(payload), _adapter())


def finalize(payload: dict[str, Any]) -> dict[str, Any]:
    return run_finalize(FinalizePayload.model_validate(payload), _adapter())


def sandbox_web() -> Any:
    """The service sandbox: retool's sandbox app (sandbox.app) behind the token check."""
    settings = json.loads(os.environ.get("RETOOL_SANDBOX_SETTINGS", "{}"))
    token_var = os.environ.get("RETOOL_SANDBOX_TOKEN_VAR", "")
    token = os.environ.get(token_var, "") if token_var else ""
    if not token:
        raise RuntimeError(f"the sandbox token variable {token_var or '(unset)'} is empty: attach its Modal secret")
    from sandbox.app import create_app
    from sandbox.settings import SandboxSettings

    keys = ("workers", "max_queue", "preload", "memory_limit_mb", "max_output_bytes")
    options = {k: settings[k] for k in keys if settings.get(k) is not None}
    return BearerAuth(create_app(SandboxSettings(**options)), token)


class BearerAuth:
    """ASGI middleware: every path but the health check needs the token, either as
    `Authorization: Bearer <token>` or as a `/t/<token>` path prefix (what the RL container
    puts into RETOOL_SANDBOX_URL, so verl's tool needs no header support)."""

    OPEN_PATHS = ("/v1/ping",)

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        import hmac

        path = str(scope.get("path", ""))
        prefix = f"/t/{self.token}"
        if hmac.compare_digest(path[: len(prefix)], prefix) and path[len(prefix):len(prefix) + 1] in ("", "/"):
            scope = {**scope, "path": path[len(prefix):] or "/", "raw_path": (path[len(prefix):] or "/").encode()}
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.token}".encode()):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"detail": "missing or wrong sandbox token"}'})


# --------------------------------------------------------------------------- checkpoints


def latest_valid_step(checkpoint_dir: Path, world_size: int, restart_id: str) -> tuple[int | None, bool]:
    """(latest valid step, whether any checkpoint directory exists at all), judged by the
    same rules as every backend (`runtime.checkpoints`) over the stage's folder."""
    from runtime.checkpoints import evaluate, latest_valid, scan_local

    found = [c for c in evaluate(scan_local(checkpoint_dir.parent), world_size, restart_id) if c.restart_id == restart_id]
    best = latest_valid(found, restart_id)
    return (best.step if best else None), bool(found)


_RESUME_KEYS = ("trainer.resume_mode", "trainer.resume_from_path")


def training_commands(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stage function runs the training; the merge `render_stage` lists after it runs in
    finalize, on one GPU, on exactly the checkpoint the reconciler validated."""
    return [c for c in commands if MERGE_MODULE not in c.get("argv", [])]


def with_resume(argv: list[str], checkpoint_dir: str, step: int | None, any_checkpoint: bool) -> list[str]:
    """Point a verl trainer command at the latest valid checkpoint (or away from broken ones)."""
    if not any(a.startswith("verl.trainer.") for a in argv):
        return list(argv)
    if step is None and not any_checkpoint:
        return list(argv)
    kept = [a for a in argv if a.lstrip("+~").split("=", 1)[0] not in _RESUME_KEYS]
    if step is None:
        return [*kept, "trainer.resume_mode=disable"]
    return [*kept, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={checkpoint_dir}/global_step_{step}"]


# --------------------------------------------------------------------------- one stage attempt


class ContainerSegment:
    """One segment of a stage inside a Modal container: resume from the latest committed
    checkpoint, run the trainer until it ends or the segment's deadline, commit, hand over."""

    def __init__(self, payload: StagePayload, adapter: ModalAdapter, *, clock: Callable[[], float] = time.time) -> None:
        self.p, self.adapter, self.clock = payload, adapter, clock
        self.started = clock()
        self.dir = Path(payload.checkpoint_dir)
        self.run_dir = self.dir / RUN_DIR
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.step: int | None = None
        self.metrics: dict[str, float] = {}
        self.active_before = 0.0  # container seconds of earlier attempts and segments
        self.role: Role = Solo()
        self._lock = threading.Lock()
        self.logs = LiveLogs(self.run_dir / "logs")  # open logs stay off the volume (see live_logs)
        self._committed_step: int | None = None  # the latest valid checkpoint committed by this attempt
        self._last_commit = time.monotonic()

    @property
    def rank(self) -> int:
        return self.role.rank

    # ----------------------------------------------------------------- driver

    def run(self) -> dict[str, Any]:
        p = self.p
        for name in p.volumes:
            self.adapter.reload_volume(name)
        # one container of a clustered call: its rank picks its role (runtime.modal.roles)
        self.role = role_for(self.adapter.cluster_info, p.nodes, kind=p.kind, run_dir=self.run_dir,
                             join_timeout_s=p.join_timeout_s, sandbox_url_var=SANDBOX_URL_ENV,
                             lost_after_s=p.lost_after_s, live_log=self.logs.live)
        try:
            return self._run()
        finally:
            self.role.close()

    def _run(self) -> dict[str, Any]:
        p, role = self.p, self.role
        self.run_dir.mkdir(parents=True, exist_ok=True)
        duplicate = self._register_launch() if role.leads else None
        if duplicate is not None:
            return duplicate
        plan = role.join()  # rank 0 waits for every rank; others get its plan
        if plan is not None and "ended" in plan:  # rank 0 had nothing to train (already handed over)
            return StageResult(outcome="finished", segment=p.segment, message=f"rank 0: {plan['ended']}").model_dump()
        if plan is not None:  # every rank resumes from the step rank 0 chose
            start_step, any_ckpt = plan.get("start_step"), bool(plan.get("any_ckpt"))
        else:
            start_step, any_ckpt = latest_valid_step(self.dir, p.world_size, p.restart_id)
        handed_over = self._spawned_next() if role.leads else None
        if handed_over is not None:  # this segment already ended and spawned the next one
            role.finish("handed over")
            return StageResult(outcome="continued", step=start_step, segment=p.segment, next_call_id=handed_over,
                               message="already handed over").model_dump()
        self.step = start_step
        self.active_before = self._earlier_active_seconds()
        self._append_attempt()
        try:
            self._check_secrets()
            extra_env = self._sandbox_env()
        except StageFailed as exc:
            role.finish("failed")
            return self._finish_failed(str(exc))
        if p.replace_existing and p.segment == 0 and role.leads and self._move_aside_once():
            start_step, any_ckpt = latest_valid_step(self.dir, p.world_size, p.restart_id)
            self.step = start_step
        sidecar = self._start_sidecar() if p.sidecar is not None else None
        self._committed_step = start_step
        committer = _Periodic(min(p.commit_every_s, CHECKPOINT_LOOK_S), self._commit_when_due)
        committer.start()
        stopped_early = False
        commands = [{**c, "env": {**c.get("env", {}), **extra_env}} for c in training_commands(p.commands)]
        try:
            rl = next(((list(c["argv"]), dict(c["env"])) for c in commands if p.kind == "rl"), None)
            role.start({"start_step": start_step, "any_ckpt": any_ckpt}, rl_command=rl)
            for cmd in commands:
                argv = with_resume(list(cmd["argv"]), p.checkpoint_dir, start_step, any_ckpt)
                argv, env = role.command(argv, dict(cmd["env"]))
                cmd = {**cmd, "env": env}
                status = self._run_command(argv, cmd, role.deadline(self.started + p.train_seconds))
                if status == "deadline":
                    stopped_early = True
                    break
                if status != 0 and role.leader_ended():
                    break  # rank 0 ended its commands: a member's node stops with them
                # else rank 0 was lost (raised below), or this rank's own command failed
                if status == "interrupted":
                    from runtime.cluster.layout import ClusterError

                    raise ClusterError(f"rank {self.rank}: {role.interrupt()}\n" + "\n".join(self.tail))
                if status != 0:
                    self._write_progress()
                    raise RuntimeError(
                        f"{cmd.get('description') or argv[0]} exited with {status}\n" + "\n".join(self.tail)
                    )
        finally:
            committer.stop()
            if sidecar is not None:
                sidecar.stop()
            self._write_progress()
            self._commit_all()
        outcome = role.leader_outcome()  # a member: how rank 0 ended, once its own shards are committed
        if outcome is not None:
            return StageResult(outcome="finished", segment=p.segment, message=f"rank 0: {outcome}").model_dump()
        role.finish("deadline" if stopped_early else "finished")  # rank 0: waits for every rank's commit
        if p.nodes > 1:  # the members' last shards are on the volume, not yet in this container's view
            self._reload_all()
        latest, _ = latest_valid_step(self.dir, p.world_size, p.restart_id)
        self.step = latest if latest is not None else self.step
        if stopped_early:
            return self._hand_over(start_step, latest)
        result = StageResult(
            outcome="finished", step=latest, segment=p.segment, active_s=self.active_seconds(), message="commands finished",
        )
        records.save(self.run_dir / "result.json", result.model_copy(update={"finished_at": self.clock()}))
        self._commit_all()
        return result.model_dump()

    def _hand_over(self, start_step: int | None, latest: int | None) -> dict[str, Any]:
        p = self.p
        if latest is None or (start_step is not None and latest <= start_step):
            raise RuntimeError(
                f"segment {p.segment} ran {p.train_seconds / 3600:.1f} h without saving a new valid checkpoint; "
                "lower save_freq so each segment saves at least once"
            )
        nxt = p.model_copy(update={"segment": p.segment + 1})
        call_id = self.adapter.spawn(p.app_name, p.function, nxt.model_dump(mode="json"), env=p.environment)
        records.save(self.run_dir / "run.json", self._next_run(call_id))
        self._commit_all()
        return StageResult(
            outcome="continued", step=latest, segment=p.segment, next_call_id=call_id, active_s=self.active_seconds(),
            message=f"segment {p.segment} stopped at step {latest}; segment {p.segment + 1} continues",
        ).model_dump()

    def _next_run(self, call_id: str) -> StageRun:
        """run.json once this segment handed over to `call_id`: the same record the CLI writes
        at launch, so the chain's head and the launch's identity carry over."""
        p, me = self.p, self.adapter.current_call_id()
        before = self._read_run()
        head = None
        if before is not None:
            head = before.head_call_id or (before.call_id if before.segment == 0 else None)
        return StageRun(
            call_id=call_id, segment=p.segment + 1, app_name=p.app_name, function=p.function,
            launched_at=self.clock(), head_call_id=head or (me if p.segment == 0 else None),
            launch_id=p.launch.launch_id if p.launch else (before.launch_id if before else None),
            previous_call_id=me,
        )

    def _read_run(self) -> StageRun | None:
        try:
            return records.load(StageRun, self.run_dir / "run.json")
        except records.RecordError as exc:  # a retry could not fix it: say so, then go on without it
            print(f"[retool] {exc.summary}: {exc.detail}", flush=True)
            return None

    def _register_launch(self) -> dict[str, Any] | None:
        """Register this call under its stage identity (runtime.modal.launches), so a launch
        whose spawn answer was lost is found; a duplicate of a run that is still going stops
        here, before training."""
        launch = self.p.launch
        if launch is None:
            return None
        from runtime.modal import launches

        me = self.adapter.current_call_id() or ""
        try:
            current = launches.lookup(self.adapter, launch.registry, launch.key, env=self.p.environment)
            if current is not None and current.launch_id != launch.launch_id and current.call_id != me:
                try:
                    other_running = self.adapter.poll(current.call_id).state == "running"
                except Exception:  # noqa: BLE001 - an unknown or unreachable call is not running here
                    other_running = False
                if other_running:
                    return StageResult(
                        outcome="failed", segment=self.p.segment,
                        message=f"another run of this stage is running (call {current.call_id}, launch "
                                f"{current.launch_id}); this duplicate stopped without training",
                    ).model_dump()
            launches.register(self.adapter, launch, me, self.p.segment, self.clock(), env=self.p.environment)
        except Exception as exc:  # noqa: BLE001 - the run.json chain still finds this call
            print(f"[retool] could not register launch {launch.launch_id}: {exc}", flush=True)
        return None

    def _spawned_next(self) -> str | None:
        """The next segment's call, if an earlier attempt of this segment already spawned it
        (and then died before returning): a segment is never trained or spawned twice."""
        run = self._read_run()
        return run.call_id if run is not None and run.segment == self.p.segment + 1 else None

    def _finish_failed(self, message: str) -> dict[str, Any]:
        result = StageResult(
            outcome="failed", step=self.step, segment=self.p.segment, active_s=self.active_seconds(), message=message,
        )
        if not self.role.leads:  # only rank 0 writes the run's files (one writer per file on a volume)
            return result.model_dump()
        records.save(self.run_dir / "result.json", result.model_copy(update={"finished_at": self.clock()}))
        self._commit_all()
        return result.model_dump()

    # ----------------------------------------------------------------- pieces

    def _check_secrets(self) -> None:
        missing = sorted({n for c in self.p.commands for n in c.get("secret_env", []) if not os.environ.get(n)})
        if missing:
            raise StageFailed(
                f"secret variables not set in the container: {', '.join(missing)}; "
                "create the Modal secrets named in the spec (`modal secret create NAME VAR=...`)"
            )

    def _sandbox_env(self) -> dict[str, str]:
        """A service sandbox is reached as `<url>/t/<token>`; the token comes from the
        container's secret only, here, never from the payload."""
        var = self.p.sandbox_token_var
        if not var:
            return {}
        token = os.environ.get(var, "")
        if not token:
            raise StageFailed(f"the sandbox token variable {var} is not set: attach the sandbox's Modal secret")
        out: dict[str, str] = {}
        for cmd in self.p.commands:
            url = cmd.get("env", {}).get(SANDBOX_URL_ENV)
            if url:
                base = url.rstrip("/").removesuffix("/run_code")
                out[SANDBOX_URL_ENV] = f"{base}/t/{token}"
        return out

    def _move_aside_once(self) -> bool:
        """A forced rerun from scratch: move this identity's earlier checkpoints to
        `<stage>/.replaced/` (once per launch; a retried attempt keeps its own progress)."""
        head = self.adapter.current_call_id() or "unknown"
        done = self.run_dir / f"replaced-for-{head}"
        if done.exists():
            return False
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.dir.parent / ".replaced" / f"{self.dir.name}-{stamp}"
        moved = [p for p in self.dir.iterdir() if p.name.startswith("global_step_") or p.name == TRACKER_FILE]
        if moved:
            dest.mkdir(parents=True, exist_ok=True)
            for path in moved:
                os.replace(path, dest / path.name)
        done.write_text(stamp, encoding="utf-8")
        self._commit_all()
        return True

    def _start_sidecar(self) -> Any:
        settings = self.p.sidecar
        assert settings is not None
        # every node runs its own sidecar (nodes sharing a host: their own port)
        settings = settings.model_copy(update={"port": settings.port + self.role.port_offset})
        name = f"sandbox-{self.p.segment}{self.role.name_suffix}"
        return start_sidecar(settings, self.logs.live(f"{name}.log"))

    def _run_command(self, argv: list[str], cmd: dict[str, Any], deadline: float) -> int | str:
        env = {**os.environ, **cmd.get("env", {})}
        log_path = self.logs.live(f"segment-{self.p.segment}-rank-{self.rank}.log")
        line = f"[retool] $ {' '.join(argv)}"
        print(line, flush=True)
        with log_path.open("a", encoding="utf-8") as log:
            log.write(line + "\n")
            proc = subprocess.Popen(
                argv, cwd=cmd.get("cwd") or None, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, bufsize=1, start_new_session=True,
            )
            reader = threading.Thread(target=self._pump, args=(proc, log), daemon=True)
            reader.start()
            while proc.poll() is None:
                if self.clock() >= deadline:
                    stop_process_group(proc)
                    reader.join(10)
                    return "deadline"
                if self.role.interrupt():  # a lost rank, or rank 0 ended
                    stop_process_group(proc, CLUSTER_STOP_GRACE_S)
                    reader.join(10)
                    return "interrupted"
                time.sleep(1.0)
            reader.join(10)
            return proc.returncode

    def _pump(self, proc: subprocess.Popen[str], log: Any) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
            with self._lock:
                self.tail.append(line.rstrip("\n"))
                for part in line.split("\r"):  # tqdm glues its bar to the step line
                    record = parse_line(part) if "step:" in part else None
                    if record is not None:
                        self.step = max(self.step or 0, record.step)
                        self.metrics.update(record.values)

    def _reload_all(self) -> None:
        """See what the other ranks committed. A container sees another's writes only after
        their commit and its own reload; judging without it would miss the members' shards of
        the last save (and hand over without a new checkpoint, or report an older step)."""
        for name in self.p.volumes:
            try:
                self.adapter.reload_volume(name)
            except Exception as exc:
                raise RuntimeError(
                    f"rank 0 could not reload volume {name} to judge the last checkpoint with every rank's "
                    f"shards ({exc}); the whole cluster restarts from the latest valid checkpoint"
                ) from exc

    def _commit_when_due(self) -> None:
        """Commit every `commit_every_s`, and as soon as rank 0 sees a new valid checkpoint
        (the save's completion marker is written last): on Modal an uncommitted save is lost
        with its container, and a stage saving every few minutes would otherwise lose up to
        `commit_every_s` of them to a preemption."""
        due = time.monotonic() - self._last_commit >= self.p.commit_every_s
        if not due and self.role.leads:
            latest, _ = latest_valid_step(self.dir, self.p.world_size, self.p.restart_id)
            due = latest is not None and latest != self._committed_step
            if due:
                self._committed_step = latest
        if due:
            self._commit_all()

    def _commit_all(self) -> None:
        self._last_commit = time.monotonic()
        self._write_progress()
        self.logs.sync()
        for name in self.p.volumes:
            try:
                self.adapter.commit_volume(name)
            except Exception as exc:  # noqa: BLE001 - a failed periodic commit is retried next period
                print(f"[retool] commit of volume {name} failed: {exc}", flush=True)

    def active_seconds(self) -> float:
        return self.active_before + max(0.0, self.clock() - self.started)

    def _earlier_active_seconds(self) -> float:
        """What earlier attempts ran, from the progress they last committed (a preempted
        attempt loses at most one commit period of accounting)."""
        try:
            old = records.load(StageProgress, self.run_dir / "progress.json")
        except records.RecordError as exc:
            print(f"[retool] {exc.summary}: {exc.detail}", flush=True)
            return 0.0
        if old is None:
            return 0.0
        if old.updated_at is None or old.attempt_started_at is None:
            return old.active_before
        return old.active_before + max(0.0, old.updated_at - old.attempt_started_at)

    def _write_progress(self) -> None:
        if not self.role.leads:
            return
        ranks = self.role.liveness()  # per-rank liveness, as rank 0 sees it
        with self._lock:
            progress = StageProgress(
                step=self.step, total=self.p.total_steps, segment=self.p.segment,
                attempt_started_at=self.started, updated_at=self.clock(),
                active_before=self.active_before, active_s=self.active_seconds(),
                metrics=dict(self.metrics), log_tail=list(self.tail)[-20:], ranks=ranks,
            )
        records.save(self.run_dir / "progress.json", progress)

    def _append_attempt(self) -> None:
        if not self.role.leads:
            return
        attempt = Attempt(segment=self.p.segment, started_at=self.started, call_id=self.adapter.current_call_id())
        records.append_line(self.run_dir / "attempts.jsonl", attempt)


def stop_process_group(proc: subprocess.Popen[str], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the whole group, then SIGKILL what is left after the grace period."""
    from runtime.processes import terminate_run

    terminate_run(proc.pid, grace_s=grace_s)
    proc.poll()  # the leader was reaped by terminate_run


class _Periodic:
    def __init__(self, every_s: float, fn: Callable[[], None]) -> None:
        self.every_s, self.fn = every_s, fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.fn()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------- sandbox sidecar


class Sidecar:
    def __init__(self, proc: SandboxProcess) -> None:
        self.proc = proc

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the sandbox's process group (it leads one), SIGKILL after the grace period."""
        self.proc.stop(grace_s)


def start_sidecar(settings: SidecarSettings, log_path: Path, *, ready_timeout_s: float = 180.0) -> Sidecar:
    """Start the sandbox on localhost and wait until it answers `/v1/ping`."""
    from runtime.sandbox_process import start_detached

    # start_detached waits for `/v1/ping` itself, and stops the server (with its log's tail in
    # the error) if it exits or stays silent past the deadline.
    proc = start_detached(
        "127.0.0.1", settings.port, log_path, workers=settings.workers, memory_limit_mb=settings.memory_limit_mb,
        max_output_bytes=settings.max_output_bytes, max_queue=settings.max_queue, preload=list(settings.preload),
        ready_timeout_s=ready_timeout_s,
    )
    print(f"[retool] sandbox sidecar ready on port {settings.port}", flush=True)
    return Sidecar(proc)


# --------------------------------------------------------------------------- data, models, finalize


def run_prepare(p: PreparePayload, adapter: ModalAdapter) -> dict[str, Any]:
    """Materialise one dataset or model into its volume (the cloud side has internet)."""
    adapter.reload_volume(p.volume)
    out_dir = Path(p.out_dir)
    out: BaseModel  # the dataset's or the model's outputs
    if p.kind == "dataset":
        from reconciler.spec import Dataset
        from runtime.data import prepare as prepare_dataset

        dataset = Dataset.model_validate(p.config)
        if dataset.source.startswith("builtin:"):
            from runtime.sandbox_process import ephemeral_sandbox

            with ephemeral_sandbox() as url:
                out = prepare_dataset(p.name, dataset, out_dir, Path(p.spec_dir), sandbox_url=url)
        else:
            out = prepare_dataset(p.name, dataset, out_dir, Path(p.spec_dir))
    else:
        from reconciler.spec import Model
        from runtime.models import prepare as prepare_model

        out = prepare_model(p.name, Model.model_validate(p.config), out_dir, Path(p.spec_dir))
    adapter.commit_volume(p.volume)
    return out.model_dump(mode="json")


def run_finalize(p: FinalizePayload, adapter: ModalAdapter) -> dict[str, Any]:
    """Merge the final checkpoint into a Hugging Face directory; run the tool-call check."""
    adapter.reload_volume(p.volume)
    for cmd in p.commands:
        env = {**os.environ, **cmd.get("env", {})}
        print(f"[retool] $ {' '.join(cmd['argv'])}", flush=True)
        done = subprocess.run(cmd["argv"], env=env, cwd=cmd.get("cwd") or None, capture_output=True, text=True)
        sys.stdout.write(done.stdout[-20000:])
        if done.returncode != 0:
            raise RuntimeError(f"{cmd.get('description') or cmd['argv'][0]} exited with {done.returncode}\n{done.stderr[-4000:]}")
    outputs: dict[str, Any] = {"model_path": p.merged_dir, "final_step": p.step, "checkpoint": p.checkpoint_path}
    if p.tool_call_check is not None:
        from runtime.toolcheck import measure

        check = measure(Path(p.merged_dir), int(p.tool_call_check["prompts"]), p.tool_call_check.get("problems", "mixed"))
        outputs["tool_call_rate"] = check.rate
        outputs["tool_call_prompts"] = check.n
    adapter.commit_volume(p.volume)
    return outputs
