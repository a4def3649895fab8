"""One node rank of a multi-node stage job on Ray: a Ray actor placed in its bundle of the
job's placement group (runtime.ray.multinode), playing runtime.cluster's node role.

    where()   this node's id and address (rank 0 also picks its free rendezvous ports)
    run()     rank 0 leads and ranks r > 0 join it (runtime.cluster.node); each then runs
              the stage's commands, torchrun with `--nnodes N --node_rank r` and rank 0's
              address; a lost rank, or rank 0's end, stops this node's command
    stop()    asked by the entrypoint (`ray job stop`, another rank failed): stop the command

Every process a rank starts carries `RETOOL_RUN_TAG=<run tag>-rank<r>` (ranks of one host
stop only their own; the next attempt stops any an earlier attempt left behind), and is
started through `python -m runtime.ray.guard PARENT_PID ARGV...`, which makes the kernel
send it SIGTERM when the actor dies (a killed entrypoint takes its actors with it, so its
trainers never run on unowned). Nothing here imports ray at module level.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from pydantic import BaseModel

from runtime import processes as procs
from runtime import records
from runtime.cluster.layout import PORT_BASE_ENV, ClusterError, ClusterInfo
from runtime.cluster.node import ClusterNode
from runtime.ray.guard import guarded
from runtime.records import MultiNodePlan, RankLiveness, RankRecord, RayLiveness

SANDBOX_URL_ENV = "RETOOL_SANDBOX_URL"
STOP_GRACE_S = 30.0
POLL_S = 1.0
LIVENESS_EVERY_S = 10.0  # how often rank 0 records every rank's liveness
TAIL_LINES = 20
STOPPED = -15  # this rank's command was stopped on request (`ray job stop`, another rank failed)
INTERRUPTED = -1  # stopped because of the cluster (a lost rank, rank 0 ended)


class Place(BaseModel):
    """Where a rank's actor landed."""

    rank: int
    node_id: str
    ip: str
    port_base: int  # rank 0's free rendezvous ports (PORT_BASE_ENV): base and base + 1


def rank_tag(run_tag: str, rank: int) -> str:
    return f"{run_tag}-rank{rank}"


def free_port_pair(host: str = "") -> int:
    """A port p with p and p + 1 free on this node (the rendezvous and torchrun's store)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind((host, 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind((host, port + 1))
                except OSError:
                    continue
            return port
    raise ClusterError("no two free consecutive ports on this node for the rendezvous")


class NodeRank:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._stop_reason = ""
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- placement

    def where(self) -> Place:
        import ray

        ip = ray.util.get_node_ip_address()
        return Place(rank=self.rank, node_id=ray.get_runtime_context().get_node_id(), ip=ip,
                     port_base=free_port_pair() if self.rank == 0 else 0)

    def stop(self, reason: str) -> None:
        with self._lock:
            self._stop_reason = self._stop_reason or reason

    def stop_reason(self) -> str:
        with self._lock:
            return self._stop_reason

    # ----------------------------------------------------------------- the node's part

    def run(self, info: ClusterInfo, plan: MultiNodePlan, place: Place, port_base: int) -> RankRecord:
        """This rank's part of the run (`place`: where `where()` said it is)."""
        record = RankRecord(rank=self.rank, node_id=place.node_id, ip=place.ip)
        self._stop_leftovers(plan)
        run_dir = Path(plan.run.exit_path).parent.parent
        try:
            node = ClusterNode(info, plan.nodes, kind="sft", run_dir=run_dir, join_timeout_s=plan.join_timeout_s,
                               sandbox_url_var=SANDBOX_URL_ENV, env={PORT_BASE_ENV: str(port_base)})
        except ClusterError as exc:
            return record.model_copy(update={"returncode": 1, "message": str(exc)})
        try:
            return self._run(node, plan, record)
        except ClusterError as exc:
            print(f"[retool] rank {self.rank}: {exc}", flush=True)
            return record.model_copy(update={"returncode": 1, "message": str(exc)})
        finally:
            node.close()

    def _run(self, node: ClusterNode, plan: MultiNodePlan, record: RankRecord) -> RankRecord:
        node.join()  # rank 0 waits (bounded) for every rank; the others join it
        if node.is_leader:
            node.start({"cluster": plan.cluster_id})
        code, why, argv = 0, "", list[str]()
        for cmd in plan.run.commands:
            argv, env = node.command(procs.this_interpreter(cmd.argv), dict(cmd.env))
            print(f"[retool] rank {self.rank} on node {record.node_id[:12]} ({record.ip}): {' '.join(argv)}", flush=True)
            code, why = self._command(node, argv, env, cmd.cwd, rank_tag(plan.run_tag, self.rank),
                                      plan.liveness_path if node.is_leader else "")
            if code != 0:
                break
        record = record.model_copy(update={"argv": argv})
        if node.is_leader:
            node.finish("finished" if code == 0 else "failed")  # raises when a member did not confirm
            return record.model_copy(update={"returncode": code, "message": why})
        if code == STOPPED:
            return record.model_copy(update={"returncode": code, "message": why})
        if code in (0, INTERRUPTED):
            # rank 0 ended: its outcome is this rank's (waits for rank 0's word; raises if it was lost)
            outcome = node.member_outcome()
            if outcome == "finished":
                node.confirm_committed()  # shared storage: this rank's shards are written already
                return record.model_copy(update={"returncode": 0, "message": "rank 0 finished"})
            return record.model_copy(update={"returncode": code or 1, "message": f"rank 0 ended: {outcome}"})
        return record.model_copy(update={"returncode": code, "message": why or self._last_error()})

    def _command(self, node: ClusterNode, argv: list[str], env: dict[str, str], cwd: str | None,
                 tag: str, liveness_path: str) -> tuple[int, str]:
        """Run one command until it ends, this rank is asked to stop, or the cluster interrupts it."""
        proc = subprocess.Popen(
            guarded(argv), cwd=cwd or None, env={**os.environ, **env, procs.RUN_TAG_ENV: tag},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,
        )
        reader = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        reader.start()
        noted = 0.0
        try:
            while proc.poll() is None:
                if liveness_path and time.monotonic() - noted >= LIVENESS_EVERY_S:
                    self._note_liveness(node, liveness_path)
                    noted = time.monotonic()
                reason = self.stop_reason()
                if reason:
                    self._stop(proc, tag)
                    return STOPPED, f"rank {self.rank} stopped: {reason}"
                why = node.interrupt()
                if why:
                    print(f"[retool] rank {self.rank}: {why}", flush=True)
                    self._stop(proc, tag)
                    return INTERRUPTED, why
                time.sleep(POLL_S)
            return proc.returncode, "" if proc.returncode == 0 else f"rank {self.rank} exited with code {proc.returncode}"
        finally:
            if proc.poll() is None:  # an error above: never leave the trainer running
                self._stop(proc, tag)
            reader.join(10)

    @staticmethod
    def _note_liveness(node: ClusterNode, path: str) -> None:
        """(Rank 0.) Every rank as the rendezvous sees it, for `retool status`."""
        ranks = {r: RankLiveness.model_validate(seen) for r, seen in node.liveness().items()}
        try:
            records.save(Path(path), RayLiveness(ranks=ranks, updated_at=time.time()))
        except OSError as exc:  # status loses a line; training goes on
            print(f"[retool] rank 0 cannot write {path}: {exc}", flush=True)

    @staticmethod
    def _stop(proc: subprocess.Popen[str], tag: str) -> None:
        procs.terminate_run(proc.pid, tag, grace_s=STOP_GRACE_S)
        proc.poll()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)  # Ray sends an actor's output to the job's log
            sys.stdout.flush()
            self.tail.append(line.rstrip("\n"))

    def _last_error(self) -> str:
        return procs.error_line(list(self.tail)) or f"rank {self.rank} failed"

    def _stop_leftovers(self, plan: MultiNodePlan) -> None:
        """Trainers an earlier attempt of this run left on this node (its entrypoint was
        SIGKILLed before its actors could stop them). Every rank does this before the
        rendezvous, and rank 0 starts training only after every rank joined, so no rank
        stops a trainer of this attempt on a host that several ranks share."""
        for rank in range(plan.nodes):
            tag = rank_tag(plan.run_tag, rank)
            left = procs.run_members(None, tag)
            if left:
                print(f"[retool] rank {self.rank}: stopping {len(left)} process(es) an earlier attempt left: {left}",
                      flush=True)
                procs.terminate_run(None, tag, grace_s=10)
