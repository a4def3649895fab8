"""An expiring lease on a key-value primitive: the apply lock of the shared stores.

A shared store (a Modal Dict, a directory on a network filesystem) cannot rely on the
kernel to free a dead holder's lock, so the lock is a lease: an entry carrying an expiry
(`ttl_s`, default 5 min) that its holder pushes forward from a heartbeat thread every
`heartbeat_s` (a fifth of the TTL; reconciler/state/lease.py) and on every state write. A
holder that dies stops renewing, so its lock expires within minutes and the next apply takes
it over with a note; `retool state unlock ID` clears it sooner. A live holder is refused at
once, named.

All it needs of the store is `KeyValue`: an atomic put-if-absent, a get and an atomic pop.
Taking over an expired lock is made safe without compare-and-swap: the claimant first puts
`<key>#takeover-<expired id>` if absent, so exactly one apply may remove that expired lock
(claims stay behind); it then pops the entry (putting it back if it is no longer the
expired one) and races for the key like any first apply.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from pydantic import ValidationError

from reconciler.errors import StateLockedError, TerminalError
from reconciler.state.base import LockInfo, Takeover, format_age, lock_mismatch_error, locked_error, not_locked_error

DEFAULT_LOCK_TTL_S = 300.0  # a dead holder's lock frees itself this long after its last heartbeat
TAKEOVER_SUFFIX = "#takeover-"


class KeyValue(Protocol):
    """The primitive a lease is built on (a Modal Dict, lock files in a shared directory)."""

    def put(self, key: str, value: str, *, if_absent: bool = False) -> bool:
        """Store `value`; with `if_absent`, only when `key` has none (atomically). True if stored."""
        ...

    def get(self, key: str) -> str | None: ...

    def pop(self, key: str) -> str | None:
        """Remove `key` and return what it held (atomically: one of two racing pops gets it)."""
        ...


class LeaseLock:
    """The lock half of a shared `StateStore` (its `lock`, `renew`, `unlock`, `lock_info`)."""

    def __init__(
        self, kv: KeyValue, key: str, where: str, *, ttl_s: float = DEFAULT_LOCK_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv, self.key, self.where, self.ttl_s, self.clock = kv, key, where, ttl_s, clock
        self.heartbeat_s: float | None = ttl_s / 5
        self.taken_over: Takeover | None = None
        self._held: LockInfo | None = None

    def lock(self, info: LockInfo) -> str:
        self.taken_over = None
        held = info if info.expires_at is not None else info.model_copy(
            update={"expires_at": self.clock() + self.ttl_s}
        )
        for _ in range(3):
            if self.kv.put(self.key, held.model_dump_json(), if_absent=True):
                self._held = held
                return info.id
            holder = self.lock_info()
            if holder is None:
                continue  # released between the put and the read: try again
            now = self.clock()
            if holder.expires_at is None or now <= holder.expires_at:
                raise locked_error(holder, self.where, now=now)
            self._take_over(holder, info, now)
        raise TerminalError("Could not take the state lock", f"{self.where} kept changing", "run the command again")

    def _take_over(self, expired: LockInfo, info: LockInfo, now: float) -> None:
        """Remove an expired lock; one claimant per expired lock (see the module docstring)."""
        claim = f"{self.key}{TAKEOVER_SUFFIX}{expired.id}"
        if not self.kv.put(claim, info.id, if_absent=True):
            raise StateLockedError(
                f"State lock {expired.id} expired and another apply is taking it over",
                f"{self.where}: the expired holder was {expired.who} running `{expired.command}`",
                "run `retool status` to see who holds it now",
            )
        popped = self.kv.pop(self.key)
        current = self.parse(popped) if popped is not None else None
        if current is not None and current.id != expired.id:
            # force-unlocked and re-taken since we looked: that lock is live, give it back
            self.kv.put(self.key, popped or "", if_absent=True)
            raise locked_error(current, self.where, now=now)
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
        self._held = self._held.model_copy(update={"expires_at": self.clock() + self.ttl_s})
        self.kv.put(self.key, self._held.model_dump_json())

    def extend(self) -> None:
        """A state write also counts as a heartbeat."""
        if self._held is not None:
            self.renew(self._held.id)

    def unlock(self, lock_id: str) -> None:
        holder = self.lock_info()
        if holder is None:
            raise not_locked_error(f"no lock in {self.where}")
        if holder.id != lock_id:
            raise lock_mismatch_error(lock_id, holder)
        self.kv.pop(self.key)
        if self._held is not None and self._held.id == lock_id:
            self._held = None

    def lock_info(self) -> LockInfo | None:
        text = self.kv.get(self.key)
        return None if text is None else self.parse(text)

    @staticmethod
    def parse(text: str) -> LockInfo:
        try:
            return LockInfo.model_validate_json(text)
        except ValidationError:
            return LockInfo(id="damaged", who="unknown", user="unknown", host="unknown", pid=0,
                            command="(unreadable lock entry)", created_at=0.0)


class LeasedStore:
    """The lock half of a `StateStore` served by `self.lease` (a store sets `self.lease`
    and `heartbeat_s` in its constructor; `taken_over` follows each `lock`)."""

    lease: LeaseLock
    taken_over: Takeover | None = None

    def lock(self, info: LockInfo) -> str:
        try:
            return self.lease.lock(info)
        finally:
            self.taken_over = self.lease.taken_over

    def renew(self, lock_id: str) -> None:
        self.lease.renew(lock_id)

    def unlock(self, lock_id: str) -> None:
        self.lease.unlock(lock_id)

    def lock_info(self) -> LockInfo | None:
        return self.lease.lock_info()
