"""State records, the store interface and the rules every store shares (docs/state.md, "Stores").

State is versioned JSON read leniently (unknown keys ignored, missing keys defaulted),
never pickled. A store has four operations: `read`, `write`, `lock(info) -> id`,
`unlock(id)`; every store passes the same contract tests (tests/reconciler/state/test_state_contract.py).
The store-independent rules live here, beside the records they judge: a write must succeed
the stored state (`check_successor`), state text is parsed one way (`parse_state`), and a
refused lock is explained one way (`locked_error`, `stale_reason`).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reconciler.errors import StateLockedError, TerminalError

# Re-exported: state records hold a RunHandle.
from reconciler.state.run_handle import LocalRun as LocalRun
from reconciler.state.run_handle import ModalRun as ModalRun
from reconciler.state.run_handle import OpaqueRun as OpaqueRun
from reconciler.state.run_handle import RayRun as RayRun
from reconciler.state.run_handle import RunHandle as RunHandle
from reconciler.state.run_handle import WandbRun as WandbRun

STATE_VERSION = 1
STATE_FILE = "state.json"
BACKUP_SUFFIX = ".backup"  # the state before the last write, beside it

NodeStatus = Literal["pending", "running", "succeeded", "failed", "lost", "cancelled"]


class Lenient(BaseModel):
    """State is read leniently: newer writers may add keys older readers ignore."""

    model_config = ConfigDict(extra="ignore", defer_build=True)


class NodeRecord(Lenient):
    """What the last successful (or current) run of one node left behind."""

    address: str
    kind: str
    status: NodeStatus = "pending"
    config: dict[str, Any] = Field(default_factory=dict)  # effective config it ran with (for diffs)
    restart_id: str = ""
    resume_hash: str = ""
    update_hash: str = ""
    inputs: dict[str, str] = Field(default_factory=dict)  # upstream address -> output identity consumed
    outputs: dict[str, Any] = Field(default_factory=dict)  # paths, digests, final_step, merged model, url
    output_id: str | None = None
    run: RunHandle | None = None
    steps_done: int = 0
    total_steps: int | None = None
    seconds_per_step: float | None = None
    gpu_seconds: float = 0.0  # of the current restart identity (a rerun starts again at 0)
    cost_usd: float = 0.0
    # Everything this node ever ran, reruns included: what the budget counts as spent.
    spent_gpu_seconds: float = 0.0
    spent_usd: float = 0.0
    message: str = ""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None


class CostApproval(Lenient):
    """An over-budget plan someone approved (`retool apply --approve-cost`): the amount it
    showed, and the projected totals it accepted per budget scope (`spec`, `stage.<name>`),
    which later plans may reach without asking again (docs/budget.md)."""

    usd: float
    projected_usd: dict[str, float] = Field(default_factory=dict)
    projected_gpu_hours: dict[str, float] = Field(default_factory=dict)
    unpriced: list[str] = Field(default_factory=list)  # stages approved without a cost estimate
    by: str = ""
    at: float = Field(default_factory=time.time)


class State(Lenient):
    version: int = STATE_VERSION
    serial: int = 0
    lineage: str = Field(default_factory=lambda: str(uuid.uuid4()))
    spec_name: str = ""
    nodes: dict[str, NodeRecord] = Field(default_factory=dict)
    cost_approvals: list[CostApproval] = Field(default_factory=list)  # newest last


class LockInfo(Lenient):
    """Who holds the apply lock, printed to whoever is refused."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    who: str = Field(default_factory=lambda: f"{getpass.getuser()}@{socket.gethostname()}")
    user: str = Field(default_factory=getpass.getuser)
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    command: str = Field(default_factory=lambda: " ".join(["retool", *sys.argv[1:]]))
    created_at: float = Field(default_factory=time.time)
    expires_at: float | None = None  # shared stores: a lock past this is free (its heartbeat stopped)


class Takeover(Lenient):
    """A lock whose holder is provably gone (the OS released a dead process's lock, or a
    shared lock's heartbeat stopped and it expired), taken by the next apply: it says so."""

    previous: LockInfo
    why: str  # "died" or "expired 3m ago"

    @property
    def note(self) -> str:
        p = self.previous
        who = f"pid {p.pid}" if p.pid else "unknown pid"
        where = f" on {p.host}" if p.host and p.host != socket.gethostname() else ""
        return f"previous apply ({who}{where}, `{p.command}`) {self.why}; continuing"


class StateStore(Protocol):
    """Where state lives. `write` refuses a state whose serial is not newer, or whose
    lineage differs from the stored one (a different pipeline's state).

    The lock: `lock(info) -> id` takes it or raises StateLockedError naming a live holder;
    when it took over the lock of a holder that is gone it sets `taken_over`. A store whose
    lock expires (`heartbeat_s` not None) needs `renew(id)` at least that often while held
    (reconciler/state/lease.py does it from a thread); `unlock(id)` releases it."""

    heartbeat_s: float | None
    taken_over: Takeover | None

    def describe(self) -> str: ...

    def read(self) -> State | None: ...

    def write(self, state: State) -> None: ...

    def lock(self, info: LockInfo) -> str: ...

    def unlock(self, lock_id: str) -> None: ...

    def renew(self, lock_id: str) -> None: ...

    def lock_info(self) -> LockInfo | None: ...


# --------------------------------------------------------------------------- shared rules
# Every store applies the same write and lock rules (Terraform keeps these in `statemgr`):
# a store supplies the bytes and the lock primitive, these decide what is allowed and what
# the user is told.


def check_successor(stored: State | None, new: State, where: str) -> None:
    """Refuse a write that would go backwards or mix two pipelines' states."""
    if stored is None:
        return
    if new.lineage != stored.lineage:
        raise TerminalError(
            f"State lineage mismatch in {where}",
            f"the stored state has lineage {stored.lineage}, the one being written has {new.lineage}: "
            "they belong to different pipelines.",
            "point `state.path` (or `state.key`) at the right store, or remove the old state deliberately",
        )
    if new.serial <= stored.serial:
        raise TerminalError(
            f"Refusing to write state serial {new.serial} over serial {stored.serial} in {where}",
            "another apply wrote a newer state since this one read it.",
            "run `retool plan` again",
        )


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 90 * 60:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def stale_reason(info: LockInfo, *, now: float | None = None, host: str | None = None) -> str | None:
    """Why a held lock is stale (its holder cannot still be running), or None if it may be live.

    Only provable staleness counts: same host and the pid is gone, or a shared store's
    expiry passed. A lock from another host is never judged from here."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    if info.expires_at is not None and now > info.expires_at:
        return f"stale lock held by {info.who} expired {format_age(now - info.expires_at)} ago"
    if info.host == host and not pid_alive(info.pid):
        return f"stale lock held by dead pid {info.pid} on {info.host}"
    return None


def locked_error(
    info: LockInfo, where: str, *, now: float | None = None, host: str | None = None, os_lock: bool = False
) -> StateLockedError:
    """The error shown to whoever is refused the lock: holder, command, age; stale ones say so.

    `os_lock`: the kernel says a live process holds it (the local store), so there is
    nothing stale to judge and nothing `retool state unlock` could clear."""
    now = time.time() if now is None else now
    age = format_age(now - info.created_at)
    stale = None if os_lock else stale_reason(info, now=now, host=host)
    detail = f"lock {info.id} in {where}: {info.who} (pid {info.pid}) running `{info.command}`, held for {age}"
    if os_lock:
        err = StateLockedError(
            f"State is locked by {info.who} (pid {info.pid}) running `{info.command}` for {age}",
            detail,
            "wait for it to finish; the lock frees itself when that process exits"
            + (f" (stop it with `kill {info.pid}` on {info.host} if it hangs)" if info.pid else ""),
        )
    elif stale:
        err = StateLockedError(
            f"State is locked by a {stale}",
            detail,
            f"the holder is gone; run `retool state unlock {info.id}`",
        )
    else:
        err = StateLockedError(
            f"State is locked by {info.who} running `{info.command}` for {age}",
            detail,
            f"wait for it to finish; if you are sure it is gone, run `retool state unlock {info.id}`",
        )
    err.lock = info  # type: ignore[attr-defined]  # for callers that want the structured holder
    return err


def parse_state(text: str, where: str) -> State:
    """Read state leniently; a file that is not state at all is a clear error, not a crash."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        return State.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise TerminalError(
            f"State in {where} is not readable",
            str(exc).splitlines()[0],
            f"restore it from {STATE_FILE}{BACKUP_SUFFIX} beside it, or move it away to start afresh",
        ) from exc


def not_locked_error(where: str) -> TerminalError:
    """`unlock` of a lock nobody holds."""
    return TerminalError("State is not locked", where, "nothing to unlock")


def lock_mismatch_error(lock_id: str, holder: LockInfo) -> TerminalError:
    """`unlock ID` where ID is not the held lock's: name the real holder, never clear it."""
    return TerminalError(
        f"Lock ID {lock_id} does not match the held lock {holder.id}",
        f"the lock is held by {holder.who} (pid {holder.pid}) running `{holder.command}`",
        f"to clear it, run `retool state unlock {holder.id}`",
    )

