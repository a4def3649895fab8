"""The Modal backend: `reconciler.backend.Runtime` on Modal's cloud, through `ModalAdapter`.

Layout on Modal (names from `runtime.modal.layout`; run files are `runtime.records` models):

    app          retool-<spec name> (spec.modal.app_name), deployed; functions stage-<name>,
                 prepare, finalize, sandbox (service placement only)
    volumes      <spec name>-<volume key>, mounted at the spec's `mount`
    dataset      <mount>/datasets/<name>/{train.parquet, meta.json}  (+ datasets/.<name>.prepared.json)
    model        <mount>/models/<name>/                              (+ models/.<name>.prepared.json)
    uploads      <mount>/_uploads/<dataset|model>/<name>/             (`path:` sources, copied from here)
    stage run    <mount>/<stage>/<restart_id[:16]>/  retool.json, global_step_N/, tracker,
                 merged/ + merged.json (finalize), _retool/{run.json, progress.json, result.json, logs/}

Runs: `launch_stage` deploys the app when its definition changed, writes the restart
marker, spawns `stage-<name>` with exactly `render_stage`'s commands and records the
FunctionCall id in the RunHandle (and in `_retool/run.json`). `poll_stage` asks the call
(`get(timeout=0)`) and follows the chain of segments each container spawns when its 24 h
attempt ends; a call whose result expired is judged from `_retool/` on the volume. A run
that cannot be reached raises `ModalUnreachable` (transient): the engine keeps it as
running and never relaunches it. Credentials are checked first, locally, in `preflight`.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from reconciler.errors import TerminalError
from reconciler.spec import Dataset, Image, Model, Sandbox, Spec, Volume
from reconciler.state.base import ModalRun, RunHandle, StateStore
from runtime import checkpoints as ckpts
from runtime import records
from runtime.records import MergeStamp, PreparedStamp, Record, StageProgress, StageResult, StageRun, LaunchIntent
from reconciler.backend import (
    Checkpoint,
    ChecksReadiness,
    ChecksSpec,
    OpensSharedState,
    DoctorCheck,
    Outcome,
    RenderedCommand,
    RunStatus,
    StageContext,
)
from reconciler.spec import ToolCallCheck
from reconciler.backend import Change
from runtime import tracking
from reconciler.steps import segments_for
from runtime.modal import launches, layout
from runtime.modal.adapter import (
    LOGIN_HINT, CallNotFound, CallOutcome, ModalAdapter, ModalUnreachable, UploadProgress,
)
from runtime.modal.images import base_facts, parse_requirement
from runtime.cluster.liveness import alive_count, liveness_text
from runtime.modal.models import AppDefinition, FinalizePayload, LaunchKey, PreparePayload, SidecarSettings, StagePayload
from runtime.modal.layout import (
    CONTAINER_SOURCE_ROOT,
    FINALIZE_FUNCTION,
    PREPARE_FUNCTION,
    RUN_DIR,
    SANDBOX_FUNCTION,
    app_name,
    dataset_dir,
    modal_volume_name,
    model_dir,
    mount,
    stage_function_name,
)
from runtime.modal.app import (
    MAX_TIMEOUT_HOURS,
    SEGMENT_MARGIN_S,
    build_app_definition,
    modal_problems,
    modal_warnings,
    sandbox_token_env,
)
from runtime.stage_kind import Machine, MergeResult, ToolCallMeasure
from runtime.stage_kinds import kind_of
from runtime.verl.common import StagePaths, with_planned_inputs
from runtime.verl.sft import MERGE_MODULE
from runtime.stamps import restart_config, short_hash

CLUSTER_GPUS_PER_NODE = 8  # a clustered container takes its whole host (8 GPUs on Modal's H100/A100/B200 hosts)
CHAIN_LIMIT = 1000  # segments followed per poll (a 24 h segment each: years)
WAIT_SLICE_S = 30.0
R = TypeVar("R", bound=Record)


class ModalRuntime(ChecksSpec, ChecksReadiness, OpensSharedState):
    """`reconciler.backend.Runtime` on Modal."""

    name = "modal"

    def __init__(
        self, state_dir: str, adapter: ModalAdapter | None = None, *, clock: Callable[[], float] = time.time,
        ping: Callable[[str], bool] | None = None,
    ) -> None:
        if adapter is None:
            from runtime.modal.adapter import SdkAdapter

            adapter = SdkAdapter()
        self.state_dir, self.adapter, self.clock = state_dir, adapter, clock
        self.ping = ping or _http_ping
        self._deployed: str | None = None  # digest of the definition this process deployed
        self._rates: dict[str, float] | None = None

    # ------------------------------------------------------------------ layout

    def paths(self, spec: Spec, stage: str, restart_id: str) -> StagePaths:
        run_dir = layout.stage_run_dir(spec, stage, restart_id)
        return StagePaths(stage_dir=run_dir, ckpt_dir=run_dir, merged_dir=f"{run_dir}/merged")

    @staticmethod
    def _rel(stage: str, restart_id: str, *parts: str) -> str:
        return layout.run_path(stage, restart_id, *parts)

    def _stage_volume(self, spec: Spec, stage: str) -> str:
        return modal_volume_name(spec, spec.stages[stage].volume)

    # ------------------------------------------------------------------ checks

    def preflight(self, spec: Spec) -> list[str]:
        """Fast: credentials are looked at locally first (no network); only with a token
        is one round trip made, under a short deadline."""
        problems = modal_problems(spec, _package_root())
        problem = self.adapter.credentials_problem()
        if problem:
            return [*problems, f"{problem}: {LOGIN_HINT}"]
        try:
            self.adapter.check_connection(4.0)
        except (TerminalError, ModalUnreachable) as exc:
            problems.append(exc.summary + (f" ({exc.hint})" if exc.hint else ""))
        return problems

    def spec_problems(self, spec: Spec) -> list[str]:
        """What Modal would refuse at deploy, found offline (`retool validate` fails on them)."""
        return modal_problems(spec, _package_root())

    def spec_warnings(self, spec: Spec) -> list[str]:
        """What may fail or drift later (validate and plan print them; nothing is blocked)."""
        return modal_warnings(spec)

    def doctor_checks(
        self, spec: Spec, open_store: Callable[[], StateStore], *, build_image: bool = True
    ) -> list[DoctorCheck]:
        """`retool doctor`: rows of runtime.modal.doctor.Check (token, secrets, GPUs, image, volumes, state)."""
        from runtime.modal.doctor import modal_checks

        return modal_checks(spec, self.adapter, open_store, repo_root=_package_root(), build_image=build_image,
                            store_on_modal=spec.state.store == "modal")

    def shared_store(self, spec: Spec) -> StateStore | None:
        """A `state: {store: modal}` store, through this backend's adapter (doctor's rows)."""
        if spec.state.store != "modal":
            return None
        from reconciler.state.modal_store import ModalStore

        return ModalStore.from_spec(spec, adapter=self.adapter)

    def blocked_reason(self, spec: Spec, address: str) -> str | None:
        kind, _, name = address.partition(".")
        if kind == "image":
            missing = [p for p in modal_problems(spec, _package_root()) if p.startswith("image.")]
            return "; ".join(missing) or None
        if kind == "sandbox":
            bad = [p for p in modal_problems(spec, _package_root()) if p.startswith("sandbox.")]
            return "; ".join(bad) or None
        if kind != "stage" or name not in spec.stages:
            return None
        stage = spec.stages[name]
        bad = [p for p in modal_problems(spec, _package_root()) if p.startswith(f"stages.{name}.")]
        if stage.resources.nodes > 1 and stage.resources.gpus_per_node < CLUSTER_GPUS_PER_NODE:
            # modal.clustered: every container requests all GPUs of its host
            bad.append(f"a {stage.resources.nodes}-node stage runs as a Modal cluster whose containers take every "
                       f"GPU of their host: set resources.gpus_per_node: {CLUSTER_GPUS_PER_NODE}")
        blocker = kind_of(stage).blocker(stage, self._machine(spec, name))
        if blocker:
            bad.append(blocker)
        return "; ".join(bad) or None

    # ------------------------------------------------------------------ volumes and image

    def ensure_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome:
        vname = modal_volume_name(spec, name)
        created = self.adapter.create_volume(vname, env=spec.modal.environment)
        outputs = {"name": vname, "mount": volume.mount}
        return Outcome(change="created" if created else "unchanged", outputs=outputs,
                       message=f"Modal volume {vname}" + (" created" if created else ""))

    def delete_volume(self, name: str, volume: Volume, spec: Spec) -> Outcome:
        vname = modal_volume_name(spec, name)
        existed = self.adapter.delete_volume(vname, env=spec.modal.environment)
        return Outcome(change="updated" if existed else "unchanged",
                       message=f"deleted Modal volume {vname}" if existed else f"{vname} does not exist")

    def definition(self, spec: Spec) -> AppDefinition:
        return build_app_definition(spec)

    def _ensure_deployed(self, spec: Spec) -> tuple[AppDefinition, bool]:
        definition = self.definition(spec)
        digest = definition.digest()
        if self._deployed == digest:
            return definition, False
        self.adapter.deploy(definition)
        self._deployed = digest
        return definition, True

    def build_image(self, image: Image, spec: Spec) -> Outcome:
        """Builds the image by deploying the app (Modal builds images at deploy, cached by recipe)."""
        definition, _ = self._ensure_deployed(spec)
        image_digest = short_hash([s.model_dump(mode="json") for s in definition.image])
        return Outcome(
            change="created", outputs={"app_name": definition.app_name, "image_digest": image_digest,
                                       "app_digest": definition.digest()},
            message=f"deployed app {definition.app_name} ({len(definition.functions)} functions)",
        )

    # ------------------------------------------------------------------ data and models

    def prepare_dataset(self, name: str, dataset: Dataset, spec: Spec, spec_dir: str) -> Outcome:
        return self._prepare("dataset", name, dataset, dataset.volume, spec, spec_dir)

    def prepare_model(self, name: str, model: Model, spec: Spec, spec_dir: str) -> Outcome:
        return self._prepare("model", name, model, model.volume, spec, spec_dir)

    def _prepare(self, kind: Literal["dataset", "model"], name: str, item: Dataset | Model, volume_key: str, spec: Spec, spec_dir: str) -> Outcome:
        env = spec.modal.environment
        vol = modal_volume_name(spec, volume_key)
        folder = "datasets" if kind == "dataset" else "models"
        stamp_path = f"{folder}/.{name}.prepared.json"
        local = _local_source(item.source, spec_dir)
        config = {"config": restart_config(item), "source": _stat(local) if local else None}
        stamp = self._read_record(PreparedStamp, vol, stamp_path, env)
        if stamp is not None and stamp.config == short_hash(config) and stamp.outputs:
            return Outcome(change="unchanged", outputs=dict(stamp.outputs), message="already on the volume")
        root = mount(spec, volume_key)
        payload_config = item.model_dump(mode="json")
        staged_dir = f"{root}/_uploads/{kind}/{name}"
        if local is not None:  # the container cannot see this machine: upload the source first
            staged_dir = f"{root}/{self._upload_source(vol, f'_uploads/{kind}/{name}', local, env)}"
            payload_config["source"] = f"path:{local.name}"
        self._ensure_deployed(spec)
        payload = PreparePayload(
            kind=kind, name=name, config=payload_config, spec_dir=staged_dir,
            out_dir=f"{root}/{folder}/{name}", volume=vol,
        )
        call_id = self.adapter.spawn(app_name(spec), PREPARE_FUNCTION, payload.model_dump(mode="json"), env=env)
        outputs = self._wait_result(call_id, f"prepare {kind}.{name}", 4 * 3600)
        self.adapter.put_files(vol, {stamp_path: records.dumps(PreparedStamp(config=short_hash(config), outputs=outputs))},
                               env=env)
        rows = f"{outputs.get('rows')} rows" if "rows" in outputs else ""
        return Outcome(change="updated" if stamp is not None else "created", outputs=outputs, message=rows)

    def _upload_source(self, vol: str, uploads: str, local: Path, env: str | None) -> str:
        """Upload a `path:` source into a folder named by its content (names, sizes, mtimes) and
        return that folder. A completion marker written after the last file is what makes it
        usable: an interrupted upload is never read, and the next apply uploads again (an
        upload that completed is reused: a crash after it costs no second multi-GB transfer)."""
        digest = short_hash(_stat(local))
        folder, marker = f"{uploads}/{digest}", f"{uploads}/{digest}.complete"
        if self._read_text(vol, marker, env) is None:
            target = folder if local.is_file() else f"{folder}/{local.name}"
            self.adapter.upload_data(vol, target, local, env=env, progress=_upload_reporter(f"{vol}:{folder}"))
            self.adapter.put_files(vol, {marker: json.dumps(_stat(local)).encode()}, env=env)
        for entry in self.adapter.listdir(vol, uploads, env=env):  # earlier sources and interrupted uploads
            if entry.path.rstrip("/").rsplit("/", 1)[-1] not in (digest, f"{digest}.complete"):
                self.adapter.remove(vol, entry.path, recursive=True, env=env)
        return folder

    def _wait_result(self, call_id: str, what: str, timeout_s: float) -> dict[str, Any]:
        deadline = self.clock() + timeout_s
        while True:
            outcome = self.adapter.wait(call_id, WAIT_SLICE_S)
            if outcome.state == "succeeded":
                return dict(outcome.result or {})
            if outcome.state != "running":
                raise TerminalError(f"{what} failed on Modal ({outcome.state})", outcome.error[-3000:],
                                    f"see the call's logs: modal app logs, call {call_id}")
            if self.clock() > deadline:
                raise TerminalError(f"{what} did not finish within {timeout_s / 3600:g} h", f"call {call_id}")

    # ------------------------------------------------------------------ sandbox

    def ensure_sandbox(self, sandbox: Sandbox, spec: Spec) -> Outcome:
        if sandbox.placement == "sidecar":
            url = f"http://127.0.0.1:{sandbox.port or SidecarSettings().port}"
            return Outcome(change="created", outputs={"placement": "sidecar", "url": url},
                           message="a sidecar: each RL container starts it on localhost and waits for /v1/ping")
        _, deployed = self._ensure_deployed(spec)
        url = self.adapter.web_url(app_name(spec), SANDBOX_FUNCTION, env=spec.modal.environment)
        if not self.ping(url):
            raise ModalUnreachable(f"the sandbox at {url} does not answer /v1/ping", hint="retry; the endpoint may be starting")
        return Outcome(change="updated" if deployed else "unchanged",
                       outputs={"placement": "service", "url": url, "app_name": app_name(spec)},
                       message=f"sandbox service at {url} (bearer token from its secret)")

    # ------------------------------------------------------------------ stages: commands

    def render_stage(self, ctx: StageContext) -> list[RenderedCommand]:
        """Training command(s), then the merge `finalize_stage` runs on one GPU afterwards.
        The stage function receives exactly this list (and skips the merge)."""
        spec = ctx.spec
        ctx = with_planned_inputs(
            ctx, dataset_dir=lambda n: dataset_dir(spec, n), model_dir=lambda n: model_dir(spec, n),
            stage_root=lambda n: f"{mount(spec, spec.stages[n].volume)}/{n}",
        )
        kind = kind_of(spec.stages[ctx.stage])
        paths = self.paths(ctx.spec, ctx.stage, ctx.restart_id)
        sandbox = self._sandbox_url(ctx) if kind.uses_sandbox else None
        return [in_container(c) for c in kind.render(ctx, paths, self._machine(spec, ctx.stage), sandbox)]

    def _machine(self, spec: Spec, stage: str) -> Machine:
        """A container of the stage's function. Its image is built with the engines the spec
        names (runtime.modal.images), so every module counts as there: `auto` is vLLM."""
        gpus = spec.stages[stage].resources.gpus_per_node
        return Machine(device="cuda" if gpus else "cpu", gpus=gpus, attn_implementation=attention(spec.image),
                       has_module=lambda _: True)

    def _sandbox_url(self, ctx: StageContext) -> str:
        sb = ctx.spec.sandbox
        if sb is None:
            raise TerminalError(f"stage.{ctx.stage} calls the code sandbox but the spec declares no `sandbox`")
        if sb.placement == "sidecar":
            return f"http://127.0.0.1:{sb.port or SidecarSettings().port}"
        url = (ctx.inputs.get("sandbox") or {}).get("url")
        if not url:
            raise TerminalError("the sandbox service has no recorded URL", hint="apply the `sandbox` node first")
        return str(url)

    # ------------------------------------------------------------------ stages: runs

    def launch_stage(self, ctx: StageContext) -> RunHandle:
        """Idempotent per stage identity (runtime.modal.launches): re-attaches to a running
        call of this identity, refuses while an earlier launch whose answer was lost may still
        be queued, and records the launch's intent before spawning."""
        spec, stage = ctx.spec, ctx.spec.stages[ctx.stage]
        kind = kind_of(stage)
        env, vol = spec.modal.environment, self._stage_volume(spec, ctx.stage)
        commands = self.render_stage(ctx)
        existing = self._running_call(spec, ctx.stage, ctx.restart_id)
        if existing is not None:  # launched before, but the handle never reached the state
            return existing
        definition, _ = self._ensure_deployed(spec)
        usd = self.gpu_hour_usd(spec, stage.resources.gpu)  # before spawning: nothing may fail after it
        launch = LaunchKey(registry=layout.registry_name(definition.app_name), launch_id=uuid.uuid4().hex[:16],
                           key=layout.stage_key(definition.app_name, ctx.stage, ctx.restart_id))
        res = stage.resources
        replace = ctx.resume_from is None and any(
            c.restart_id == ctx.restart_id for c in self.discover_checkpoints(spec, ctx.stage, ctx.restart_id)
        )
        hours = (ctx.total_steps or 0) * (stage.seconds_per_step or 0) / 3600
        sb = spec.sandbox
        payload = StagePayload(
            app_name=definition.app_name, function=stage_function_name(ctx.stage), environment=env,
            stage=ctx.stage, kind=stage.kind, restart_id=ctx.restart_id,
            segments_planned=max(1, segments_for(hours, min(res.timeout_hours, MAX_TIMEOUT_HOURS))),
            total_steps=ctx.total_steps, resume_from=ctx.resume_from, world_size=res.world_size, nodes=res.nodes,
            commands=[c.model_dump(mode="json") for c in commands],
            checkpoint_dir=self.paths(spec, ctx.stage, ctx.restart_id).ckpt_dir, checkpoint_volume=vol,
            volumes={modal_volume_name(spec, k): v.mount for k, v in sorted(spec.volumes.items())},
            sidecar=_sidecar(sb) if kind.uses_sandbox and sb is not None and sb.placement == "sidecar" else None,
            sandbox_token_var=sandbox_token_env(spec) if kind.uses_sandbox else None,
            replace_existing=replace,
            train_seconds=max(60.0, definition.function(stage_function_name(ctx.stage)).timeout_s - SEGMENT_MARGIN_S),
            launch=launch,
        )
        sandbox = self._sandbox_url(ctx) if kind.uses_sandbox else None
        inputs = kind.run_inputs(ctx, self.paths(spec, ctx.stage, ctx.restart_id), self._machine(spec, ctx.stage), sandbox)
        files = {self._rel(ctx.stage, ctx.restart_id, name): text.encode() for name, text in inputs.items()}
        if ctx.resume_from is None:  # from scratch: an earlier run's progress goes to .replaced/, never reused
            files.update(self._set_aside(kind.resumable_files, ctx.stage, ctx.restart_id, vol, env, self.clock()))
        if files:
            self.adapter.put_files(vol, files, env=env)
        marker = ckpts.marker_content(ctx.restart_id, ctx.stage, res.world_size)
        started = self.clock()
        intent = LaunchIntent(launch_id=launch.launch_id, function=payload.function, at=started)
        self.adapter.put_files(vol, {
            self._rel(ctx.stage, ctx.restart_id, ckpts.MARKER_FILE): marker.encode(),
            self._rel(ctx.stage, ctx.restart_id, RUN_DIR, layout.LAUNCH_FILE): records.dumps(intent),
        }, env=env)
        try:
            call_id = self.adapter.spawn(definition.app_name, payload.function, payload.model_dump(mode="json"), env=env)
        except ModalUnreachable as exc:
            raise ModalUnreachable(
                f"stage.{ctx.stage}: no answer to its launch; the run may have started", exc.summary,
                "run `retool apply` again: it finds the run by its launch key and re-attaches (it never starts a "
                "second run of the same stage)",
            ) from exc
        handle = self._handle(spec, ctx.stage, ctx.restart_id, call_id, definition.app_name, started, ctx.total_steps,
                              commands[0].argv, usd=usd)
        try:  # best effort: the container registers itself at start too, and run.json says the same
            launches.register(self.adapter, launch, call_id, 0, started, env=env)
        except (ModalUnreachable, TerminalError):
            pass
        run = StageRun(call_id=call_id, segment=0, app_name=definition.app_name, function=payload.function,
                       launched_at=started, head_call_id=call_id, launch_id=launch.launch_id)
        self.adapter.put_files(vol, {self._rel(ctx.stage, ctx.restart_id, RUN_DIR, "run.json"): records.dumps(run)},
                               env=env)
        return handle

    def _handle(self, spec: Spec, stage: str, restart_id: str, call_id: str, app: str, started: float,
                total: int | None, argv: list[str], *, segment: int = 0, usd: float | None = None,
                reattached: bool = False) -> RunHandle:
        definition = spec.stages[stage]
        res = definition.resources
        return RunHandle(
            ref=ModalRun(
                call_id=call_id, app_name=app, segment=segment, volume=self._stage_volume(spec, stage),
                run_dir=self._rel(stage, restart_id, RUN_DIR), environment=spec.modal.environment,
                gpus=res.gpus_per_node * res.nodes, gpu=res.gpu or "",  # "": a CPU container
                usd_per_gpu_hour=usd if usd is not None else self.gpu_hour_usd(spec, res.gpu),
            ),
            stage=stage, kind=definition.kind, restart_id=restart_id, started_at=started, command=list(argv),
            total_steps=total, reattached=reattached,
            # The key reaches the container only through the stage's secrets (else offline, on the volume).
            wandb=tracking.observed_on_volume(
                tracking.wandb_run(spec, stage, restart_id, key_available=tracking.key_declared(spec, stage)),
                self._stage_volume(spec, stage), self._rel(stage, restart_id), spec.modal.environment,
            ),
        )

    def _running_call(self, spec: Spec, stage: str, restart_id: str) -> RunHandle | None:
        """A running call of this stage identity (re-attach to it), found through the launch
        registry and run.json; raises ModalUnreachable while an earlier launch whose answer was
        lost may still be queued, or when Modal cannot be asked."""
        env, vol, app = spec.modal.environment, self._stage_volume(spec, stage), app_name(spec)
        run = self._read_record(StageRun, vol, self._rel(stage, restart_id, RUN_DIR, "run.json"), env)
        pending = self._read_record(LaunchIntent, vol, self._rel(stage, restart_id, RUN_DIR, layout.LAUNCH_FILE), env)
        reg = launches.lookup(self.adapter, layout.registry_name(app), layout.stage_key(app, stage, restart_id),
                              env=env)
        candidates: list[tuple[str, int, float]] = []
        if reg is not None:
            candidates.append((reg.call_id, reg.segment, reg.at))
        if run is not None:  # the segment running now (the CLI wrote it at launch, or a container at hand-over)
            candidates.append((run.call_id, run.segment, run.launched_at))
        for call_id, segment, at in dict.fromkeys(candidates):
            handle = self._handle(spec, stage, restart_id, call_id, run.app_name if run else app, at, None, [],
                                  segment=segment, reattached=True)
            try:
                if self.poll_stage(handle).state == "running":
                    return handle
            except CallNotFound:
                continue
        matched = {reg.launch_id if reg else None, run.launch_id if run else None}
        if pending is not None and pending.launch_id not in matched:
            stats = self.adapter.function_stats(app, stage_function_name(stage), env=env)
            if stats.backlog or stats.runners:
                raise ModalUnreachable(
                    f"stage.{stage}: an earlier launch ({pending.launch_id}) got no answer and may still be waiting "
                    "for its GPUs; not starting a second run",
                    f"{stage_function_name(stage)} has {stats.backlog} queued input(s) and {stats.runners} container(s)",
                    "try again in a few minutes (the run registers itself when it starts); to give it up, stop it in "
                    "Modal's dashboard first",
                )
        return None

    def poll_stage(self, handle: RunHandle) -> RunStatus:
        """Errors by meaning: Modal unreachable -> ModalUnreachable (the engine keeps the run
        and asks again); the call gone (result expired, input lost, id unknown) -> judged from
        what the run left on its volume, else `lost` (relaunched from its checkpoint); the
        run's own failure -> `failed` with the reason."""
        ref = modal_ref(handle)
        call_id, segment = ref.call_id, ref.segment
        outcome = self._poll(call_id)
        for _ in range(CHAIN_LIMIT):
            if outcome.state in ("expired", "lost"):
                outcome, call_id, segment = self._from_volume(handle, call_id, segment, outcome)
            result = _call_result(outcome, call_id)
            if outcome.state == "succeeded" and result is not None and result.outcome == "continued" \
                    and result.next_call_id:
                call_id, segment = result.next_call_id, segment + 1
                outcome = self._poll(call_id)
                continue
            break
        return self._status(handle, outcome, segment)

    def _poll(self, call_id: str) -> CallOutcome:
        try:
            return self.adapter.poll(call_id)
        except CallNotFound as exc:
            return CallOutcome(state="lost", error=exc.summary)

    def _from_volume(self, handle: RunHandle, call_id: str, segment: int,
                     gone: CallOutcome | None = None) -> tuple[CallOutcome, str, int]:
        """A call whose result Modal no longer has (expired, lost, unknown): what its run left on the volume."""
        ref = modal_ref(handle)
        vol, run_dir, env = ref.volume, ref.run_dir, ref.environment
        run = self._read_record(StageRun, vol, f"{run_dir}/run.json", env)
        if run is not None and run.call_id != call_id and run.segment > segment:
            return self._poll(run.call_id), run.call_id, run.segment
        result = self._read_record(StageResult, vol, f"{run_dir}/result.json", env)
        if result is not None and result.outcome in ("finished", "failed"):
            return CallOutcome(state="succeeded", result=result.model_dump()), call_id, segment
        why = gone.error if gone is not None and gone.error else "its result expired"
        return CallOutcome(state="expired", error=f"{why}; the run left no result"), call_id, segment

    def _status(self, handle: RunHandle, outcome: CallOutcome, segment: int) -> RunStatus:
        ref = modal_ref(handle)
        progress = self._read_record(StageProgress, ref.volume, f"{ref.run_dir}/progress.json", ref.environment)
        result = _call_result(outcome, ref.call_id)
        step = result.step if result is not None else progress.step if progress is not None else None
        total = handle.total_steps or (progress.total if progress is not None else None)
        active = (result.active_s if result is not None else 0.0) or (progress.active_s if progress is not None else 0.0)
        gpus, rate = ref.gpus, ref.usd_per_gpu_hour
        metrics = dict(progress.metrics) if progress is not None else {}
        metrics["gpu_seconds"] = round(active * gpus, 1)
        if rate is not None:
            metrics["cost_usd"] = round(active * gpus / 3600 * float(rate), 4)
        common = dict(step=step, total=total, elapsed_s=active or None, metrics=metrics,
                      log_tail=list(progress.log_tail)[-20:] if progress is not None else [], wandb=handle.wandb)
        where = f"segment {segment}" + (f", step {step}/{total}" if step is not None else "")
        if outcome.state == "running":
            ranks = {r: seen.model_dump() for r, seen in progress.ranks.items()} if progress and progress.ranks else None
            nodes = liveness_text(ranks, self.clock(), updated_at=progress.updated_at if progress else None)
            if nodes:  # a multi-node stage: what rank 0 sees of every rank
                metrics["nodes_alive"] = float(alive_count(ranks))
                where += f"; {nodes}"
            return RunStatus(state="running", message=f"running on Modal ({where})", **common)
        if outcome.state == "succeeded" and result is not None and result.outcome == "finished":
            return RunStatus(state="succeeded", message=f"finished ({where})", **common)
        if outcome.state == "succeeded" and result is not None and result.outcome == "failed":
            return RunStatus(state="failed", message=result.message or "failed", **common)
        if outcome.state == "expired":
            return RunStatus(state="lost", message=f"Modal has no result for the run ({outcome.error})", **common)
        # TERMINATED is how Modal reports a cancel; it also ends a container it killed (OOM, eviction)
        why = "cancelled or terminated by Modal" if outcome.state in ("cancelled", "terminated") else f"failed ({where})"
        tail = outcome.error.strip().splitlines()[-1:] if outcome.error else []
        return RunStatus(state="failed", message=why + (f": {tail[0][:300]}" if tail else ""), **common)

    def cancel_stage(self, handle: RunHandle) -> None:
        """Cancels the call now running (the last segment of the chain)."""
        call_id = modal_ref(handle).call_id
        for _ in range(CHAIN_LIMIT):
            outcome = self._poll(call_id)
            if outcome.state == "lost":
                return  # Modal knows no such call: nothing runs to cancel
            result = _call_result(outcome, call_id)
            if outcome.state == "succeeded" and result is not None and result.next_call_id:
                call_id = result.next_call_id
                continue
            break
        self.adapter.cancel(call_id)

    def discover_checkpoints(self, spec: Spec, stage: str, restart_id: str) -> list[Checkpoint]:
        definition = spec.stages[stage]
        return kind_of(definition).discover(
            self._files(spec, stage, restart_id), world_size=definition.resources.world_size, restart_id=restart_id,
        )

    def _files(self, spec: Spec, stage: str, restart_id: str) -> VolumeStageFiles:
        return VolumeStageFiles(
            adapter=self.adapter, volume=self._stage_volume(spec, stage), env=spec.modal.environment, stage=stage,
            stage_root=f"{mount(spec, spec.stages[stage].volume)}/{stage}",
            run_dir=self.paths(spec, stage, restart_id).stage_dir, rel_run_dir=self._rel(stage, restart_id),
        )

    # ------------------------------------------------------------------ finalize

    def finalize_stage(self, ctx: StageContext, checkpoint: Checkpoint) -> Outcome:
        """The stage kind's finalize (runtime.verl.kind: merge on one GPU through the finalize
        function, and the SFT tool-call check; runtime.eval.kind: metrics from the volume)."""
        paths = self.paths(ctx.spec, ctx.stage, ctx.restart_id)
        return kind_of(ctx.spec.stages[ctx.stage]).finalize(
            ctx, checkpoint, paths, self._files(ctx.spec, ctx.stage, ctx.restart_id),
            FunctionMerger(runtime=self, ctx=ctx, paths=paths),
        )

    # ------------------------------------------------------------------ cost

    def gpu_hour_usd(self, spec: Spec, gpu: str | None) -> float | None:
        """Price of one GPU-hour: Modal's billing rates when reachable, else the spec's table."""
        if gpu is None:
            return None
        if self._rates is None:
            try:
                self._rates = self.adapter.gpu_rates()
            except ModalUnreachable:  # ask again next time; the spec's table meanwhile
                return spec.pricing.gpu_hour_usd.get(gpu)
            except Exception:  # noqa: BLE001 - a price is optional: any other billing error means "use the table"
                self._rates = {}
        return self._rates.get(gpu, spec.pricing.gpu_hour_usd.get(gpu))

    # ------------------------------------------------------------------ helpers

    def _set_aside(
        self, names: tuple[str, ...], stage: str, restart_id: str, vol: str, env: str | None, now: float,
    ) -> dict[str, bytes]:
        """Files that keep a run's earlier progress (`names` in its run directory: an eval's
        samples) under `<stage>/.replaced/` and empty them in the run directory (a rerun from
        scratch starts anew)."""
        files: dict[str, bytes] = {}
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        for name in names:
            old = self._read_text(vol, self._rel(stage, restart_id, name), env)
            if old:
                files[f"{stage}/.replaced/{ckpts.restart_dir_name(restart_id)}-{stamp}/{name}"] = old.encode()
                files[self._rel(stage, restart_id, name)] = b"{}" if name.endswith(".json") else b""
        return files

    def _read_text(self, volume: str, path: str, env: str | None) -> str | None:
        try:
            return self.adapter.read_file(volume, path, env=env).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def _read_record(self, model: type[R], volume: str, path: str, env: str | None) -> R | None:
        """A run file on a volume as its model (runtime.records); None when it does not exist."""
        try:
            data = self.adapter.read_file(volume, path, env=env)
        except FileNotFoundError:
            return None
        return records.parse(model, data, source=f"{path} on Modal volume {volume}")


def _call_result(outcome: CallOutcome, call_id: str) -> StageResult | None:
    """A stage call's return value as its model (None while it runs, or when it returned nothing)."""
    if not isinstance(outcome.result, dict):
        return None
    return records.parse(StageResult, outcome.result, source=f"the result of Modal call {call_id}")


@dataclass(frozen=True)
class VolumeStageFiles:
    """runtime.stage_kind.StageFiles over a Modal volume (paths inside it: `<stage>/...`)."""

    adapter: ModalAdapter
    volume: str
    env: str | None
    stage: str
    stage_root: str  # as the containers see them (mount paths)
    run_dir: str
    rel_run_dir: str  # the run directory inside the volume

    def read_text(self, name: str) -> str | None:
        try:
            return self.adapter.read_file(self.volume, f"{self.rel_run_dir}/{name}", env=self.env).decode(
                "utf-8", errors="replace")
        except FileNotFoundError:
            return None

    def checkpoint_entries(self) -> list[ckpts.CkptEntry]:
        """The same view as runtime.checkpoints.scan_local: four levels, no merged/HF trees, no run files."""
        stage, vol, env = self.stage, self.volume, self.env
        try:
            listing = self.adapter.listdir(vol, stage, recursive=True, env=env)
        except FileNotFoundError:
            return []
        entries: list[ckpts.CkptEntry] = []
        for e in listing:
            rel = e.path[len(stage) + 1:] if e.path.startswith(stage + "/") else e.path
            parts = rel.split("/")
            if not rel or len(parts) > 4 or any(p in ckpts.SKIP_DIRS for p in parts) or parts[1:2] == [RUN_DIR]:
                continue
            content = None
            if not e.is_dir and ckpts.wants_content(rel):
                try:
                    content = self.adapter.read_file(vol, e.path, env=env).decode(errors="replace")[:4096]
                except FileNotFoundError:
                    content = None
            entries.append(ckpts.CkptEntry(path=rel, is_dir=e.is_dir, size=None if e.is_dir else e.size, content=content))
        return entries


@dataclass(frozen=True)
class FunctionMerger:
    """runtime.stage_kind.ModelMerger on Modal: the app's finalize function runs the merge
    (and the tool-call check) on one GPU; `merged.json` in the run directory records what
    was merged, so a later finalize of the same checkpoint and check spawns nothing."""

    runtime: ModalRuntime
    ctx: StageContext
    paths: StagePaths

    def merge(
        self, command: Callable[[str], RenderedCommand], checkpoint: Checkpoint, check: ToolCallCheck | None,
    ) -> MergeResult:
        rt, ctx, spec = self.runtime, self.ctx, self.ctx.spec
        env, vol = spec.modal.environment, rt._stage_volume(spec, ctx.stage)
        stamp_path = rt._rel(ctx.stage, ctx.restart_id, "merged.json")
        stamp = rt._read_record(MergeStamp, vol, stamp_path, env)
        change: Change = "unchanged"
        wanted = MergeStamp(step=checkpoint.step, checkpoint=checkpoint.path,
                            tool_call_check=check.model_dump(mode="json") if check else None)
        if stamp is None or stamp.model_copy(update={"outputs": {}, "version": wanted.version}) != wanted:
            payload = FinalizePayload(
                stage=ctx.stage, checkpoint_path=checkpoint.path, step=checkpoint.step, merged_dir=self.paths.merged_dir,
                volume=vol, commands=[command(self.paths.merged_dir).model_dump(mode="json")],
                tool_call_check=wanted.tool_call_check,
            )
            rt._ensure_deployed(spec)
            call_id = rt.adapter.spawn(app_name(spec), FINALIZE_FUNCTION, payload.model_dump(mode="json"), env=env)
            stamp = wanted.model_copy(update={"outputs": rt._wait_result(call_id, f"finalize stage.{ctx.stage}", 2 * 3600)})
            rt.adapter.put_files(vol, {stamp_path: records.dumps(stamp)}, env=env)
            change = "created"
        outputs = dict(stamp.outputs)
        measured = None
        if check is not None:
            measured = ToolCallMeasure(
                rate=float(outputs.get("tool_call_rate", 0.0)), prompts=int(outputs.get("tool_call_prompts") or 0),
            )
        return MergeResult(change=change, outputs=outputs, tool_check=measured)


def attention(image: Image) -> str | None:
    """verl's default attention is flash-attn 2; an image without it gets PyTorch's sdpa."""
    names = {req.name for req in map(parse_requirement, image.pip) if req is not None}
    facts = base_facts(image.base)
    provided = facts is not None and "flash-attn" in facts.provides
    return None if "flash-attn" in names or provided else "sdpa"


def in_container(cmd: RenderedCommand) -> RenderedCommand:
    """Renderers name files of retool's own packages by their path here (the RL tool config);
    in the container those packages live under /root (add_local_python_source)."""
    local = str(_package_root()) + "/"

    def fix(value: str) -> str:
        return value.replace(local, CONTAINER_SOURCE_ROOT + "/")

    return cmd.model_copy(update={
        "argv": [fix(a) for a in cmd.argv], "env": {k: fix(v) for k, v in cmd.env.items()},
        "cwd": fix(cmd.cwd) if cmd.cwd else None,
    })


def _package_root() -> Path:
    """Where retool's own packages are imported from (what add_local_python_source ships)."""
    return Path(__file__).resolve().parents[2]


def _sidecar(sb: Sandbox) -> SidecarSettings:
    return SidecarSettings(
        port=sb.port or SidecarSettings().port, workers=sb.workers, max_queue=sb.max_queue,
        memory_limit_mb=sb.memory_limit_mb, max_output_bytes=sb.max_output_bytes, preload=list(sb.preload),
    )


def _local_source(source: str, spec_dir: str) -> Path | None:
    if not source.startswith("path:"):
        return None
    path = Path(source[5:]).expanduser()
    path = path if path.is_absolute() else Path(spec_dir) / path
    if not path.exists():
        raise TerminalError(f"{source} does not exist", f"looked for {path}", "fix the path (relative to the spec file)")
    return path


def _upload_reporter(where: str, every_s: float = 5.0) -> Callable[[UploadProgress], None]:
    """Progress of a data upload on stderr: a line at most every `every_s` seconds, and the last."""
    last = [0.0]

    def report(p: UploadProgress) -> None:
        now = time.monotonic()
        if p.files_done < p.files_total and now - last[0] < every_s:
            return
        last[0] = now
        gib = 1024**3
        print(f"  uploading to {where}: {p.files_done}/{p.files_total} files, "
              f"{p.bytes_done / gib:.2f}/{p.bytes_total / gib:.2f} GiB", file=sys.stderr, flush=True)

    return report


def _stat(path: Path) -> list[Any]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[p.name if p == path else str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _http_ping(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/ping", timeout=10) as resp:  # noqa: S310
            return resp.status == 200
    except OSError:
        return False


__all__ = ["ModalRuntime", "MERGE_MODULE"]


def modal_ref(handle: RunHandle) -> ModalRun:
    """The function-call reference of a run this backend started."""
    if not isinstance(handle.ref, ModalRun) or not handle.ref.call_id:
        raise TerminalError("this run was not started by the Modal backend", f"handle backend {handle.backend}")
    return handle.ref
