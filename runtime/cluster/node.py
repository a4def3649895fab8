"""The role one container plays in a multi-node stage (used by runtime.modal.worker, and by
runtime.ray.node_rank for SFT on Ray, where nothing is committed: the storage is shared).

    rank 0 (leader)                              rank r > 0 (member)
    ─────────────────────────────────────────    ─────────────────────────────────────────
    check the cluster is whole                   check the cluster is whole
    RL: start the Ray head                       join rank 0 (bounded; refused if foreign/late)
    wait for every rank (bounded, names missing)
    decide the plan (resume step) ──── go ────▶  take the plan (one resume step for all)
    SFT: torchrun --node_rank=0 …                SFT: torchrun --node_rank=r … (same args)
    RL: wait for every rank's Ray node,          RL: ray start --address=<rank 0> --block
        then main_ppo trainer.nnodes=N               (until rank 0 says done)
    a lost rank stops training and fails         a lost rank 0 stops the node and fails
    commit; done ─────────────────────────────▶  commit its shards; committed ──▶
    wait (bounded) for every rank's commit;      return (only rank 0's result counts)
    stop the Ray head; return the result
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runtime.cluster.layout import (
    ClusterError,
    ClusterInfo,
    cluster_problem,
    is_torchrun,
    node_ports,
    port_base,
    ray_cpu_resources,
    ray_start_argv,
    ray_temp_dir,
    torchrun_argv,
    with_sidecar_port,
)
from runtime.cluster.ray_nodes import RayNode, package_root
from runtime.cluster.rendezvous import LOST_AFTER_S, Leader, Member, ranks_text

RL_MODULE = "verl.trainer.main_ppo"
COMMIT_WAIT_S = 600.0


def is_rl_trainer(argv: list[str]) -> bool:
    return RL_MODULE in argv


class ClusterNode:
    def __init__(self, info: ClusterInfo, nodes: int, *, kind: str, run_dir: Path, join_timeout_s: float,
                 sandbox_url_var: str, env: Mapping[str, str] | None = None,
                 lost_after_s: float = LOST_AFTER_S, live_log: Callable[[str], Path] | None = None) -> None:
        problem = cluster_problem(info, nodes)
        if problem:
            raise ClusterError(f"rank {info.rank}: {problem}")
        self.info, self.nodes, self.kind, self.run_dir = info, nodes, kind, run_dir
        # where a log held open for the whole attempt goes: off the volume (a file open on a
        # Modal volume makes every reload fail, and commit() reloads); synced into run_dir/logs
        self.live_log = live_log or (lambda name: run_dir / "logs" / name)
        self.join_timeout_s, self.sandbox_url_var, self.lost_after_s = join_timeout_s, sandbox_url_var, lost_after_s
        self.ports = node_ports(info.rank, shared_host=info.shared_host, base=port_base(dict(env or os.environ)))
        self.leader: Leader | None = None
        self.member: Member | None = None
        self.ray: RayNode | None = None  # rank 0's head (members run theirs as their command)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def is_leader(self) -> bool:
        return self.info.rank == 0

    # ----------------------------------------------------------------- start

    def join(self) -> dict[str, Any] | None:
        """Rank 0: listen and wait for every rank (returns None; `start` sends the plan).
        Others: join rank 0 and return its plan (`{"ended": status}` when rank 0 had
        nothing to train)."""
        if self.is_leader:
            self.leader = Leader(self.info.own, self.ports.rendezvous, self.nodes, self.info.cluster_id,
                                 lost_after_s=self.lost_after_s)
            self.leader.wait_for_members(self.join_timeout_s)
            return None
        self.member = Member(self.rank, self.info.leader, self.ports.rendezvous, self.info.cluster_id,
                             lost_after_s=self.lost_after_s)
        return self.member.join(self.join_timeout_s)

    def start(self, plan: dict[str, Any], rl_command: tuple[list[str], dict[str, str]] | None = None) -> None:
        """(Rank 0.) Release every member with `plan`. RL: the Ray head starts first (with the
        trainer's environment, so Ray workers on this node see it), members join it at once."""
        assert self.leader is not None
        if rl_command is not None:
            argv, env = rl_command
            env = with_sidecar_port(dict(env), self.sandbox_url_var, self.ports.sidecar_offset)
            self.ray = RayNode(self.info, self.ports, {**os.environ, **env}, self.live_log("ray-head.log"),
                               ray_cpu_resources(argv, env))
            self.ray.start()
        self.leader.start(plan)

    # ----------------------------------------------------------------- commands

    def command(self, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """This node's version of a rendered training command."""
        env = with_sidecar_port(env, self.sandbox_url_var, self.ports.sidecar_offset)
        if is_torchrun(argv):
            return torchrun_argv(argv, self.info, self.ports), env
        if not is_rl_trainer(argv):
            return argv, env
        if self.is_leader:
            assert self.ray is not None, "the Ray head starts before the plan is sent"
            if not self.ray.alive():
                raise ClusterError(f"the Ray head on rank 0 exited:\n{self.ray.log_tail()}")
            self.ray.wait_for_ranks(self.nodes, self.join_timeout_s)
            return argv, {**env, "RAY_ADDRESS": self.ray.address}
        # a member's part of RL is its Ray node, in the foreground until rank 0 is done
        temp = ray_temp_dir(self.info, self.ports)
        Path(temp).mkdir(parents=True, exist_ok=True)
        start = ray_start_argv(self.info, self.ports, temp, ray_cpu_resources(argv, env))
        root = package_root()
        path = env.get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")
        node_env = {**env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": root + (os.pathsep + path if path else "")}
        return [sys.executable, "-m", "ray.scripts.scripts", *start[1:]], node_env

    def interrupt(self) -> str:
        """Why this node must stop its command now ("" to go on)."""
        if self.leader is not None:
            lost = self.leader.lost()
            if lost:
                return (f"{ranks_text(lost)} of the cluster was lost mid-run ({self.leader.lost_reason()}); "
                        "stopping so the whole cluster restarts")
            if self.ray is not None and not self.ray.alive():
                return "the Ray head on rank 0 exited"
        if self.member is not None and self.member.ended():
            if not self.member.leader_lost:
                return "rank 0 ended"
            silent = self.member.leader_silent_s
            return "rank 0 was lost" + (
                f" (no heartbeat for {silent:.0f} s, bound {self.lost_after_s:g} s)" if silent is not None else "")
        return ""

    def follows_leader(self, argv: list[str]) -> bool:
        """A member's command that only ends when rank 0 says so (its Ray node)."""
        return not self.is_leader and "ray.scripts.scripts" in argv

    # ----------------------------------------------------------------- end

    def leader_status(self, timeout_s: float = COMMIT_WAIT_S) -> str | None:
        """(Member.) How rank 0 ended its commands, waiting for it (bounded); None when rank 0
        was lost or did not say in time."""
        assert self.member is not None
        self.member.wait_ended(timeout_s)
        return self.member.done_status

    def member_outcome(self) -> str:
        """(Member.) How rank 0 ended its commands; raises when rank 0 was lost."""
        status = self.leader_status()
        if status is None:
            raise ClusterError(f"rank {self.rank}: rank 0 was lost mid-run; the whole cluster restarts")
        return status

    def confirm_committed(self) -> None:
        if self.member is not None:
            self.member.confirm_committed()

    def finish(self, status: str) -> None:
        """(Rank 0.) Members commit their shards before rank 0 reports the result."""
        if self.leader is None:
            return
        missing = self.leader.finish(status, COMMIT_WAIT_S)
        if missing and status == "finished":
            raise ClusterError(
                f"{ranks_text(missing)} did not confirm committing its checkpoint shards; "
                "the stage's last checkpoint may be incomplete and is judged on the volume"
            )

    def liveness(self) -> dict[str, dict[str, Any]]:
        return self.leader.liveness() if self.leader is not None else {}

    def close(self) -> None:
        if self.ray is not None:
            self.ray.stop()
        if self.leader is not None:
            self.leader.close()
        if self.member is not None:
            self.member.close()

