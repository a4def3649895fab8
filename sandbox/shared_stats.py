"""Counters and gauges the server processes of one multi-process server share (a memfd).

Each process owns one row and overwrites it whenever its activity changes (and twice a
second); any process can read every row. The supervisor reads them for the lifetime rules
(requests in flight, last activity: CLOCK_MONOTONIC is one clock for every process of the
machine), and each process's /health sums them, so /health and /metrics describe the whole
server whichever process answers. Rows are doubles written in place: a reader may see one
field a moment newer than another, never a torn number.
"""

from __future__ import annotations

import mmap
import os
import struct

FIELDS = (
    "in_flight", "last_change", "executions", "timeouts", "errors", "rejected", "queue_timeouts",
    "zygote_restarts", "leftovers_killed", "pool_size", "busy", "prepared", "queue_depth", "ready",
)
_ROW = struct.Struct(f"={len(FIELDS)}d")


class SharedStats:
    """`count` rows in the memory behind `fd`; this process writes row `index` (None: reads only)."""

    def __init__(self, fd: int, count: int, index: int | None = None) -> None:
        self.fd = fd
        self.count = count
        self.index = index
        self._map = mmap.mmap(fd, count * _ROW.size)

    @classmethod
    def create(cls, count: int) -> SharedStats:
        fd = os.memfd_create("retool-sandbox-stats", 0)  # inheritable: children are handed the fd
        os.ftruncate(fd, count * _ROW.size)
        return cls(fd, count)

    def write(self, values: dict[str, float]) -> None:
        assert self.index is not None, "a reader does not write"
        _ROW.pack_into(self._map, self.index * _ROW.size, *(float(values.get(name, 0.0)) for name in FIELDS))

    def rows(self) -> list[dict[str, float]]:
        return [dict(zip(FIELDS, _ROW.unpack_from(self._map, i * _ROW.size))) for i in range(self.count)]

    def total(self) -> dict[str, float]:
        """Sums of every field but `last_change`, which is the latest."""
        rows = self.rows()
        out = {name: sum(row[name] for row in rows) for name in FIELDS}
        out["last_change"] = max(row["last_change"] for row in rows)
        return out
