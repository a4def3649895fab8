"""Files one process writes and another reads: one versioned pydantic model per file.

Every file that crosses a process or container boundary is a `Record` here, and both its
writer and its reader go through the model (`save` / `dumps` to write, `load` / `parse` to
read), so the two sides cannot drift apart key by key.

Readers are lenient with older files and strict about types: a field added later has a
default (a file written before it existed still reads), unknown keys are ignored, but a
value of the wrong type is an error naming the file and the field, never a silent
`.get()` default. A file written by a newer retool (a higher `version`) is refused with the
same kind of error rather than half-read.

    Modal stage run, <mount>/<stage>/<restart dir>/_retool/ on the stage's volume
        run.json        StageRun        the call running the stage now (CLI at launch, container at hand-over)
        progress.json   StageProgress   step, active seconds, metrics, log tail, per-rank liveness (rank 0)
        result.json     StageResult     the final outcome (also each call's return value)
        launch.json     LaunchIntent    a launch's intent, written before spawning (runtime.modal.launches)
        attempts.jsonl  Attempt         one line per container attempt
    Modal volume stamps (written by one apply, read by the next)
        <stage run>/merged.json              MergeStamp     what finalize merged, and its outputs
        {datasets,models}/.<name>.prepared.json  PreparedStamp  what prepare materialised
    Local runs (<state dir>/logs/ and the stage's run directory)
        <log>.plan.json   RunPlan        what the detached wrapper (`python -m runtime.processes`) runs
        <log>.exit.json   ExitRecord     how the wrapper's commands ended
        merged.json       MergeRecord    what finalize merged, and the tool-call check's result
        sandbox.json      SandboxRecord  the local sandbox server this state directory started
        image.json        EnvironmentRecord  the Python environment a local `image` node recorded
        .<name>.prepared.json  PreparedDir  what a local dataset or model directory was prepared from
    Ray runs (the stage's run directory and `<ray.storage>/.retool-sandbox/` in the cluster's storage)
        ray/<submission id>.plan.json   RunPlan     what the job's entrypoint (`python -m runtime.ray.job`) runs
        ray/<submission id>.exit.json   ExitRecord  how its commands ended
        ray/<submission id>.nodes.json  MultiNodePlan  a multi-node SFT job's plan (`python -m runtime.ray.multinode`)
        ray/<submission id>.ranks.json  RayRanks    where each of its node ranks ran and how it ended
        ray/<submission id>.liveness.json  RayLiveness  every rank as rank 0 sees it while they train
        <submission id>.json            RaySandbox  where the sandbox job serves (written by the job)
    Eval runs (the stage's run directory; models in runtime.eval.job, built on `Record`)
        job.json          EvalJob        written by the backend, read by `python -m runtime.eval.run`
        progress.json     Progress       written by the runner, read by checkpoint discovery and finalize
        results.json      Results        written by the runner at the end, read by finalize

(The local `active_run.json` is the engine's own `RunHandle`, one model on both sides too.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reconciler.errors import TerminalError
from runtime.atomic import write_text_atomic

R = TypeVar("R", bound="Record")


class RecordError(TerminalError):
    """A record file that does not match its model (wrong type, or a newer version)."""


class Record(BaseModel):
    """Base of every cross-process file: frozen, strict types, unknown keys ignored."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    VERSION: ClassVar[int] = 1  # raise it when a field changes meaning; add fields with defaults
    version: int = 1  # a file without one predates versioning; `dumps` writes VERSION

    @model_validator(mode="after")
    def _known_version(self) -> Record:
        if self.version > self.VERSION:
            raise ValueError(
                f"version {self.version} was written by a newer retool (this one reads up to {self.VERSION})"
            )
        return self


def parse(model: type[R], data: str | bytes | dict[str, Any], *, source: str) -> R:
    """`data` (JSON text, or an already decoded object) as `model`; RecordError names
    `source` and each bad field."""
    try:
        if isinstance(data, dict):
            return model.model_validate(data)
        return model.model_validate_json(data)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in exc.errors()
        )
        raise RecordError(
            f"{source} is not a valid {model.__name__} record", fields,
            "it was written by another retool version or changed by hand; move it aside to start over",
        ) from exc


def load(model: type[R], path: Path) -> R | None:
    """The record at `path`, or None when there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse(model, text, source=str(path))


def dumps(record: Record) -> bytes:
    """The record as written, stamped with this retool's version of its model."""
    stamped = record.model_copy(update={"version": record.VERSION})
    return (stamped.model_dump_json(indent=2) + "\n").encode()


def save(path: Path, record: Record) -> None:
    """Write atomically (runtime.atomic): a reader sees the old record or the new one."""
    write_text_atomic(path, dumps(record).decode())


def append_line(path: Path, record: Record) -> None:
    """One more line of a JSON-lines log of records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(record.model_copy(update={"version": record.VERSION}).model_dump_json() + "\n")


# --------------------------------------------------------------------------- Modal stage runs


class StageRun(Record):
    """`_retool/run.json`: the call running the stage now. Written by the CLI when it
    launches segment 0 and by each container that hands over to the next segment."""

    call_id: str  # the call of `segment`
    segment: int = 0
    app_name: str
    function: str
    launched_at: float
    head_call_id: str | None = None  # segment 0's call (the chain starts there)
    launch_id: str | None = None  # the launch key's id (runtime.modal.launches)
    previous_call_id: str | None = None  # the segment that handed over, if any


class RankLiveness(Record):
    state: Literal["alive", "lost", "missing"]
    seen_at: float | None = None


class StageProgress(Record):
    """`_retool/progress.json`, written by rank 0 while it trains (and at every commit)."""

    step: int | None = None
    total: int | None = None
    segment: int = 0
    attempt_started_at: float | None = None
    updated_at: float | None = None
    active_before: float = 0.0  # container seconds of earlier attempts and segments
    active_s: float = 0.0  # the same plus this attempt so far
    metrics: dict[str, float] = Field(default_factory=dict)
    log_tail: list[str] = Field(default_factory=list)
    ranks: dict[str, RankLiveness] | None = None  # multi-node: every rank as rank 0 sees it


class StageResult(Record):
    """What a stage call returns, and `_retool/result.json` once the run ended there."""

    outcome: Literal["finished", "continued", "failed"]
    step: int | None = None
    segment: int = 0
    next_call_id: str | None = None
    active_s: float = 0.0  # container seconds of every attempt of every segment so far
    message: str = ""
    finished_at: float | None = None  # set in result.json


class LaunchIntent(Record):
    """`_retool/launch.json`: written before spawning, so a lost spawn answer is noticed."""

    launch_id: str
    function: str
    at: float


class Attempt(Record):
    """One line of `_retool/attempts.jsonl`."""

    segment: int
    started_at: float
    call_id: str | None = None


class MergeStamp(Record):
    """`<stage run>/merged.json` on a Modal volume: what finalize merged and what it returned."""

    step: int
    checkpoint: str
    tool_call_check: dict[str, Any] | None = None  # the spec's ToolCallCheck, when the stage has one
    outputs: dict[str, Any] = Field(default_factory=dict)


class PreparedStamp(Record):
    """`{datasets,models}/.<name>.prepared.json` on a Modal volume."""

    config: str  # short hash of the section and its uploaded source
    outputs: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- local runs


class PlannedCommand(Record):
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None


class RunPlan(Record):
    """What the detached wrapper runs: commands in order, stopping at the first failure."""

    commands: list[PlannedCommand]
    exit_path: str


class ExitRecord(Record):
    returncode: int
    signal: str | None = None  # the signal that stopped the run (SIGTERM on cancel)
    failed_command: int | None = None  # index of the command that failed
    started_at: float | None = None
    finished_at: float = Field(default_factory=time.time)
    cancelled: bool = False


class MergeRecord(Record):
    """A local stage's `merged.json`."""

    step: int
    checkpoint: str
    tool_check: dict[str, Any] | None = None  # ToolCheckResult fields + "prompts"


class SandboxRecord(Record):
    """`<state dir>/sandbox.json`: the local sandbox server an apply started."""

    pid: int
    url: str
    start_ticks: int | None = None
    config_hash: str
    log_path: str


class RaySandbox(Record):
    """`<ray.storage>/.retool-sandbox/<spec>/<submission id>.json`: where the sandbox job
    (runtime.ray.sandbox_job) serves, written once it answers."""

    submission_id: str
    url: str
    node_ip: str
    pid: int


class MultiNodePlan(Record):
    """`ray/<submission id>.nodes.json`: a multi-node stage job's plan (runtime.ray.multinode):
    the run's commands on every node of one STRICT_SPREAD placement group."""

    run: RunPlan
    nodes: int
    bundle: dict[str, float]  # one node's reservation: CPU, GPU, memory, accelerator_type:<gpu>
    run_tag: str  # the run directory's tag; rank r's processes carry `<run_tag>-rank<r>`
    cluster_id: str  # the submission id: a rank of another attempt is refused at the rendezvous
    ranks_path: str
    liveness_path: str = ""  # where rank 0 keeps every rank's liveness while they train (RayLiveness)
    placement_timeout_s: float = 600.0
    join_timeout_s: float = 300.0


class RankRecord(Record):
    rank: int
    node_id: str
    ip: str
    argv: list[str] = Field(default_factory=list)  # this node's command (torchrun with its --node_rank)
    returncode: int | None = None  # None: the rank never ran (its actor died)
    message: str = ""


class RayLiveness(Record):
    """`ray/<submission id>.liveness.json`: every rank as rank 0 sees it, while they train
    (for `retool status`; rank 0 is its only writer)."""

    ranks: dict[str, RankLiveness]
    updated_at: float


class RayRanks(Record):
    """`ray/<submission id>.ranks.json`: where each node rank of a multi-node job ran."""

    submission_id: str
    placement_group: str
    ranks: list[RankRecord]


class EnvironmentRecord(Record):
    """`<state dir>/image.json`: the interpreter and key packages a local `image` stands for."""

    python: str
    executable: str
    packages: dict[str, str] = Field(default_factory=dict)
    device: str
    digest: str  # short hash of the fields above


class PreparedDir(Record):
    """`.<name>.prepared.json` beside a local dataset or model directory."""

    config: str  # short hash of the restart fields and the `path:` source files
    digest: str | None = None  # the directory's digest when it was prepared
