"""Checkpoint discovery and validity, as pure functions over a directory listing.

The listing is rooted at a stage's folder on its volume, `<volume>/<stage>/`:

    <restart_id[:16]>/retool.json                        marker written at launch (full restart id)
    <restart_id[:16]>/latest_checkpointed_iteration.txt  verl's tracker (rank 0 writes it last, atomically)
    <restart_id[:16]>/global_step_N/model_world_size_W_rank_R.pt   (SFT)
    <restart_id[:16]>/global_step_N/actor/model_world_size_W_rank_R.pt   (RL)
    <restart_id[:16]>/global_step_N/retool_complete.json   completion marker, written last

A checkpoint is valid when it was written under the current restart identity, every rank
R < W has its model shard (and its optimizer / extra-state shard when any rank has one),
no shard is empty, W matches the stage's world size, verl's tracker has reached N (verl
updates the tracker only after a checkpoint is complete, so a step beyond it is still
being written or was interrupted), and its completion marker names step N, world size W
and the current restart identity. Checkpoints under other restart identities are reported
as foreign and never resumed from.

The completion marker (runtime.verl.save_marker, inside verl's own processes) is removed
before the first shard of a save is written and written after the last shard of every
rank, so a save of `global_step_N` over an older copy that dies between shards (old and new
shards mixed, every file present) is never taken for complete. A checkpoint without a
marker — interrupted, or saved by a retool before markers existed — is invalid with that
reason: resuming from a checkpoint that cannot be shown whole is the one thing never done.

`scan_local(root)` builds the listing from a local directory; the Modal backend builds
the same `CkptEntry` list from `Volume.listdir`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict

from reconciler.backend import Checkpoint, latest_resumable
from runtime.verl.common import TRACKER_FILE
from runtime.atomic import write_text_atomic

MARKER_FILE = "retool.json"
COMPLETE_FILE = "retool_complete.json"  # in global_step_N/: this save finished on every rank
# Writes COMPLETE_FILE inside verl's processes; every SFT and RL launch lists it in VERL_USE_EXTERNAL_MODULES.
SAVE_MARKER_MODULE = "runtime.verl.save_marker"
STEP_DIR = re.compile(r"^global_step_(\d+)$")
SHARD = re.compile(r"^(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt$")
# Contents worth reading during a scan (tiny text files).
TEXT_FILES = (TRACKER_FILE, MARKER_FILE)
# Subtrees whose contents never matter for validity.
SKIP_DIRS = ("huggingface", "merged")


class CkptEntry(BaseModel):
    """One file or folder under a stage's root. `content` is filled for the tracker and
    marker files only."""

    model_config = ConfigDict(frozen=True)

    path: str  # relative, '/'-separated: "<restart dir>/global_step_3/model_world_size_1_rank_0.pt"
    is_dir: bool = False
    size: int | None = None
    content: str | None = None


@dataclass
class StepFiles:
    step: int
    restart_dir: str
    step_dir: str  # relative path of global_step_N
    shards: dict[str, dict[int, int | None]] = field(default_factory=dict)  # kind -> rank -> size
    world_sizes: set[int] = field(default_factory=set)
    complete: str | None = None  # the completion marker's content, None when absent


def restart_dir_name(restart_id: str) -> str:
    return restart_id[:16]


def marker_content(restart_id: str, stage: str, world_size: int) -> str:
    return json.dumps({"restart_id": restart_id, "stage": stage, "world_size": world_size}, sort_keys=True)


class SaveComplete(BaseModel):
    """The completion marker of one save: which step, by how many ranks, under which
    restart identity (copied from the run directory's `retool.json`)."""

    model_config = ConfigDict(extra="ignore")

    step: int
    world_size: int
    restart_id: str
    written_at: float = 0.0


def wants_content(rel_path: str) -> bool:
    """Whether a scan must read this file (relative to the stage's folder): the tracker and
    restart marker of a restart directory, and each step's completion marker."""
    parts = PurePosixPath(rel_path).parts
    if len(parts) == 2:
        return parts[1] in TEXT_FILES
    return len(parts) == 3 and parts[2] == COMPLETE_FILE and STEP_DIR.match(parts[1]) is not None


def write_complete(step_dir: str | os.PathLike[str], step: int, world_size: int, restart_id: str, *, now: float) -> None:
    """Mark `step_dir` complete (atomically: temp file, fsync, rename)."""
    body = SaveComplete(step=step, world_size=world_size, restart_id=restart_id, written_at=now).model_dump_json()
    write_text_atomic(Path(step_dir) / COMPLETE_FILE, body + "\n")


def clear_complete(step_dir: str | os.PathLike[str]) -> None:
    """Before a save writes anything into `step_dir`: it is not complete until marked again."""
    try:
        os.unlink(Path(step_dir) / COMPLETE_FILE)
    except FileNotFoundError:
        pass


def restart_id_of(run_dir: str | os.PathLike[str]) -> str:
    """The full restart identity recorded in a run directory's `retool.json` ("" if none)."""
    try:
        return _marker_restart_id(Path(run_dir, MARKER_FILE).read_text(encoding="utf-8")) or ""
    except OSError:
        return ""


def _marker_restart_id(content: str | None) -> str | None:
    if not content:
        return None
    try:
        value = json.loads(content).get("restart_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _tracker_step(content: str | None) -> int | None:
    try:
        return int((content or "").strip())
    except ValueError:
        return None


def _collect(entries: list[CkptEntry]) -> tuple[dict[tuple[str, int], StepFiles], dict[str, str | None], dict[str, str | None]]:
    """Group shard files per (restart dir, step); read trackers and markers per restart dir."""
    steps: dict[tuple[str, int], StepFiles] = {}
    trackers: dict[str, str | None] = {}
    markers: dict[str, str | None] = {}
    for e in entries:
        parts = PurePosixPath(e.path).parts
        if len(parts) < 2:
            continue
        rdir = parts[0]
        if len(parts) == 2 and parts[1] == TRACKER_FILE:
            trackers[rdir] = e.content
            continue
        if len(parts) == 2 and parts[1] == MARKER_FILE:
            markers[rdir] = e.content
            continue
        m = STEP_DIR.match(parts[1])
        if not m:
            continue
        step = int(m.group(1))
        sf = steps.setdefault((rdir, step), StepFiles(step=step, restart_dir=rdir, step_dir=f"{rdir}/{parts[1]}"))
        rest = parts[2:]
        if rest == (COMPLETE_FILE,) and not e.is_dir:
            sf.complete = e.content if e.content is not None else ""
            continue
        if rest and rest[0] == "actor":  # RL: the actor's shards live one level down
            rest = rest[1:]
        if len(rest) != 1 or e.is_dir:
            continue
        s = SHARD.match(rest[0])
        if s:
            kind, w, r = s.group(1), int(s.group(2)), int(s.group(3))
            sf.shards.setdefault(kind, {})[r] = e.size
            sf.world_sizes.add(w)
    return steps, trackers, markers


def _problem(sf: StepFiles, world_size: int, tracker: int | None, restart_id: str = "") -> str:
    """Why a checkpoint is incomplete, or "" when it is complete."""
    if not sf.world_sizes or "model" not in sf.shards:
        return "no model shards"
    if len(sf.world_sizes) > 1:
        return f"shards of several world sizes {sorted(sf.world_sizes)}"
    w = next(iter(sf.world_sizes))
    if w != world_size:
        return f"written by {w} processes, the stage runs {world_size}"
    for kind in ("model", "optim", "extra_state"):
        ranks = sf.shards.get(kind)
        if ranks is None:
            continue  # not saved at all (checkpoint.save_contents); model is checked above
        missing = [r for r in range(w) if r not in ranks]
        if missing:
            return f"missing {kind} shard rank {missing[0]} of {w}"
        empty = [r for r, size in ranks.items() if size == 0]
        if empty:
            return f"empty {kind} shard rank {empty[0]}"
    if tracker is None:
        return f"{TRACKER_FILE} missing: the save never completed"
    if sf.step > tracker:
        return f"newer than {TRACKER_FILE} (step {tracker}): still being written or interrupted"
    return _completion_problem(sf, w, restart_id)


def _completion_problem(sf: StepFiles, world_size: int, restart_id: str) -> str:
    if sf.complete is None:
        return (
            f"no completion marker ({COMPLETE_FILE}): its save was interrupted, or it was written by a "
            "retool without completion markers"
        )
    try:
        done = SaveComplete.model_validate_json(sf.complete)
    except ValueError:
        return f"unreadable completion marker ({COMPLETE_FILE})"
    if done.step != sf.step:
        return f"completion marker is for step {done.step}"
    if done.world_size != world_size:
        return f"completion marker says {done.world_size} ranks wrote it, the shards say {world_size}"
    if restart_id and done.restart_id != restart_id:
        return f"completion marker is from another restart identity ({done.restart_id[:16] or 'none'})"
    return ""


def evaluate(entries: list[CkptEntry], world_size: int, restart_id: str, *, root: str = "") -> list[Checkpoint]:
    """Every checkpoint in the listing with its validity, current restart identity first
    (by step), then foreign ones. `root` is joined to paths in the result."""
    steps, trackers, markers = _collect(entries)
    current = restart_dir_name(restart_id)
    marked = _marker_restart_id(markers.get(current))
    out: list[Checkpoint] = []
    for (rdir, step), sf in sorted(steps.items(), key=lambda kv: (kv[0][0] != current, kv[0][0], kv[0][1])):
        path = str(PurePosixPath(root) / sf.step_dir) if root else sf.step_dir
        ws = next(iter(sf.world_sizes)) if len(sf.world_sizes) == 1 else None
        if rdir != current or (marked is not None and marked != restart_id):
            owner = _marker_restart_id(markers.get(rdir)) or rdir
            out.append(Checkpoint(
                step=step, path=path, valid=False, world_size=ws, restart_id=owner,
                reason=f"written under another restart identity ({owner[:16]})",
            ))
            continue
        reason = _problem(sf, world_size, _tracker_step(trackers.get(rdir)), restart_id)
        out.append(Checkpoint(
            step=step, path=path, valid=not reason, reason=reason, world_size=ws, restart_id=restart_id,
        ))
    return out


def latest_valid(checkpoints: list[Checkpoint], restart_id: str) -> Checkpoint | None:
    """The newest checkpoint a run of `restart_id` may resume from (the contract's one rule)."""
    return latest_resumable(checkpoints, restart_id)


def scan_local(root: Path) -> list[CkptEntry]:
    """The listing of a stage's folder on a local volume (four levels deep, shard folders only)."""
    entries: list[CkptEntry] = []
    if not root.is_dir():
        return entries
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        depth = len(rel.parts)
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and depth < 3]
        for d in dirnames:
            entries.append(CkptEntry(path=(rel / d).as_posix(), is_dir=True))
        for f in filenames:
            p = Path(dirpath) / f
            try:
                size = p.stat().st_size
            except OSError:
                continue  # pruned while we looked
            content = None
            if wants_content((rel / f).as_posix()):
                try:
                    content = p.read_text(errors="replace")[:4096]
                except OSError:
                    content = None
            entries.append(CkptEntry(path=(rel / f).as_posix(), size=size, content=content))
    return entries
