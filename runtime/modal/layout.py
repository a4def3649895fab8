"""Names and paths of what the Modal backend creates: the app, its functions, volumes, the
directories on them, and the launch registry's keys.

    app          retool-<spec name> (spec.modal.app_name); functions stage-<name>,
                 prepare, finalize, sandbox (service placement only)
    volumes      <spec name>-<volume key>, mounted at the spec's `mount`
    dataset      <mount>/datasets/<name>/
    model        <mount>/models/<name>/
    stage run    <mount>/<stage>/<restart dir>/, with the run's files under _retool/
"""

from __future__ import annotations

from reconciler.spec import Spec
from runtime.checkpoints import restart_dir_name

WORKER_MODULE = "runtime.modal.worker"  # the entry points every function runs
CONTAINER_SOURCE_ROOT = "/root"  # where add_local_python_source puts packages in the container
RUN_DIR = "_retool"  # beside global_step_N: run.json, progress.json, result.json, attempts.jsonl, logs/
LAUNCH_FILE = "launch.json"  # beside run.json, in the stage's _retool/ directory


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


def stage_run_dir(spec: Spec, stage: str, restart_id: str) -> str:
    """Container path of a stage run: `<mount>/<stage>/<restart dir>` (checkpoints, merged/, _retool/)."""
    return f"{mount(spec, spec.stages[stage].volume)}/{run_path(stage, restart_id)}"


def run_path(stage: str, restart_id: str, *parts: str) -> str:
    """A path in a stage run, relative to its volume's root (what the volume API takes)."""
    return "/".join([stage, restart_dir_name(restart_id), *parts])


def volume_mounts(spec: Spec) -> dict[str, str]:
    """Every spec volume, mounted at its path: mount -> Modal volume name."""
    return {vol.mount: modal_volume_name(spec, key) for key, vol in sorted(spec.volumes.items())}


def registry_name(app_name: str) -> str:
    """The Modal Dict where stage calls register themselves (runtime.modal.launches)."""
    return f"{app_name}-launches"


def stage_key(app_name: str, stage: str, restart_id: str) -> str:
    """A stage identity's key in the launch registry."""
    return f"{app_name}/{stage}/{restart_id}"
