"""What every verl launch shares: environment, hydra value syntax, paths from upstream
outputs, logger lists and secrets.

Pure and cheap to import (no torch, no verl): `retool render` and the Modal backend use it
on machines without the training stack.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict

from reconciler.errors import TerminalError
from reconciler.spec import EvalStage, Logging, RLStage, SFTStage, Spec
from reconciler.backend import StageContext

# Module names verl imports in every process when named in VERL_USE_EXTERNAL_MODULES.
CPU_PLATFORM_MODULE = "runtime.verl.cpu_platform"
CPU_PLATFORM_NAME = "cpu"

# verl's SFT/RL checkpoint tracker (written atomically after a checkpoint is complete).
TRACKER_FILE = "latest_checkpointed_iteration.txt"


class StagePaths(BaseModel):
    """Where one run of a stage writes, as seen by the process that trains.

    `ckpt_dir` is verl's `trainer.default_local_dir` (`global_step_N/` live in it),
    `merged_dir` receives the Hugging Face model, `stage_dir` holds retool's own files
    (metrics, marker). Locally these are host paths; on Modal, mount paths."""

    model_config = ConfigDict(frozen=True)

    stage_dir: str
    ckpt_dir: str
    merged_dir: str


def stage_spec(ctx: StageContext) -> SFTStage | RLStage | EvalStage:
    try:
        return ctx.spec.stages[ctx.stage]
    except KeyError:
        raise TerminalError(f"stage.{ctx.stage} is not in the spec", hint="check the address") from None


def base_env(ctx: StageContext, *, cpu: bool, external_modules: tuple[str, ...] = ()) -> dict[str, str]:
    """Non-secret environment for a verl process of `ctx`'s stage.

    Order: the image's env, then retool's settings, then the stage's own `env` (the user
    wins). On CPU the platform module and engine selector of runtime.verl.cpu_platform are set;
    `external_modules` (e.g. the transformers rollout's registration) join the CPU platform in
    VERL_USE_EXTERNAL_MODULES."""
    stage = stage_spec(ctx)
    env: dict[str, str] = dict(ctx.spec.image.env)
    env.update({
        "PYTHONUNBUFFERED": "1",  # step lines reach the log as they happen
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": "disabled",  # Ray >= 2.60 token auth breaks single-machine runs
        "HYDRA_FULL_ERROR": "1",
    })
    modules = [CPU_PLATFORM_MODULE] if cpu else []
    modules += [m for m in external_modules if m not in modules]
    if modules:
        env["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
    if cpu:
        env["VERL_PLATFORM"] = CPU_PLATFORM_NAME
        env["VERL_ENGINE_DEVICE"] = "cuda"  # verl registers its FSDP engine under "cuda" only
    env.update(stage.env)
    return env


def secret_env_names(spec: Spec, keys: list[str]) -> list[str]:
    """Environment variable names of the secrets `keys` (values never touch retool)."""
    names: list[str] = []
    for key in keys:
        ref = spec.secrets.get(key)
        if ref is None:
            raise TerminalError(f"secret {key!r} is not declared under `secrets`", hint="add it to the spec")
        names += [n for n in ref.env if n not in names]
    return names


def logger_list(logging: Logging) -> list[str]:
    """verl's `trainer.logger`: the spec's backends, always with `console` (retool reads
    progress and metrics from the trainer's stdout)."""
    out = ["console"]
    out += [b for b in logging.backends if b not in out]
    return out


def training_stage(ctx: StageContext) -> SFTStage | RLStage:
    """`ctx`'s stage, which must be one verl trains."""
    stage = stage_spec(ctx)
    if isinstance(stage, EvalStage):
        raise TerminalError(f"stage.{ctx.stage} is an eval stage, which verl does not train")
    return stage


def experiment_name(ctx: StageContext) -> str:
    return training_stage(ctx).logging.experiment or f"{ctx.spec.name}-{ctx.stage}"


def input_outputs(ctx: StageContext, address: str) -> dict[str, Any]:
    outputs = ctx.inputs.get(address)
    if not outputs:
        raise TerminalError(
            f"stage.{ctx.stage} needs {address}, which has no recorded outputs",
            hint=f"apply {address} first (plan orders it before the stage)",
        )
    return outputs


def dataset_file(ctx: StageContext, address: str) -> str:
    """The parquet file of a prepared dataset (its recorded `path`: the file or its folder)."""
    path = str(input_outputs(ctx, address).get("path") or "")
    if not path:
        raise TerminalError(f"{address} recorded no `path`", hint=f"re-prepare it: retool apply --replace {address}")
    return path if path.endswith(".parquet") else path.rstrip("/") + "/train.parquet"


def initial_weights_dir(ctx: StageContext, address: str) -> str:
    """Initial weights: a prepared model's `path`, or an upstream stage's merged `model_path`."""
    outputs = input_outputs(ctx, address)
    key = "model_path" if address.startswith("stage.") else "path"
    path = outputs.get(key)
    if not path:
        raise TerminalError(
            f"{address} recorded no `{key}`",
            hint="an upstream stage must finish (and merge) before this one starts",
        )
    return str(path)


def world(stage: SFTStage | RLStage) -> tuple[int, int]:
    """(nnodes, processes per node) of a stage."""
    res = stage.resources
    return res.nodes, res.processes_per_node or res.gpus_per_node or 1


def fsdp_strategy(*, cpu: bool) -> str:
    """verl's FSDP strategy for every role of a stage: the recipe's `fsdp` (FSDP1, also verl
    0.9.1's default) on GPUs; `fsdp2` on CPU, because torch's FSDP1 refuses CPU parameters
    (verl wraps with `sync_module_states=True`, which needs them on an accelerator)."""
    return "fsdp2" if cpu else "fsdp"


# --------------------------------------------------------------------------- hydra values

_BARE = re.compile(r"^[A-Za-z0-9_./@+\-]+$")
_KEY = re.compile(r"^[+~]{0,2}([A-Za-z_][\w.\-]*)")


def hydra_value(value: Any) -> str:
    """`value` in hydra's override grammar (strings quoted when they need it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if _BARE.match(text) and text.lower() not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(item: str) -> str:
    """The config key an override sets (`+a.b=1` -> `a.b`)."""
    m = _KEY.match(item)
    return m.group(1) if m else item


def merge_overrides(ours: list[str], theirs: list[str]) -> list[str]:
    """Ours, minus any key the spec's raw overrides set, then theirs (the user wins;
    hydra rejects a `+key` given twice, so ours must step aside rather than be overridden)."""
    taken = {override_key(t) for t in theirs}
    return [o for o in ours if override_key(o) not in taken] + list(theirs)


def kv(key: str, value: Any) -> str:
    return f"{key}={hydra_value(value)}"


# --------------------------------------------------------------------------- composition check


def entry_point(argv: list[str]) -> tuple[str, list[str]]:
    """(module, hydra overrides) of a rendered `torchrun … -m MOD …` / `python -m MOD …` argv."""
    try:
        i = argv.index("-m")
    except ValueError:
        raise TerminalError(f"not a `-m module` command: {' '.join(argv[:3])} …") from None
    return argv[i + 1], argv[i + 2:]


def compose_config(
    argv: list[str], env: dict[str, str], *, timeout: float = 180.0, resolve: bool = False
) -> dict[str, Any]:
    """Compose a rendered command's config with verl's own hydra setup (`--cfg job`: hydra
    prints the job config and exits before training). An unknown key or a malformed value
    raises TerminalError carrying hydra's message. `resolve` resolves interpolations (the
    values verl will read). Needs verl installed."""
    import os
    import sys

    module, overrides = entry_point(argv)
    done = subprocess.run(
        [sys.executable, "-m", module, "--cfg", "job", *(["--resolve"] if resolve else []), *overrides],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise TerminalError(f"verl rejects the overrides of {module}", "\n".join(lines[-15:]))
    loaded = _yaml_document(done.stdout)
    if not isinstance(loaded, dict):
        raise TerminalError(f"{module} --cfg job printed no config", done.stdout[-2000:])
    return loaded


def _yaml_document(text: str) -> Any:
    """The YAML config in `text`, skipping any lines printed before it (import noise)."""
    import yaml

    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_][\w]*:( |$)", line):
            try:
                return yaml.safe_load("\n".join(lines[i:]))
            except yaml.YAMLError:
                return None
    return None


# --------------------------------------------------------------------------- this machine


@lru_cache(maxsize=1)
def local_gpu_count() -> int:
    """NVIDIA GPUs visible on this machine, via `nvidia-smi -L` (no torch import)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def with_planned_inputs(
    ctx: StageContext, *, dataset_dir: Callable[[str], str], model_dir: Callable[[str], str],
    stage_root: Callable[[str], str],
) -> StageContext:
    """`ctx` with every input that has no recorded outputs yet shown where the backend will
    put it, so `retool render` works before the first apply. The backend supplies its own
    layout (local directories or container mount paths)."""
    stage = stage_spec(ctx)
    if isinstance(stage, EvalStage):
        needed = [stage.model, *stage.datasets]
    else:
        val = stage.val if isinstance(stage.val, list) else ([stage.val] if stage.val else [])
        needed = [stage.model, stage.train, *val]
    inputs = dict(ctx.inputs)
    for address in needed:
        if inputs.get(address):
            continue
        kind, _, name = address.partition(".")
        if kind == "dataset":
            inputs[address] = {"path": f"{dataset_dir(name)}/train.parquet"}
        elif kind == "model":
            inputs[address] = {"path": model_dir(name)}
        elif kind == "stage":
            inputs[address] = {"model_path": f"{stage_root(name)}/<restart id>/merged"}
    return ctx.model_copy(update={"inputs": inputs})
