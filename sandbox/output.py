"""Capture one output stream while the program runs: keep the head, drain and count the rest.

Reading continues past the cap (the bytes are spliced to /dev/null inside the kernel), so a
program printing gigabytes never blocks on a full pipe and never turns into a false timeout.
"""

from __future__ import annotations

import os

READ_CHUNK = 1 << 20


class CappedOutput:
    def __init__(self, fd: int, cap: int, devnull_fd: int) -> None:
        self.fd = fd
        self.cap = cap
        self._devnull = devnull_fd
        self._data = bytearray()
        self.dropped = 0
        self.eof = False  # the fd itself belongs to the caller, who closes it

    def pump(self) -> bool:
        """Move one chunk; False when nothing was waiting or at end of file (then `eof` is set)."""
        try:
            if len(self._data) < self.cap:
                chunk = os.read(self.fd, READ_CHUNK)
                room = self.cap - len(self._data)
                self._data += chunk[:room]
                self.dropped += max(0, len(chunk) - room)
                moved = len(chunk)
            else:
                moved = self._discard()
        except BlockingIOError:
            return False
        if moved == 0:
            self.eof = True
            return False
        return True

    def _discard(self) -> int:
        try:
            moved = os.splice(self.fd, self._devnull, READ_CHUNK, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            raise
        except OSError:  # splice unsupported here (some sandboxed kernels): read and drop instead
            moved = len(os.read(self.fd, READ_CHUNK))
        self.dropped += moved
        return moved

    def text(self) -> str:
        text = self._data.decode("utf-8", errors="replace")  # binary output never breaks the JSON
        if self.dropped:
            text += f"\n[sandbox: output truncated, {self.dropped} more bytes not shown]"
        return text
