"""Holding the state lock for the life of an apply: take it, renew it, give it back.

`holding(store, info)` is what apply (and anything else that must hold the lock across
planning and applying) uses. A store whose lock expires (`heartbeat_s` set: the Modal
store) is renewed from a daemon thread while the block runs, so a live apply keeps its lock
however long it waits on a stage, and a dead one stops renewing and its lock expires. The
local store's lock is the kernel's and needs no heartbeat.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from reconciler.errors import RetoolError
from reconciler.state.base import LockInfo, StateStore


class Heartbeat:
    """Calls `store.renew(lock_id)` every `interval` seconds until stopped. A failed renewal
    (a network blip) is retried at the next beat; the TTL leaves room for several."""

    def __init__(self, store: StateStore, lock_id: str, interval: float) -> None:
        self.store, self.lock_id, self.interval = store, lock_id, interval
        self.beats = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retool-lock-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.renew(self.lock_id)
                self.beats += 1
            except (RetoolError, OSError, ConnectionError, TimeoutError):
                self.failures += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def release(store: StateStore, lock_id: str) -> None:
    """Give the lock back; if someone force-unlocked it (`retool state unlock`), nothing of
    ours is left to release."""
    try:
        store.unlock(lock_id)
    except RetoolError:
        pass


@contextmanager
def holding(store: StateStore, info: LockInfo) -> Iterator[str]:
    """Hold the store's lock (with its heartbeat) for the block; yields the lock id.
    Raises StateLockedError at once when a live holder has it."""
    lock_id = store.lock(info)
    beat = Heartbeat(store, lock_id, store.heartbeat_s).start() if store.heartbeat_s else None
    try:
        yield lock_id
    finally:
        if beat is not None:
            beat.stop()
        release(store, lock_id)
