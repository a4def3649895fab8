"""Worker slots with a bounded wait queue (backpressure instead of unbounded memory).

A slot is a working directory (and, when the server is root, a uid of its own). A request
takes a free slot or waits in FIFO order; when `max_queue` requests already wait, it is
refused at once (the HTTP layer answers 503 with Retry-After). The executor releases a slot
only once it is clean again and has its next program process prepared.
"""

from __future__ import annotations

import asyncio
from collections import deque

from sandbox.protocol import SlotSpec


class QueueFullError(Exception):
    """Every worker is busy and the wait queue is full."""


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

    async def acquire(self) -> SlotSpec:
        if self._free and not self.waiting:
            return self._free.popleft()
        if self.waiting >= self.max_queue:
            raise QueueFullError(f"all {self.size} workers are busy and {self.waiting} requests are waiting")
        waiter: asyncio.Future[SlotSpec] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # got a slot just as we were cancelled
                self.release(waiter.result())
            raise
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def release(self, slot: SlotSpec) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)
