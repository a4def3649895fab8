"""The deployed Modal app, described as data built from the spec.

`build_app_definition(spec, repo_root)` turns a spec into an `AppDefinition`: one image
chain and the functions Modal runs (one per stage, plus data preparation, finalize and,
for `sandbox.placement: service`, the sandbox web endpoint). It is plain pydantic data, so
tests read exactly what Modal would receive; `runtime.modal.adapter.SdkAdapter.deploy`
is the only code that turns it into `modal.App` objects.

The image chain (`runtime.modal.images`): `from_registry(base)` → apt → the spec's
non-secret env → pip / uv installs (nothing a known base image already provides; its
framework without dependencies) → extra commands → `add_local_python_source` of retool's
own packages LAST. Secrets never enter the image: functions get `modal.Secret.from_name`
references.

Checks Modal only makes on its servers are made here, at plan time: `modal_problems`
(blocking: GPU types and counts, timeouts, cluster sizes -- `runtime.modal.limits` --, missing
local sources, secret variables in the image env) and `modal_warnings` (mutable tags,
unpinned or compiled packages, CPU/memory requests above retool's thresholds).

The container side (what each function does once it starts) lives in
`runtime.modal.worker`; the functions named in `Entry` are its entry points.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from reconciler.spec import EvalStage, RLStage, Spec, StageCommon
from reconciler.records import Frozen
from runtime.modal.images import ImageStep, image_problems, image_steps, image_warnings
from runtime.modal.launches import LaunchKey
from runtime.modal.limits import function_problems, size_warnings

MAX_TIMEOUT_HOURS = 24.0  # Modal's per-attempt limit
# The container stops training this long before Modal's timeout, so it can commit the
# volumes and hand over to the next segment instead of being killed mid-write.
SEGMENT_MARGIN_S = 15 * 60
# EFA: Modal's multi-node guide enables it on H100 clusters, with these system libraries in the image
EFA_AUTO_GPUS = ("H100", "H100!")
EFA_LIBRARIES = ("libhwloc15", "libnl-route-3-200")
SIDECAR_PORT = 8765  # the RL container's sandbox sidecar listens on localhost here by default
WORKER_MODULE = "runtime.modal.worker"
CONTAINER_SOURCE_ROOT = "/root"  # where add_local_python_source puts packages in the container

Entry = Literal["run_stage", "prepare", "finalize", "sandbox_web"]


class FunctionSpec(Frozen):
    """One `app.function(...)` registration of an entry point in `runtime.modal.worker`."""

    name: str  # Modal function name within the app
    entry: Entry
    gpu: str | list[str] | None = None  # "H100:8", or a fallback list ["H100:8", "A100-80GB:8"]
    cpu: float | None = None
    memory_mb: int | None = None
    timeout_s: int = 3600
    retries: int = 0
    volumes: dict[str, str] = Field(default_factory=dict)  # mount path -> Modal volume name
    secrets: list[str] = Field(default_factory=list)  # Modal secret names
    env: dict[str, str] = Field(default_factory=dict)  # non-secret settings for the entry point
    cluster_size: int | None = None  # `@modal.clustered(size=N)` when nodes > 1
    efa: bool = False  # `experimental_options={"efa_enabled": True}` (clustered functions)
    web: bool = False  # `@modal.asgi_app()`
    concurrent_inputs: int | None = None  # `@modal.concurrent(max_inputs=N)`
    min_containers: int | None = None
    max_containers: int | None = None


class AppDefinition(Frozen):
    app_name: str
    environment: str | None = None
    image: list[ImageStep]
    functions: list[FunctionSpec]

    def function(self, name: str) -> FunctionSpec:
        for fn in self.functions:
            if fn.name == name:
                return fn
        raise KeyError(name)

    def digest(self) -> str:
        """Identity of what would be deployed (an unchanged digest needs no redeploy)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- names and paths


def app_name(spec: Spec) -> str:
    if spec.modal.app_name:
        return spec.modal.app_name
    return spec.name if spec.name.startswith("retool") else f"retool-{spec.name}"


def modal_volume_name(spec: Spec, key: str) -> str:
    """Modal volumes are workspace-global: prefix the spec's name so pipelines never share one."""
    return f"{spec.name}-{key}"


def stage_function_name(stage: str) -> str:
    return f"stage-{stage}"


PREPARE_FUNCTION = "prepare"
FINALIZE_FUNCTION = "finalize"
SANDBOX_FUNCTION = "sandbox"


def mount(spec: Spec, volume_key: str) -> str:
    return spec.volumes[volume_key].mount


def dataset_dir(spec: Spec, name: str) -> str:
    """Container path of a prepared dataset (LOCAL_API layout under the volume's mount)."""
    return f"{mount(spec, spec.datasets[name].volume)}/datasets/{name}"


def model_dir(spec: Spec, name: str) -> str:
    return f"{mount(spec, spec.models[name].volume)}/models/{name}"


def stage_dir(spec: Spec, stage: str, restart_id: str) -> str:
    """Container path of a stage's checkpoints: `<mount>/<stage>/<restart_id[:16]>`."""
    return f"{mount(spec, spec.stages[stage].volume)}/{stage_rel_dir(stage, restart_id)}"


def stage_rel_dir(stage: str, restart_id: str) -> str:
    """The same directory relative to the volume's root (for `Volume.listdir`)."""
    return f"{stage}/{restart_id[:16]}"


def volume_mounts(spec: Spec) -> dict[str, str]:
    """Every spec volume, mounted at its path: mount -> Modal volume name."""
    return {vol.mount: modal_volume_name(spec, key) for key, vol in sorted(spec.volumes.items())}


# --------------------------------------------------------------------------- validation


def save_interval_problem(stage: StageCommon | EvalStage, segment_hours: float) -> str | None:
    """A segment hands over from its latest checkpoint: one that cannot save within its time
    ends with nothing new, and every retry repeats the same steps forever."""
    # eval stages keep every finished sample round; without an estimate the interval is unknown
    if not isinstance(stage, StageCommon) or stage.seconds_per_step is None:
        return None
    save_freq, per_step = stage.save_freq, stage.seconds_per_step
    usable_s = segment_hours * 3600 - SEGMENT_MARGIN_S
    if save_freq * per_step <= usable_s:
        return None
    fits = int(usable_s // per_step)
    return (f"{save_freq} steps x seconds_per_step {per_step:g} s = {save_freq * per_step / 3600:.1f} h between "
            f"checkpoints, longer than a segment ({usable_s / 3600:.2f} h usable of resources.timeout_hours "
            f"{segment_hours:g}): every segment would end without a new checkpoint and its retries repeat it; "
            + (f"set save_freq to {fits} or less" if fits >= 1 else "one step does not fit a segment"))


def modal_problems(spec: Spec, repo_root: str | Path) -> list[str]:
    """What Modal would reject only on its servers, found here before anything runs."""
    problems: list[str] = list(image_problems(spec.image))
    for name, stage in spec.stages.items():
        fn = stage_function(spec, name)
        for why in function_problems(gpu=fn.gpu, timeout_s=fn.timeout_s, cluster_size=fn.cluster_size):
            problems.append(f"stages.{name}.resources: {why}")
        hours = stage.resources.timeout_hours
        if hours > MAX_TIMEOUT_HOURS:
            problems.append(
                f"stages.{name}.resources.timeout_hours: {hours:g} h exceeds Modal's 24 h per attempt "
                "(longer stages already run as several segments; set it to 24 or less)"
            )
        if hours * 3600 <= SEGMENT_MARGIN_S:
            problems.append(
                f"stages.{name}.resources.timeout_hours: {hours:g} h leaves no time to train after the "
                f"{SEGMENT_MARGIN_S // 60}-minute hand-over margin"
            )
        elif (why := save_interval_problem(stage, min(hours, MAX_TIMEOUT_HOURS))) is not None:
            problems.append(f"stages.{name}.save_freq: {why}")
    root = Path(repo_root)
    for src in spec.image.local_sources:
        if not ((root / src / "__init__.py").is_file() or (root / f"{src}.py").is_file()):
            problems.append(f"image.local_sources: {src!r} is not a Python package or module under {root}")
    secret_vars = {var for ref in spec.secrets.values() for var in ref.env}
    for var in sorted(set(spec.image.env) & secret_vars):
        problems.append(
            f"image.env.{var}: this variable is provided by a secret; secrets are attached to functions, "
            "never baked into the image"
        )
    for name, stage in spec.stages.items():
        for var in sorted(set(stage.env) & secret_vars):
            problems.append(f"stages.{name}.env.{var}: this variable is provided by a secret; list the secret instead")
    if spec.sandbox is not None and spec.sandbox.placement == "service":
        key = spec.sandbox.token_secret
        if key is None:
            problems.append("sandbox.token_secret: a `service` sandbox needs a secret holding its bearer token")
        elif key not in spec.secrets:
            problems.append(f"sandbox.token_secret: {key!r} is not a key of `secrets`")
    return problems


def modal_warnings(spec: Spec) -> list[str]:
    """What may fail or change later without blocking now (validate and plan show them)."""
    warnings = list(image_warnings(spec.image))
    for name, stage in spec.stages.items():
        res = stage.resources
        warnings += [f"stages.{name}.resources: {w}" for w in size_warnings(cpu=res.cpu, memory_mb=res.memory_mb)]
    if spec.sandbox is not None and spec.sandbox.placement == "service":
        sb = spec.sandbox
        warnings += [f"sandbox: {w}" for w in size_warnings(cpu=sb.cpu, memory_mb=sb.memory_mb)]
    return warnings


# --------------------------------------------------------------------------- functions


def _modal_secret_names(spec: Spec, keys: list[str]) -> list[str]:
    return [spec.secrets[k].modal_name or k for k in keys if k in spec.secrets]


def _hf_secret_keys(spec: Spec) -> list[str]:
    wanted = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
    return sorted(k for k, ref in spec.secrets.items() if wanted & set(ref.env))


def stage_function(spec: Spec, stage_name: str) -> FunctionSpec:
    stage = spec.stages[stage_name]
    res = stage.resources
    gpu: str | list[str] | None = None
    if res.gpu is not None:
        gpus = [f"{t}:{res.gpus_per_node}" for t in [res.gpu, *res.gpu_fallbacks]]
        gpu = gpus[0] if len(gpus) == 1 else gpus
    secret_keys = list(stage.secrets)
    if isinstance(stage, (RLStage, EvalStage)) and spec.sandbox is not None and spec.sandbox.placement == "service":
        if spec.sandbox.token_secret and spec.sandbox.token_secret not in secret_keys:
            secret_keys.append(spec.sandbox.token_secret)
    return FunctionSpec(
        name=stage_function_name(stage_name),
        entry="run_stage",
        gpu=gpu,
        cpu=res.cpu,
        memory_mb=res.memory_mb,
        timeout_s=int(min(res.timeout_hours, MAX_TIMEOUT_HOURS) * 3600),
        retries=res.retries,
        volumes=volume_mounts(spec),
        secrets=_modal_secret_names(spec, secret_keys),
        cluster_size=res.nodes if res.nodes > 1 else None,
        efa=res.nodes > 1 and (spec.modal.efa == "on" or (spec.modal.efa == "auto" and res.gpu in EFA_AUTO_GPUS)),
    )


def finalize_gpu(spec: Spec) -> str | None:
    """Finalize (merge + tool-call check) runs on one GPU of the first GPU type the stages use."""
    for stage in spec.stages.values():
        if stage.resources.gpu is not None:
            return stage.resources.gpu
    return None


def build_app_definition(spec: Spec) -> AppDefinition:
    """Everything Modal receives for this spec, as data."""
    mounts = volume_mounts(spec)
    hf = _modal_secret_names(spec, _hf_secret_keys(spec))
    functions = [stage_function(spec, name) for name in spec.stages]
    functions.append(FunctionSpec(
        name=PREPARE_FUNCTION, entry="prepare", cpu=8.0, memory_mb=32768, timeout_s=4 * 3600,
        retries=1, volumes=mounts, secrets=hf,
    ))
    functions.append(FunctionSpec(
        name=FINALIZE_FUNCTION, entry="finalize", gpu=finalize_gpu(spec), cpu=8.0, memory_mb=131072,
        timeout_s=2 * 3600, retries=1, volumes=mounts, secrets=hf,
    ))
    sb = spec.sandbox
    if sb is not None and sb.placement == "service":
        functions.append(FunctionSpec(
            name=SANDBOX_FUNCTION, entry="sandbox_web", cpu=sb.cpu, memory_mb=sb.memory_mb, timeout_s=3600,
            secrets=_modal_secret_names(spec, [sb.token_secret] if sb.token_secret else []),
            env=sandbox_env(spec), web=True, concurrent_inputs=sb.max_queue + (sb.workers or int(sb.cpu)),
            min_containers=sb.replicas, max_containers=sb.replicas,
        ))
    efa_libraries = EFA_LIBRARIES if any(fn.efa for fn in functions) else ()
    return AppDefinition(
        app_name=app_name(spec), environment=spec.modal.environment,
        image=image_steps(spec.image, apt_extra=efa_libraries), functions=functions,
    )


def sandbox_env(spec: Spec) -> dict[str, str]:
    """Non-secret settings of the service sandbox, read by `runtime.modal.worker.sandbox_web`."""
    sb = spec.sandbox
    assert sb is not None
    env = {
        "RETOOL_SANDBOX_SETTINGS": json.dumps(sb.model_dump(mode="json"), sort_keys=True),
    }
    token_var = sandbox_token_env(spec)
    if token_var:
        env["RETOOL_SANDBOX_TOKEN_VAR"] = token_var
    return env


def sandbox_token_env(spec: Spec) -> str | None:
    """Name of the environment variable that holds the service sandbox's bearer token."""
    sb = spec.sandbox
    if sb is None or sb.placement != "service" or not sb.token_secret or sb.token_secret not in spec.secrets:
        return None
    return spec.secrets[sb.token_secret].env[0]


# --------------------------------------------------------------------------- payloads
# What a spawned call receives and returns: plain JSON-able data (Modal pickles it; only
# builtins cross, so the CLI and the container need not run the same Python).


class SidecarSettings(Frozen):
    """The sandbox the RL container starts on localhost before training."""

    port: int = SIDECAR_PORT
    workers: int | None = None
    max_queue: int = 256
    memory_limit_mb: int = 1024
    max_output_bytes: int = 65536
    preload: list[str] = Field(default_factory=list)


class StagePayload(Frozen):
    version: int = 1
    app_name: str
    function: str
    environment: str | None = None
    stage: str
    kind: Literal["sft", "rl", "eval"]
    restart_id: str
    segment: int = 0
    segments_planned: int = 1
    total_steps: int | None = None
    resume_from: int | None = None
    world_size: int = 1
    nodes: int = 1
    # multi-node: how long rank 0 waits for every rank to check in (and each rank for rank 0)
    join_timeout_s: float = 600.0
    commands: list[dict[str, Any]]  # reconciler.backend.RenderedCommand dumps, exactly `retool render`'s
    checkpoint_dir: str  # container path: <mount>/<stage>/<restart_id[:16]>
    checkpoint_volume: str  # Modal volume name holding it
    volumes: dict[str, str]  # Modal volume name -> mount path (reloaded at start, committed at the end)
    sidecar: SidecarSettings | None = None
    # service sandbox: the variable holding its token; the container puts the token into
    # RETOOL_SANDBOX_URL (`<url>/t/<token>`) so the token never enters payloads or state
    sandbox_token_var: str | None = None
    # a from-scratch launch over checkpoints of the same identity: the first attempt moves
    # them to <stage>/.replaced/ (never deletes them)
    replace_existing: bool = False
    train_seconds: float  # per attempt: stop, commit and hand over to the next segment after this
    commit_every_s: float = 600.0
    launch: LaunchKey | None = None  # how the call registers itself (runtime.modal.launches)


class StageResult(Frozen):
    outcome: Literal["finished", "continued", "failed"]
    step: int | None = None
    segment: int = 0
    next_call_id: str | None = None
    active_s: float = 0.0  # container seconds of every attempt of every segment so far
    message: str = ""


class PreparePayload(Frozen):
    kind: Literal["dataset", "model"]
    name: str
    config: dict[str, Any]  # the Dataset / Model spec section
    spec_dir: str  # container directory that `path:` sources resolve against (uploaded inputs)
    out_dir: str  # container path to materialise into
    volume: str  # Modal volume name to commit


class FinalizePayload(Frozen):
    stage: str
    checkpoint_path: str
    step: int
    merged_dir: str
    volume: str
    commands: list[dict[str, Any]]  # merge command(s), rendered like the stage's
    tool_call_check: dict[str, Any] | None = None  # ToolCallCheck dump for SFT stages with a check


RUN_DIR = "_retool"  # beside global_step_N: run.json, progress.json, result.json, attempts.jsonl, logs/
