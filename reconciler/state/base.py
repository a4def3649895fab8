"""State records and the store interface (docs/state.md, "Stores").

State is versioned JSON read leniently (unknown keys ignored, missing keys defaulted),
never pickled. A store has four operations: `read`, `write`, `lock(info) -> id`,
`unlock(id)`; every store passes the same contract tests (tests/reconciler/state/test_state_contract.py).
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time
import uuid
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

# Re-exported: state records hold a RunHandle.
from reconciler.state.run_handle import LocalRun as LocalRun
from reconciler.state.run_handle import ModalRun as ModalRun
from reconciler.state.run_handle import OpaqueRun as OpaqueRun
from reconciler.state.run_handle import RunHandle as RunHandle
from reconciler.state.run_handle import WandbRun as WandbRun

STATE_VERSION = 1

NodeStatus = Literal["pending", "running", "succeeded", "failed", "lost", "cancelled"]


class Lenient(BaseModel):
    """State is read leniently: newer writers may add keys older readers ignore."""

    model_config = ConfigDict(extra="ignore")


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
    gpu_seconds: float = 0.0
    cost_usd: float = 0.0
    message: str = ""
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None


class State(Lenient):
    version: int = STATE_VERSION
    serial: int = 0
    lineage: str = Field(default_factory=lambda: str(uuid.uuid4()))
    spec_name: str = ""
    nodes: dict[str, NodeRecord] = Field(default_factory=dict)


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
