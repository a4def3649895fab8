"""The shared state store: the state file on a Modal Volume, the apply lock in a Modal Dict.

For teams and CI (spec `state: {store: modal}`): laptops and GitHub Actions read and write
the same state. Layout::

    Volume <state.volume>:  <key>/state.json          the current state
                            <key>/state.json.backup   the state before the last write
    Dict   <state.lock_dict>:  <key> -> LockInfo JSON  present while an apply holds the lock

The state lives on a Volume because Volumes are durable; a Dict entry expires after 7 idle
days, which is fine for a lock and never for state (MODAL.md). The lock is an atomic
put-if-absent (`skip_if_exists=True`); it carries an expiry (default 24 h, pushed forward
on every write by its holder) after which it is reported stale — and, as everywhere, never
stolen: `retool state unlock ID` clears it. Writes keep the local store's rules (serial
must grow, lineage must match): with the lock they make a lost update impossible; without
it (a force-unlocked holder still running) the serial check still refuses the older writer.
Both files go up in one batch upload, so a reader sees the old or the new pair.

Without credentials or an answer every call raises (TerminalError / ModalUnreachable);
`reconciler.state.cache` then lets plan and status fall back to the last local copy.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import ValidationError

from reconciler.errors import TerminalError
from reconciler.spec import Spec
from reconciler.state.base import LockInfo, State
from reconciler.state.local import BACKUP_SUFFIX, STATE_FILE, check_successor, locked_error, parse_state
from runtime.modal.adapter import ModalAdapter

DEFAULT_LOCK_TTL_S = 24 * 3600.0


class ModalStore:
    def __init__(
        self, volume: str, lock_dict: str, key: str, *, adapter: ModalAdapter | None = None,
        environment: str | None = None, lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
    ) -> None:
        if adapter is None:
            from runtime.modal.adapter import SdkAdapter

            adapter = SdkAdapter()
        self.adapter, self.volume, self.lock_dict, self.key = adapter, volume, lock_dict, key
        self.env, self.lock_ttl_s = environment, lock_ttl_s
        self.path = f"{key}/{STATE_FILE}"
        self.backup_path = self.path + BACKUP_SUFFIX
        self._held: LockInfo | None = None

    @classmethod
    def from_spec(cls, spec: Spec, adapter: ModalAdapter | None = None) -> ModalStore:
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

    def lock(self, info: LockInfo) -> str:
        held = info if info.expires_at is not None else info.model_copy(update={"expires_at": time.time() + self.lock_ttl_s})
        for _ in range(2):
            if self.adapter.dict_put(self.lock_dict, self.key, held.model_dump_json(), skip_if_exists=True, env=self.env):
                self._held = held
                return info.id
            holder = self.lock_info()
            if holder is not None:
                raise locked_error(holder, f"Modal dict {self.lock_dict}[{self.key}]")
            # released between the put and the read: try once more
        raise TerminalError("Could not take the state lock", f"Modal dict {self.lock_dict}[{self.key}] kept changing")

    def unlock(self, lock_id: str) -> None:
        holder = self.lock_info()
        where = f"Modal dict {self.lock_dict}[{self.key}]"
        if holder is None:
            raise TerminalError("State is not locked", f"no lock in {where}", "nothing to unlock")
        if holder.id != lock_id:
            raise TerminalError(
                f"Lock ID {lock_id} does not match the held lock {holder.id}",
                f"the lock is held by {holder.who} (pid {holder.pid}) running `{holder.command}`",
                f"to clear it, run `retool state unlock {holder.id}`",
            )
        self.adapter.dict_pop(self.lock_dict, self.key, env=self.env)
        if self._held is not None and self._held.id == lock_id:
            self._held = None

    def lock_info(self) -> LockInfo | None:
        text = self.adapter.dict_get(self.lock_dict, self.key, env=self.env)
        if text is None:
            return None
        try:
            return LockInfo.model_validate_json(text)
        except ValidationError:
            return LockInfo(id="damaged", who="unknown", user="unknown", host="unknown", pid=0,
                            command="(unreadable lock entry)", created_at=0.0)

    def _extend_lock(self) -> None:
        """A long apply keeps its lock fresh: each state write pushes the expiry forward."""
        if self._held is None:
            return
        holder = self.lock_info()
        if holder is None or holder.id != self._held.id:
            return  # force-unlocked or taken over: not ours to extend
        self._held = self._held.model_copy(update={"expires_at": time.time() + self.lock_ttl_s})
        self.adapter.dict_put(self.lock_dict, self.key, self._held.model_dump_json(), env=self.env)
