"""A multi-node stage job's entrypoint on Ray: `python -m runtime.ray.multinode NODES.json`.

    reserve   one bundle per node (the stage's CPUs, GPUs, memory per node) in a placement
              group with strategy STRICT_SPREAD: N bundles on N distinct Ray nodes, or none
    place     one NodeRank actor in each bundle (runtime.ray.node_rank); each reports its
              node's address, rank 0 also its free rendezvous ports
    run       every rank plays runtime.cluster's node role: rank 0 leads, the others join it,
              and each runs torchrun with the same arguments and its own `--node_rank`
    end       any rank's failure stops the others (the rendezvous sees it too) and fails the
              job; `ray job stop` (SIGTERM) stops every rank; the exit record and the ranks
              record land beside the plan; the placement group is removed

The job ends FAILED when any rank failed, so the next apply resumes the run from its latest
valid checkpoint (every rank's shards), as a single-node job does.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from runtime import processes as procs
from runtime import records
from runtime.cluster.layout import ClusterInfo
from runtime.ray.node_rank import INTERRUPTED, STOPPED, NodeRank, Place
from runtime.records import ExitRecord, MultiNodePlan, RankRecord, RayRanks

PLACE_NOTE_S = 30.0  # how often a pending placement group is reported in the job's log
END_GRACE_S = 45.0  # after asking every rank to stop (under Ray's 60 s before SIGKILL)
PLACE_TIMEOUT_S = 300.0  # the actors' `where()` once their bundles are reserved (their runtime_env set up)


def exit_code(ranks: list[RankRecord]) -> int:
    """The job's code: the first rank that failed on its own; else 1 for a rank interrupted
    by the cluster or lost; 143 when every rank was stopped on request."""
    own = [r.returncode for r in ranks if r.returncode not in (0, INTERRUPTED, STOPPED, None)]
    if own:
        return int(own[0] or 1)
    if any(r.returncode in (INTERRUPTED, None) for r in ranks):
        return 1
    if any(r.returncode == STOPPED for r in ranks):
        return 128 + signal.SIGTERM
    return 0


def actor_options(plan: MultiNodePlan, pg: Any, rank: int) -> dict[str, Any]:
    """The actor asks for its whole bundle (so its torchrun sees the bundle's GPUs)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    b = plan.bundle
    custom = {k: v for k, v in b.items() if k not in ("CPU", "GPU", "memory")}
    opts: dict[str, Any] = {
        "num_cpus": b.get("CPU", 0), "num_gpus": b.get("GPU", 0), "max_concurrency": 2, "max_restarts": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank),
    }
    if b.get("memory"):
        opts["memory"] = b["memory"]
    if custom:
        opts["resources"] = custom
    return opts


class Entrypoint:
    def __init__(self, plan: MultiNodePlan) -> None:
        self.plan = plan
        self.stop_reason = ""
        self.started = time.time()

    def on_signal(self, signum: int, _frame: object) -> None:
        self.stop_reason = self.stop_reason or f"the job was stopped ({signal.Signals(signum).name})"

    def run(self) -> int:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        plan = self.plan
        ray.init(log_to_driver=True)
        # after ray.init, which installs its own SIGTERM handler (exit at once): `ray job
        # stop` must reach the ranks, which stop their trainers, before this process ends
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        pg = placement_group([dict(plan.bundle)] * plan.nodes, strategy="STRICT_SPREAD", name=plan.cluster_id)
        actors: list[Any] = []
        ranks: list[RankRecord] = []
        try:
            if not self._reserved(pg):
                ranks = [RankRecord(rank=r, node_id="", ip="", message=self.stop_reason) for r in range(plan.nodes)]
                return self._end(ranks, pg.id.hex())
            remote = ray.remote(NodeRank)
            actors = [remote.options(**actor_options(plan, pg, r)).remote(r) for r in range(plan.nodes)]
            places: list[Place] = ray.get([a.where.remote() for a in actors], timeout=PLACE_TIMEOUT_S)
            ips = [p.ip for p in places]
            print(f"[retool] {plan.nodes} node ranks on Ray nodes "
                  + ", ".join(f"{p.rank}: {p.node_id[:12]} ({p.ip})" for p in places), flush=True)
            refs = [a.run.remote(ClusterInfo(rank=r, cluster_id=plan.cluster_id, ips=ips, ipv4_ips=ips), plan,
                                 places[r], places[0].port_base) for r, a in enumerate(actors)]
            ranks = self._wait(actors, refs, places)
            return self._end(ranks, pg.id.hex())
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(pg)

    def _reserved(self, pg: Any) -> bool:
        """Wait (bounded) until Ray reserved every bundle; False when stopped or timed out."""
        import ray

        plan, deadline, note = self.plan, time.time() + self.plan.placement_timeout_s, 0.0
        while not self.stop_reason:
            ready, _ = ray.wait([pg.ready()], timeout=1.0)
            if ready:
                return True
            if time.time() >= deadline:
                self.stop_reason = (
                    f"Ray could not place {plan.nodes} bundles {plan.bundle} on {plan.nodes} distinct nodes "
                    f"(STRICT_SPREAD) within {plan.placement_timeout_s:g} s; the cluster needs {plan.nodes} nodes "
                    "with that much free"
                )
                print(f"[retool] {self.stop_reason}", flush=True)
                return False
            if time.time() >= note:
                print(f"[retool] waiting for Ray to reserve {plan.nodes} nodes of {plan.bundle} (STRICT_SPREAD)",
                      flush=True)
                note = time.time() + PLACE_NOTE_S
        return False

    def _wait(self, actors: list[Any], refs: list[Any], places: list[Place]) -> list[RankRecord]:
        """Every rank's record; the first failure (or a stop request) stops the others."""
        import ray

        out: dict[int, RankRecord] = {}
        pending = {ref: rank for rank, ref in enumerate(refs)}
        asked_stop_at: float | None = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                rank = pending.pop(ref)
                try:
                    out[rank] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the actor died (its node lost, killed)
                    p = places[rank]
                    out[rank] = RankRecord(rank=rank, node_id=p.node_id, ip=p.ip,
                                           message=f"rank {rank}'s actor died: {str(exc).splitlines()[0][:300]}")
                if out[rank].returncode != 0 and not self.stop_reason:
                    self.stop_reason = f"rank {rank} failed: {out[rank].message}"
            if self.stop_reason and pending:
                if asked_stop_at is None:
                    print(f"[retool] stopping every rank: {self.stop_reason}", flush=True)
                    asked_stop_at = time.time()
                    for rank in pending.values():
                        actors[rank].stop.remote(self.stop_reason)
                elif time.time() - asked_stop_at > END_GRACE_S:
                    for ref, rank in pending.items():
                        p = places[rank]
                        out[rank] = RankRecord(rank=rank, node_id=p.node_id, ip=p.ip,
                                               message=f"rank {rank} did not stop within {END_GRACE_S:g} s")
                        ray.kill(actors[rank], no_restart=True)
                    pending.clear()
        return [out[r] for r in sorted(out)]

    def _end(self, ranks: list[RankRecord], pg_id: str) -> int:
        plan = self.plan
        cancelled = self.stop_reason.startswith("the job was stopped")
        code = 128 + signal.SIGTERM if cancelled else exit_code(ranks)
        records.save(Path(plan.ranks_path), RayRanks(submission_id=plan.cluster_id, placement_group=pg_id, ranks=ranks))
        for r in ranks:
            print(f"[retool] rank {r.rank} on node {r.node_id[:12] or '-'}: exit {r.returncode}"
                  + (f" ({r.message})" if r.message else ""), flush=True)
        print(f"[retool] exit {code}" + (" (SIGTERM)" if cancelled else ""), flush=True)
        procs.write_exit(Path(plan.run.exit_path), ExitRecord(
            returncode=code, signal="SIGTERM" if cancelled else None, failed_command=0 if code else None,
            started_at=self.started, cancelled=cancelled,
        ))
        return code


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m runtime.ray.multinode NODES.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    plan = records.parse(MultiNodePlan, path.read_text(encoding="utf-8"), source=str(path))
    return Entrypoint(plan).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
