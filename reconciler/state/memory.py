"""An in-memory state store with the local store's rules, for tests (Terraform's `NewFullFake`).

It keeps every written state in `history`, so tests can check that state was written
after each transition, and copies on the way in and out, so a caller mutating its own
`State` never changes what the store holds.
"""

from __future__ import annotations

from reconciler.errors import TerminalError
from reconciler.state.base import LockInfo, State
from reconciler.state.local import check_successor, locked_error


class MemoryStore:
    def __init__(self, initial: State | None = None) -> None:
        self._state: State | None = initial.model_copy(deep=True) if initial is not None else None
        self._lock: LockInfo | None = None
        self.history: list[State] = []

    def describe(self) -> str:
        return "in-memory state"

    def read(self) -> State | None:
        return self._state.model_copy(deep=True) if self._state is not None else None

    def write(self, state: State) -> None:
        check_successor(self._state, state, self.describe())
        self._state = state.model_copy(deep=True)
        self.history.append(self._state.model_copy(deep=True))

    def lock(self, info: LockInfo) -> str:
        if self._lock is not None:
            raise locked_error(self._lock, self.describe())
        self._lock = info.model_copy()
        return info.id

    def unlock(self, lock_id: str) -> None:
        if self._lock is None:
            raise TerminalError("State is not locked", self.describe(), "nothing to unlock")
        if self._lock.id != lock_id:
            raise TerminalError(
                f"Lock ID {lock_id} does not match the held lock {self._lock.id}",
                f"the lock is held by {self._lock.who} running `{self._lock.command}`",
                f"to clear it, run `retool state unlock {self._lock.id}`",
            )
        self._lock = None

    def lock_info(self) -> LockInfo | None:
        return self._lock.model_copy() if self._lock is not None else None
