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

The lease itself (put-if-absent, takeover claims, renewal) is reconciler.state.lease_lock's,
shared with the Ray store; here it runs on the Dict. Writes keep every store's rules
(reconciler.state.base: serial must grow, lineage must match): with the lock they make a
lost update impossible; without it (a holder whose lock expired or was force-unlocked while
it still ran) the serial check still refuses the older writer. Both files go up in one batch
upload, so a reader sees the old or the new pair.

Without credentials or an answer every call raises (TerminalError / ModalUnreachable);
`reconciler.state.cache` then lets plan and status fall back to the last local copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from reconciler.spec import Spec
from reconciler.state.base import BACKUP_SUFFIX, STATE_FILE, State, check_successor, parse_state
from reconciler.state.lease_lock import DEFAULT_LOCK_TTL_S, LeasedStore, LeaseLock


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


class _DictKeys:
    """lease_lock.KeyValue on one Modal Dict."""

    def __init__(self, adapter: VolumeAndDict, name: str, env: str | None) -> None:
        self.adapter, self.name, self.env = adapter, name, env

    def put(self, key: str, value: str, *, if_absent: bool = False) -> bool:
        return self.adapter.dict_put(self.name, key, value, skip_if_exists=if_absent, env=self.env)

    def get(self, key: str) -> str | None:
        return self.adapter.dict_get(self.name, key, env=self.env)

    def pop(self, key: str) -> str | None:
        return self.adapter.dict_pop(self.name, key, env=self.env)


class ModalStore(LeasedStore):
    """State on a Modal Volume; the lock is a lease in a Modal Dict (LeasedStore)."""

    def __init__(
        self, volume: str, lock_dict: str, key: str, *, adapter: VolumeAndDict,
        environment: str | None = None, lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.adapter, self.volume, self.lock_dict, self.key = adapter, volume, lock_dict, key
        self.env, self.lock_ttl_s, self.clock = environment, lock_ttl_s, clock
        self.path = f"{key}/{STATE_FILE}"
        self.backup_path = self.path + BACKUP_SUFFIX
        self.lease = LeaseLock(
            _DictKeys(adapter, lock_dict, environment), key, f"Modal dict {lock_dict}[{key}]", ttl_s=lock_ttl_s,
            clock=clock,
        )
        self.heartbeat_s: float | None = self.lease.heartbeat_s
        self.taken_over = None

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
        self.lease.extend()
