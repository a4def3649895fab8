"""An in-memory state store with the shared store's rules, for tests (Terraform's `NewFullFake`).

It keeps every written state in `history`, so tests can check that state was written
after each transition, and copies on the way in and out, so a caller mutating its own
`State` never changes what the store holds. Its lock behaves like the Modal store's: a
lock whose `expires_at` passed (its heartbeat stopped) is taken over with a note; a lock
without an expiry is held until unlocked.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from reconciler.state.base import (
    LockInfo,
    State,
    Takeover,
    check_successor,
    format_age,
    lock_mismatch_error,
    locked_error,
    not_locked_error,
)


class MemoryStore:
    def __init__(
        self, initial: State | None = None, *, lock_ttl_s: float | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._state: State | None = initial.model_copy(deep=True) if initial is not None else None
        self._lock: LockInfo | None = None
        self.history: list[State] = []
        self.lock_ttl_s, self.clock = lock_ttl_s, clock
        self.heartbeat_s: float | None = lock_ttl_s / 5 if lock_ttl_s else None
        self.taken_over: Takeover | None = None
        self.renewals = 0

    def describe(self) -> str:
        return "in-memory state"

    def read(self) -> State | None:
        return self._state.model_copy(deep=True) if self._state is not None else None

    def write(self, state: State) -> None:
        check_successor(self._state, state, self.describe())
        self._state = state.model_copy(deep=True)
        self.history.append(self._state.model_copy(deep=True))

    def lock(self, info: LockInfo) -> str:
        self.taken_over = None
        now = self.clock()
        if self._lock is not None:
            expires = self._lock.expires_at
            if expires is None or now <= expires:
                raise locked_error(self._lock, self.describe(), now=now)
            self.taken_over = Takeover(previous=self._lock, why=f"stopped renewing its lock (expired {format_age(now - expires)} ago)")
        if self.lock_ttl_s and info.expires_at is None:
            info = info.model_copy(update={"expires_at": now + self.lock_ttl_s})
        self._lock = info.model_copy()
        return info.id

    def renew(self, lock_id: str) -> None:
        if self._lock is not None and self._lock.id == lock_id and self.lock_ttl_s:
            self._lock = self._lock.model_copy(update={"expires_at": self.clock() + self.lock_ttl_s})
            self.renewals += 1

    def unlock(self, lock_id: str) -> None:
        if self._lock is None:
            raise not_locked_error(self.describe())
        if self._lock.id != lock_id:
            raise lock_mismatch_error(lock_id, self._lock)
        self._lock = None

    def lock_info(self) -> LockInfo | None:
        return self._lock.model_copy() if self._lock is not None else None
