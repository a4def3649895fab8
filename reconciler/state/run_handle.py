"""How to find a detached run again: common fields plus one typed reference per backend.

A handle is written into state when a stage launches and read back by every later plan,
apply and status, so it is versioned data like the rest of state: read leniently, and
handles written before the typed references existed (flat `pid`/`call_id` fields plus an
untyped `extra` dict) are converted on read.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", defer_build=True)


class LocalRun(_Lenient):
    """A detached process group on this machine (runtime.local)."""

    backend: Literal["local"] = "local"
    pid: int  # leader of the process group
    pgid: int | None = None
    start_ticks: int | None = None  # the leader's start time: tells a reused pid apart
    tag: str = ""  # RETOOL_RUN_TAG in every member's environment (finds strays after the leader)
    log_path: str
    exit_path: str = ""  # the exit record the leader writes when its commands end
    metrics_path: str = ""
    stage_dir: str = ""
    device: Literal["cpu", "cuda"] = "cpu"


class ModalRun(_Lenient):
    """A Modal function call (runtime.modal): the head call of a chain of 24 h segments."""

    backend: Literal["modal"] = "modal"
    call_id: str  # FunctionCall.object_id
    app_name: str = ""
    segment: int = 0
    volume: str = ""  # the stage's checkpoint volume (run.json, progress.json live there)
    run_dir: str = ""
    environment: str | None = None
    gpus: int = 0
    gpu: str = ""
    usd_per_gpu_hour: float | None = None


class RayRun(_Lenient):
    """A Ray job on the user's cluster (runtime.ray), found again by its submission id."""

    backend: Literal["ray"] = "ray"
    submission_id: str
    address: str = ""  # the Jobs API address it was submitted to
    stage_dir: str = ""  # the run directory in the cluster's shared storage
    exit_path: str = ""  # the exit record runtime.processes writes there when the commands end
    log_path: str = ""  # this machine's copy of the job's log (fetched with get_job_logs)
    metrics_path: str = ""


class OpaqueRun(_Lenient):
    """A run of a backend that needs nothing but an id (the in-memory test backend)."""

    backend: Literal["memory"] = "memory"
    run_id: str


class WandbRun(_Lenient):
    """The Weights & Biases run a stage logs to. verl's trainer creates it; retool chooses its
    id (stable per restart identity, so every segment and retry continues it), group (the
    spec), mode and folder (runtime.tracking). Online it has a URL once the trainer printed
    one; offline, its local run folders (one per segment) and the `wandb sync` that uploads them."""

    mode: Literal["online", "offline"]
    project: str
    group: str
    run_id: str
    url: str | None = None
    run_dirs: list[str] = Field(default_factory=list)  # offline: wandb's run folders, oldest first
    sync_command: str | None = None  # offline: uploads every folder of the run, in order

    def where(self) -> str:
        """The URL, else the run's folder(s), else its id (what a person looks at)."""
        if self.url:
            return self.url
        if self.run_dirs:
            return " ".join(self.run_dirs)
        return f"{self.project}/{self.run_id}"


RunRef = Annotated[LocalRun | ModalRun | RayRun | OpaqueRun, Field(discriminator="backend")]


class RunHandle(_Lenient):
    """What the reconciler records about a launched stage run."""

    ref: RunRef
    stage: str = ""
    kind: str = ""  # the stage kind (sft / rl / eval)
    restart_id: str = ""
    started_at: float = Field(default_factory=time.time)
    command: list[str] = Field(default_factory=list)
    total_steps: int | None = None
    resume_from: int | None = None  # the checkpoint step this run started from
    reattached: bool = False  # launch found a live run an earlier (dead) apply had started
    accounted_s: float | None = None  # time already added to the node's GPU-seconds and cost
    wandb: WandbRun | None = None  # the W&B run it logs to (None: the stage does not log to W&B)

    @property
    def backend(self) -> str:
        return self.ref.backend

    @model_validator(mode="before")
    @classmethod
    def _from_untyped(cls, data: Any) -> Any:
        """Handles written before typed references: flat fields and an `extra` dict."""
        if not isinstance(data, dict) or "ref" in data or "backend" not in data:
            return data
        extra = dict(data.get("extra") or {})
        backend = data["backend"]
        if backend == "local":
            ref: dict[str, Any] = {
                "backend": "local", "pid": data.get("pid") or 0, "pgid": data.get("pgid"),
                "log_path": data.get("log_path") or "",
                **{k: extra[k] for k in ("start_ticks", "tag", "exit_path", "metrics_path", "stage_dir", "device")
                   if extra.get(k) is not None},
            }
        elif backend == "modal":
            ref = {
                "backend": "modal", "call_id": data.get("call_id") or "", "app_name": data.get("app_name") or "",
                "segment": data.get("segment") or 0,
                **{k: extra[k] for k in ("volume", "run_dir", "environment", "gpus", "gpu", "usd_per_gpu_hour")
                   if extra.get(k) is not None},
            }
        else:
            ref = {"backend": backend, "run_id": data.get("call_id") or ""}
        common = {k: extra[k] for k in ("stage", "kind", "restart_id", "total_steps", "resume_from", "reattached",
                                        "accounted_s") if extra.get(k) is not None}
        return {"ref": ref, **common, **{k: data[k] for k in ("started_at", "command") if k in data}}
