"""The deployed Modal app, described as data built from the spec.

`build_app_definition(spec, repo_root)` turns a spec into an `AppDefinition`: one image
chain and the functions Modal runs (one per stage, plus data preparation, finalize and,
for `sandbox.placement: service`, the sandbox web endpoint). It is plain pydantic data
(`runtime.modal.models`), so tests read exactly what Modal would receive; `runtime.modal.adapter.SdkAdapter.deploy`
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
`runtime.modal.worker`; the functions named in `models.Entry` are its entry points.
"""

from __future__ import annotations

import json
from pathlib import Path

from reconciler.spec import EvalStage, RLStage, Spec, StageCommon
from runtime.modal.images import image_problems, image_steps, image_warnings
from runtime.modal.layout import (
    FINALIZE_FUNCTION,
    PREPARE_FUNCTION,
    SANDBOX_FUNCTION,
    app_name,
    stage_function_name,
    volume_mounts,
)
from runtime.modal.limits import function_problems, size_warnings
from runtime.modal.models import AppDefinition, FunctionSpec

MAX_TIMEOUT_HOURS = 24.0  # Modal's per-attempt limit
# The container stops training this long before Modal's timeout, so it can commit the
# volumes and hand over to the next segment instead of being killed mid-write.
SEGMENT_MARGIN_S = 15 * 60
# EFA: Modal's multi-node guide enables it on H100 clusters, with these system libraries in the image
EFA_AUTO_GPUS = ("H100", "H100!")
EFA_LIBRARIES = ("libhwloc15", "libnl-route-3-200")

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
        elif (cadence := save_interval_problem(stage, min(hours, MAX_TIMEOUT_HOURS))) is not None:
            problems.append(f"stages.{name}.save_freq: {cadence}")
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
        if res.gpu is None:  # legal (a CPU function, as `gpu: null` means everywhere), rarely meant
            warnings.append(f"stages.{name}.resources: no `gpu`: runs on a CPU container (verl on CPU, a tiny "
                            "model's scale); set resources.gpu and gpus_per_node for a GPU")
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
