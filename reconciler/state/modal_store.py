"""The shared state store: the state file on a Modal Volume, the apply lock in a Modal Dict.

For teams and CI (spec `state: {store: modal}`): laptops and GitHub Actions read and write
the same state. Layout::

    Volume <state.volume>:  <key>/state.json          the current state
                            <key>/state.json.backup   the state before the last write
    Dict   <state.lock_dict>:  <key> -> LockInfo JSON  present while an apply holds the lock

The state lives on a Volume because Volumes are durable; a Dict entry expires after 7 idle
days, which is fine for a lock and never for state (docs/modal.md, "Dicts"). The lock is an atomic
put-if-absent (`skip_if_exists=True`) carrying an expiry (`lock_ttl_s`, default 5 min) that
its holder pushes forward from a heartbeat thread every `heartbeat_s` (a fifth of the TTL;
reconciler/state/lease.py) and on every state write. A holder that dies (a cancelled CI
runner, a closed laptop) stops renewing, so its lock expires within minutes and the next
apply takes it over with a note; `retool state unlock ID` clears it sooner. A live holder
is refused at once, named.

Taking over an expired lock is made safe without compare-and-swap: the claimant first puts
`<key>#takeover-<expired id>` with put-if-absent, so exactly one apply may remove that
expired lock (claims stay in the Dict and expire with its 7-day idle rule); it then pops the
entry (putting it back if it is no longer the expired one) and races for the key like any
first apply. Writes keep every store's rules (reconciler.state.base: serial must grow, lineage must match):
with the lock they make a lost update impossible; without it (a holder whose lock expired
or was force-unlocked while it still ran) the serial check still refuses the older writer.
Both files go up in one batch upload, so a reader sees the old or the new pair.

Without credentials or an answer every call raises (TerminalError / ModalUnreachable);
`reconciler.state.cache` then lets plan and status fall back to the last local copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from reconciler.errors import StateLockedError, TerminalError
from reconciler.spec import Spec
from reconciler.state.base import (
    BACKUP_SUFFIX,
    STATE_FILE,
    LockInfo,
    State,
    Takeover,
    check_successor,
    format_age,
    lock_mismatch_error,
    locked_error,
    not_locked_error,
    parse_state,
)

DEFAULT_LOCK_TTL_S = 300.0  # a dead holder's lock frees itself this long after its last heartbeat
TAKEOVER_SUFFIX = "#takeover-"


class VolumeAndDict(Protocol):
    """What the store needs of Modal, handed in by whoever builds it (reconciler.backends
    gives it runtime.modal.adapter's SDK adapter; tests give the fake of that adapter)."""

    def create_volume(self, name: str, *, env: str | None = None) -> bool: ...

    def read_file(self, volume: str, path: str, *, env: str | None = None) -> bytes: ...

    def put_files(self, volume: str, files: dict[str, bytes | Path], *, env: str | None = None) -> None: ...

    def dict_put(self, name: str, key: str, value: str, *, skip_if_exists: bool = False,
                 env: str | None = None) -> bool: ...

    def dict_get(self, name: str, key: str, *, env: str | None = None) -> str | None: ...

    def dict_pop(self, name: str, key: str, *, env: str | None = None) -> str | None: ...


class ModalStore:
    def __init__(
        self, volume: str, lock_dict: str, key: str, *, adapter: VolumeAndDict,
        environment: str | None = None, lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.adapter, self.volume, self.lock_dict, self.key = adapter, volume, lock_dict, key
        self.env, self.lock_ttl_s, self.clock = environment, lock_ttl_s, clock
        self.heartbeat_s: float | None = lock_ttl_s / 5
        self.taken_over: Takeover | None = None
        self.path = f"{key}/{STATE_FILE}"
        self.backup_path = self.path + BACKUP_SUFFIX
        self._held: LockInfo | None = None

    @classmethod
    def from_spec(cls, spec: Spec, adapter: VolumeAndDict) -> ModalStore:
        st = spec.state
        return cls(st.volume, st.lock_dict, st.key or spec.name, adapter=adapter, environment=spec.modal.environment)

    def describe(self) -> str:
        return f"Modal volume {self.volume}:/{self.path}"

    # ----------------------------------------------------------------- read / write

    def _read_text(self) -> str | None:
        try:
            return self.adapter.read_file(self.volume, self.path, env=self.env).decode("utf-8")
        except FileNotFoundError:
            return None

    def read(self) -> State | None:
        text = self._read_text()
        return None if text is None else parse_state(text, self.describe())

    def write(self, state: State) -> None:
        old_text = self._read_text()
        stored = parse_state(old_text, self.describe()) if old_text is not None else None
        check_successor(stored, state, self.describe())
        if old_text is None:
            self.adapter.create_volume(self.volume, env=self.env)
        new_text = state.model_dump_json(indent=2) + "\n"
        files: dict[str, bytes | Path] = {self.path: new_text.encode()}
        if old_text is not None:
            files[self.backup_path] = old_text.encode()
        self.adapter.put_files(self.volume, files, env=self.env)
        self._extend_lock()

    # ----------------------------------------------------------------- lock

    def _where(self) -> str:
        return f"Modal dict {self.lock_dict}[{self.key}]"

    def lock(self, info: LockInfo) -> str:
        self.taken_over = None
        held = info if info.expires_at is not None else info.model_copy(
            update={"expires_at": self.clock() + self.lock_ttl_s}
        )
        for _ in range(3):
            if self.adapter.dict_put(self.lock_dict, self.key, held.model_dump_json(), skip_if_exists=True, env=self.env):
                self._held = held
                return info.id
            holder = self.lock_info()
            if holder is None:
                continue  # released between the put and the read: try again
            now = self.clock()
            if holder.expires_at is None or now <= holder.expires_at:
                raise locked_error(holder, self._where(), now=now)
            self._take_over(holder, info, now)
        raise TerminalError("Could not take the state lock", f"{self._where()} kept changing", "run the command again")

    def _take_over(self, expired: LockInfo, info: LockInfo, now: float) -> None:
        """Remove an expired lock; one claimant per expired lock (see the module docstring)."""
        claim = f"{self.key}{TAKEOVER_SUFFIX}{expired.id}"
        if not self.adapter.dict_put(self.lock_dict, claim, info.id, skip_if_exists=True, env=self.env):
            raise StateLockedError(
                f"State lock {expired.id} expired and another apply is taking it over",
                f"{self._where()}: the expired holder was {expired.who} running `{expired.command}`",
                "run `retool status` to see who holds it now",
            )
        popped = self.adapter.dict_pop(self.lock_dict, self.key, env=self.env)
        current = self._parse(popped) if popped is not None else None
        if current is not None and current.id != expired.id:
            # force-unlocked and re-taken since we looked: that lock is live, give it back
            self.adapter.dict_put(self.lock_dict, self.key, popped or "", skip_if_exists=True, env=self.env)
            raise locked_error(current, self._where(), now=now)
        assert expired.expires_at is not None
        self.taken_over = Takeover(
            previous=expired, why=f"stopped renewing its lock (expired {format_age(now - expired.expires_at)} ago)"
        )

    def renew(self, lock_id: str) -> None:
        """Push the held lock's expiry forward (the heartbeat). A lock that is no longer
        ours (force-unlocked, or expired and taken over) is left alone."""
        if self._held is None or self._held.id != lock_id:
            return
        holder = self.lock_info()
        if holder is None or holder.id != lock_id:
            return
        self._held = self._held.model_copy(update={"expires_at": self.clock() + self.lock_ttl_s})
        self.adapter.dict_put(self.lock_dict, self.key, self._held.model_dump_json(), env=self.env)

    def unlock(self, lock_id: str) -> None:
        holder = self.lock_info()
        where = f"Modal dict {self.lock_dict}[{self.key}]"
        if holder is None:
            raise not_locked_error(f"no lock in {where}")
        if holder.id != lock_id:
            raise lock_mismatch_error(lock_id, holder)
        self.adapter.dict_pop(self.lock_dict, self.key, env=self.env)
        if self._held is not None and self._held.id == lock_id:
            self._held = None

    def lock_info(self) -> LockInfo | None:
        text = self.adapter.dict_get(self.lock_dict, self.key, env=self.env)
        return None if text is None else self._parse(text)

    @staticmethod
    def _parse(text: str) -> LockInfo:
        try:
            return LockInfo.model_validate_json(text)
        except ValidationError:
            return LockInfo(id="damaged", who="unknown", user="unknown", host="unknown", pid=0,
                            command="(unreadable lock entry)", created_at=0.0)

    def _extend_lock(self) -> None:
        """Each state write also counts as a heartbeat."""
        if self._held is not None:
            self.renew(self._held.id)
