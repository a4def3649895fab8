"""The control channel between rank 0 (leader) and the other ranks (members).

One TCP connection per member, JSON lines, kept open for the whole attempt:

    member -> leader   {"op": "join", "rank": r, "cluster": id}     once, at start
    leader -> member   {"op": "go", ...plan}                          when every rank joined
                       {"op": "refused", "reason": ...}              a foreign, duplicate or late rank
    member -> leader   {"op": "beat"}                                 every few seconds (liveness)
    leader -> member   {"op": "beat"}                                 every few seconds (liveness)
    leader -> member   {"op": "done", "status": ...}                 the leader's commands ended
    member -> leader   {"op": "committed"}                            its volumes are committed

A connection that closes before its last message means the peer is gone, and so does a
peer that sends nothing for `lost_after_s` (a host that vanished without closing its
connections, a frozen container: TCP alone would notice only after many minutes, NCCL's
collective timeout after 10 to 30): the leader stops training (a lost rank), a member stops
its node (a lost leader). Both then fail, so the cluster restarts as one unit. Beats go
both ways every `beat_interval(lost_after_s)` seconds. Waits are bounded and name the
missing ranks.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from runtime.cluster.layout import ClusterError

BEAT_S = 5.0
LOST_AFTER_S = 60.0  # a peer silent this long is lost (12 missed beats)
POLL_S = 0.2


def beat_interval(lost_after_s: float) -> float:
    """Several beats fit in the bound, so one late beat never loses a rank."""
    return min(BEAT_S, lost_after_s / 4)


_SEND_LOCK = threading.Lock()  # beats go out from their own thread: one message at a time


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    with _SEND_LOCK:
        sock.sendall((json.dumps(msg) + "\n").encode())


class _Lines:
    """Reads JSON lines from a socket; None at EOF or on a broken connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def read(self, timeout: float | None) -> dict[str, Any] | None:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionError, OSError) as exc:
                if isinstance(exc, TimeoutError | socket.timeout):
                    raise TimeoutError from exc
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return msg if isinstance(msg, dict) else None


def _close(sock: socket.socket) -> None:
    """Shut down first: that sends FIN now and wakes a thread blocked reading it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in sorted(ranks))


class Leader:
    """Rank 0's side: accept every member, release them together, watch them, end together."""

    def __init__(self, host: str, port: int, nodes: int, cluster_id: str, *, clock: Any = time.monotonic,
                 lost_after_s: float = LOST_AFTER_S) -> None:
        self.nodes, self.cluster_id, self.clock, self.lost_after_s = nodes, cluster_id, clock, lost_after_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.server = socket.socket(family, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.server.bind((host, port))
        except OSError as exc:
            self.server.close()
            raise ClusterError(f"rank 0 cannot listen on {host}:{port} for the other ranks: {exc}") from exc
        self.server.listen(max(8, nodes * 2))
        self.members: dict[int, socket.socket] = {}
        self.seen: dict[int, float] = {}  # rank -> last message (time.time)
        self.lost_ranks: set[int] = set()
        self.silent: dict[int, float] = {}  # rank -> how long it had been silent when counted lost
        self.committed: set[int] = set()
        self.started = False
        self.ended = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None

    # ----------------------------------------------------------------- joining

    def wait_for_members(self, timeout_s: float) -> None:
        """Until ranks 1..N-1 joined; ClusterError naming the missing ranks at the deadline."""
        deadline = self.clock() + timeout_s
        while len(self.members) < self.nodes - 1:
            left = deadline - self.clock()
            if left <= 0:
                missing = [r for r in range(1, self.nodes) if r not in self.members]
                self._refuse_all(f"{ranks_text(missing)} did not join")
                raise ClusterError(
                    f"{ranks_text(missing)} of {self.nodes} did not join rank 0 within {timeout_s:g} s; "
                    "a partial cluster never trains (the whole cluster restarts from the latest valid checkpoint)"
                )
            self.server.settimeout(min(left, 1.0))
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, socket.timeout):
                continue
            self._admit(conn, min(left, 10.0))

    def _admit(self, conn: socket.socket, timeout: float) -> None:
        try:
            msg = _Lines(conn).read(timeout)
        except TimeoutError:
            msg = None
        if not msg or msg.get("op") != "join":
            conn.close()
            return
        rank, cluster = msg.get("rank"), msg.get("cluster")
        reason = ""
        if cluster != self.cluster_id:
            reason = f"rank {rank} belongs to cluster {cluster!r}, not {self.cluster_id!r}"
        elif not isinstance(rank, int) or not 1 <= rank < self.nodes:
            reason = f"rank {rank!r} is outside 1..{self.nodes - 1}"
        elif self.started:
            reason = (f"rank {rank} joined cluster {self.cluster_id} after it started training; "
                      "a partial cluster never trains")
        elif rank in self.members:
            reason = f"rank {rank} already joined"
        if reason:
            try:
                _send(conn, {"op": "refused", "reason": reason})
            except OSError:
                pass
            conn.close()
            return
        assert isinstance(rank, int)
        self.members[rank] = conn
        self.seen[rank] = time.time()

    def _refuse_all(self, reason: str) -> None:
        for conn in self.members.values():
            try:
                _send(conn, {"op": "refused", "reason": reason})
            except OSError:
                pass

    # ----------------------------------------------------------------- training

    def start(self, plan: dict[str, Any]) -> None:
        """Release every member with the same plan (e.g. the checkpoint step to resume from)."""
        self.started = True
        for rank, conn in sorted(self.members.items()):
            try:
                _send(conn, {"op": "go", **plan})
            except OSError:
                self.lost_ranks.add(rank)
            threading.Thread(target=self._watch, args=(rank, conn), daemon=True).start()
        self._acceptor = threading.Thread(target=self._refuse_late, daemon=True)
        self._acceptor.start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(beat_interval(self.lost_after_s)):
            for conn in list(self.members.values()):
                try:
                    _send(conn, {"op": "beat"})
                except OSError:  # its watcher sees the closed connection
                    pass

    def _watch(self, rank: int, conn: socket.socket) -> None:
        lines = _Lines(conn)
        heard = time.monotonic()
        while not self._stop.is_set():
            try:
                msg = lines.read(min(1.0, self.lost_after_s / 4))
            except TimeoutError:
                silent = time.monotonic() - heard
                if silent >= self.lost_after_s:
                    with self._lock:
                        if rank not in self.committed:
                            self.lost_ranks.add(rank)
                            self.silent[rank] = silent
                    return
                continue
            heard = time.monotonic()
            if msg is None:
                with self._lock:
                    if rank not in self.committed:
                        self.lost_ranks.add(rank)
                return
            with self._lock:
                self.seen[rank] = time.time()
                if msg.get("op") == "committed":
                    self.committed.add(rank)

    def _refuse_late(self) -> None:
        """A rank restarted on its own (or a stray container) is turned away while training."""
        self.server.settimeout(1.0)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self._admit(conn, 5.0)

    def lost(self) -> list[int]:
        with self._lock:
            return sorted(self.lost_ranks)

    def lost_reason(self) -> str:
        """Why the lost ranks count as lost ("" when none is)."""
        with self._lock:
            silent = {r: s for r, s in self.silent.items() if r in self.lost_ranks}
            closed = sorted(self.lost_ranks - set(silent))
        parts = [f"{ranks_text(closed)}: connection closed"] if closed else []
        parts += [f"rank {r}: no heartbeat for {s:.0f} s (bound {self.lost_after_s:g} s)" for r, s in sorted(silent.items())]
        return "; ".join(parts)

    def liveness(self) -> dict[str, dict[str, Any]]:
        """Per rank: alive / lost and when it was last heard from (rank 0 is this process)."""
        now = time.time()
        with self._lock:
            out: dict[str, dict[str, Any]] = {"0": {"state": "alive", "seen_at": now}}
            for rank in range(1, self.nodes):
                state = "lost" if rank in self.lost_ranks else ("alive" if rank in self.members else "missing")
                out[str(rank)] = {"state": state, "seen_at": self.seen.get(rank)}
        return out

    def finish(self, status: str, timeout_s: float) -> list[int]:
        """Tell every member the commands ended; wait (bounded) until each committed its
        volumes. Returns the ranks that did not confirm."""
        self.ended = True
        for rank, conn in sorted(self.members.items()):
            try:
                _send(conn, {"op": "done", "status": status})
            except OSError:
                with self._lock:
                    self.lost_ranks.add(rank)
        deadline = self.clock() + timeout_s
        while self.clock() < deadline:
            with self._lock:
                pending = [r for r in self.members if r not in self.committed and r not in self.lost_ranks]
            if not pending:
                break
            time.sleep(POLL_S)
        with self._lock:
            return sorted(r for r in self.members if r not in self.committed)

    def close(self) -> None:
        self._stop.set()
        for conn in self.members.values():
            _close(conn)
        _close(self.server)


class Member:
    """Rank r's side: join the leader (bounded), get the plan, then follow the leader."""

    def __init__(self, rank: int, leader: str, port: int, cluster_id: str, *,
                 lost_after_s: float = LOST_AFTER_S) -> None:
        self.rank, self.leader, self.port, self.cluster_id = rank, leader, port, cluster_id
        self.lost_after_s = lost_after_s
        self.sock: socket.socket | None = None
        self.done_status: str | None = None
        self.leader_lost = False
        self.leader_silent_s: float | None = None  # how long rank 0 had been silent when counted lost
        self._done = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def join(self, timeout_s: float, *, clock: Any = time.monotonic) -> dict[str, Any]:
        """Connect (retrying while rank 0 starts), join, and wait for `go`: the plan."""
        deadline = clock() + timeout_s
        last = ""
        while self.sock is None:
            try:
                self.sock = socket.create_connection((self.leader, self.port), timeout=5.0)
            except OSError as exc:
                last = str(exc)
                if clock() >= deadline:
                    raise ClusterError(
                        f"rank {self.rank}: rank 0 at {self.leader}:{self.port} did not answer within "
                        f"{timeout_s:g} s ({last}); a partial cluster never trains"
                    ) from None
                time.sleep(0.5)
        _send(self.sock, {"op": "join", "rank": self.rank, "cluster": self.cluster_id})
        lines = _Lines(self.sock)
        # rank 0 waits up to its own join timeout for the others: allow it that long, and a margin
        try:
            msg = lines.read(max(1.0, deadline - clock()) + 30.0)
        except TimeoutError:
            msg = None
            last = "no answer"
        if msg is None or msg.get("op") != "go":
            reason = (msg or {}).get("reason") or last or "the connection closed"
            self.close()
            raise ClusterError(f"rank {self.rank}: rank 0 did not start the cluster: {reason}")
        threading.Thread(target=self._follow, args=(lines,), daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()
        return {k: v for k, v in msg.items() if k != "op"}

    def _follow(self, lines: _Lines) -> None:
        heard = time.monotonic()
        while not self._stop.is_set():
            try:
                msg = lines.read(min(1.0, self.lost_after_s / 4))
            except TimeoutError:
                silent = time.monotonic() - heard
                if silent >= self.lost_after_s:
                    with self._lock:
                        if self.done_status is None:
                            self.leader_lost, self.leader_silent_s = True, silent
                    self._done.set()
                    return
                continue
            heard = time.monotonic()
            if msg is None:
                with self._lock:
                    if self.done_status is None:
                        self.leader_lost = True
                self._done.set()
                return
            if msg.get("op") == "done":
                with self._lock:
                    self.done_status = str(msg.get("status") or "")
                self._done.set()

    def _beat(self) -> None:
        while not self._stop.wait(beat_interval(self.lost_after_s)):
            try:
                assert self.sock is not None
                _send(self.sock, {"op": "beat"})
            except (OSError, AssertionError):
                return

    def ended(self) -> bool:
        """The leader said `done`, or vanished."""
        return self._done.is_set()

    def wait_ended(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)

    def confirm_committed(self) -> None:
        if self.sock is not None:
            try:
                _send(self.sock, {"op": "committed"})
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        if self.sock is not None:
            _close(self.sock)
