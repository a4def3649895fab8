"""Weights & Biases for verl's trainers: which run a stage logs to, in which mode, and where.

verl 0.9.1 creates the W&B run itself (verl/utils/tracking.py calls `wandb.init(project=...,
name=<experiment>, entity=$WANDB_ENTITY, config=<the trainer's whole config>)` on rank 0),
so retool steers it through what wandb.init reads from the environment (docs/wandb.md):

- WANDB_RUN_ID `<spec>-<stage>-<restart id[:16]>` with WANDB_RESUME=allow: one run per
  restart identity, continued by every resume, retry and 24 h segment instead of a new run each;
- WANDB_RUN_GROUP the spec's name (a pipeline's stages side by side), WANDB_JOB_TYPE the stage's kind;
- WANDB_DIR the stage's run directory: the run's `wandb/` folder sits beside its checkpoints
  (on Modal, on the stage's volume);
- WANDB_MODE=offline when no WANDB_API_KEY reaches the trainer (locally: none in the
  environment apply runs in; on Modal: no secret of the stage carries one). A `WANDB_MODE`
  in the stage's `env` wins.

The spec name, stage address and restart identity also go into the run's config: verl passes
its hydra config to wandb.init, and one `+retool={spec,stage,restart_id}` override adds them there.

Pure and cheap to import (no wandb, no verl): render, status and the Modal backend use it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from reconciler.backend import StageContext
from reconciler.spec import EvalStage, Spec
from reconciler.state.base import WandbRun

API_KEY_ENV = "WANDB_API_KEY"
FOLDER = "wandb"  # wandb writes its runs under $WANDB_DIR/wandb/
OFFLINE_MODES = ("offline", "dryrun")


def logs_to_wandb(spec: Spec, stage: str) -> bool:
    logging = getattr(spec.stages[stage], "logging", None)  # eval stages have no trainer logger
    return logging is not None and "wandb" in logging.backends


def run_id(spec_name: str, stage: str, restart_id: str) -> str:
    """A W&B run id (letters, digits, `-`, `_`) that is the same for every run of one
    restart identity of one stage."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{spec_name}-{stage}").strip("-")[:40]
    return f"{base}-{restart_id[:16]}"


def key_declared(spec: Spec, stage: str) -> bool:
    """Whether a secret the stage names carries WANDB_API_KEY (how it reaches a container)."""
    names = getattr(spec.stages[stage], "secrets", [])
    return any(API_KEY_ENV in spec.secrets[s].env for s in names if s in spec.secrets)


def wandb_run(spec: Spec, stage: str, restart_id: str, *, key_available: bool) -> WandbRun | None:
    """The W&B run of one run of `stage`, or None when the stage does not log to W&B.
    `key_available`: WANDB_API_KEY reaches the trainer (the backend knows how)."""
    definition = spec.stages[stage]
    if isinstance(definition, EvalStage) or "wandb" not in definition.logging.backends:
        return None
    forced = definition.env.get("WANDB_MODE", "").strip().lower()
    online = (forced not in OFFLINE_MODES) if forced else key_available
    return WandbRun(
        mode="online" if online else "offline", project=definition.logging.project, group=spec.name,
        run_id=run_id(spec.name, stage, restart_id),
    )


def wandb_env(run: WandbRun | None, stage: str, kind: str, wandb_dir: str) -> dict[str, str]:
    """The environment that makes verl's wandb.init create or continue `run` (empty without one)."""
    if run is None:
        return {}
    env = {
        "WANDB_RUN_ID": run.run_id,
        "WANDB_RESUME": "allow",
        "WANDB_RUN_GROUP": run.group,
        "WANDB_JOB_TYPE": kind,
        "WANDB_DIR": wandb_dir,
        # wandb writes its `.wandb` file every 15 s by default; a run killed mid-way would lose
        # the steps since, which the resumed run does not log again (it continues after its checkpoint).
        "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "1",
    }
    if run.mode == "offline":
        env["WANDB_MODE"] = "offline"
    return env


def identity_overrides(ctx: StageContext) -> list[str]:
    """Hydra overrides that put the run's identity into its W&B config (verl logs its config)."""
    if not logs_to_wandb(ctx.spec, ctx.stage):
        return []
    identity = f"spec:{_quoted(ctx.spec.name)},stage:stage.{ctx.stage},restart_id:'{ctx.restart_id}'"
    return ["+retool={" + identity + "}"]


def _quoted(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_.\-]+", text) else "'" + text.replace("'", "\\'") + "'"


# --------------------------------------------------------------------------- what a run left


def offline_dirs(wandb_dir: Path, rid: str) -> list[Path]:
    """wandb's folders of run `rid` under `wandb_dir` (one per segment; names start with
    their start time, so sorted is oldest first)."""
    return sorted((wandb_dir / FOLDER).glob(f"offline-run-*-{rid}"))


def sync_command(dirs: list[str]) -> str:
    """`wandb sync` of every folder of one run (wandb uploads a resumed run's files in order)."""
    return "wandb sync " + " ".join(shlex.quote(d) for d in dirs)


def observed_local(run: WandbRun | None, wandb_dir: str, url: str | None) -> WandbRun | None:
    """`run` as it stands on this machine: the URL the trainer printed (online), or its
    offline folders and the command that uploads them."""
    if run is None:
        return None
    if run.mode == "online":
        return run.model_copy(update={"url": url or run.url})
    dirs = [str(p) for p in offline_dirs(Path(wandb_dir), run.run_id)]
    return run.model_copy(update={"run_dirs": dirs, "sync_command": sync_command(dirs) if dirs else None})


def observed_on_volume(run: WandbRun | None, volume: str, rel_dir: str, environment: str | None) -> WandbRun | None:
    """`run` of a stage on Modal: offline, its folders live on the stage's volume under
    `<rel_dir>/wandb/`; the command downloads them and uploads them with `wandb sync`."""
    if run is None or run.mode == "online":
        return run
    here = f"{run.run_id}-wandb"
    env = f" -e {shlex.quote(environment)}" if environment else ""
    get = f"modal volume get{env} {shlex.quote(volume)} {shlex.quote(f'{rel_dir}/{FOLDER}')} {here}"
    find = f"find {here} -maxdepth 3 -type d -name 'offline-run-*-{run.run_id}' | sort"
    return run.model_copy(update={
        "run_dirs": [f"{volume}:/{rel_dir}/{FOLDER}"], "sync_command": f"{get} && wandb sync $({find})",
    })
