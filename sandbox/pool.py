"""Worker slots with a bounded wait queue (backpressure instead of unbounded memory).

A slot is a working directory (and, when the server is root, a uid of its own). A request
takes a free slot or waits in FIFO order; when `max_queue` requests already wait, it is
refused at once (the HTTP layer answers 503 with Retry-After). A request that waited its
own queue bound without getting a slot gives up (`QueueTimeoutError`): its program never
ran, which the HTTP layer says in a SandboxError distinct from any program's outcome. The
time a request waits here is never part of its program's run time. The executor releases a
slot only once it is clean again and has its next program process prepared.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from sandbox.protocol import SlotSpec


class QueueFullError(Exception):
    """Every worker is busy and the wait queue is full."""


class QueueTimeoutError(Exception):
    """No worker became free within the request's queue bound: its program did not run."""

    def __init__(self, waited_s: float, bound_s: float, workers: int) -> None:
        super().__init__(
            f"no worker became free within the queue bound of {bound_s:g} s (waited {waited_s:.1f} s, "
            f"all {workers} workers busy); the program did not run"
        )
        self.waited_s = waited_s
        self.bound_s = bound_s


class SlotPool:
    def __init__(self, slots: list[SlotSpec], max_queue: int) -> None:
        self.slots = list(slots)
        self.max_queue = max_queue
        self._free: deque[SlotSpec] = deque(slots)
        self._waiters: deque[asyncio.Future[SlotSpec]] = deque()

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self._free)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self, timeout: float = math.inf) -> SlotSpec:
        """A free slot; waits at most `timeout` seconds (QueueTimeoutError), FIFO."""
        if self._free and not self.waiting:
            return self._free.popleft()
        if self.waiting >= self.max_queue:
            raise QueueFullError(f"all {self.size} workers are busy and {self.waiting} requests are waiting")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[SlotSpec] = loop.create_future()
        self._waiters.append(waiter)
        start = time.monotonic()
        # The expiry resolves the same future a release would, so a slot handed over and a
        # timeout can never both happen to one waiter.
        expiry = None if math.isinf(timeout) else loop.call_later(
            max(timeout, 0.0), self._expire, waiter, start, timeout
        )
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())  # got a slot just as we were cancelled
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def _expire(self, waiter: asyncio.Future[SlotSpec], start: float, bound: float) -> None:
        if not waiter.done():
            waiter.set_exception(QueueTimeoutError(time.monotonic() - start, bound, self.size))

    def release(self, slot: SlotSpec) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)
