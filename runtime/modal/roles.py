"""The role a stage container plays: Solo (a single-node stage), Leader (rank 0 of a
cluster) or Member (rank r > 0). Every role has the same methods, so
`runtime.modal.worker.ContainerSegment` runs one straight path and asks its role at each
point where the three differ; the cluster mechanics stay in `runtime.cluster.node`.

                  Solo               Leader (rank 0)                 Member (rank r)
    leads         yes: registers the launch, writes the run's files, hands over      no
    join          -                  waits for every rank            joins rank 0, gets its plan
    start         -                  releases the members (RL: Ray head first)       -
    command       as rendered        this node's version             this node's version (RL: its Ray node)
    deadline      the segment's      the segment's                   none: follows rank 0
    interrupt     never              a rank lost, the Ray head gone  rank 0 ended or was lost
    finish        -                  waits for every rank's commit   -
    leader's end  -                  -                               rank 0's outcome, after its own commit
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.records import RankLiveness

if TYPE_CHECKING:
    from runtime.cluster.layout import ClusterInfo
    from runtime.cluster.node import ClusterNode

Plan = dict[str, Any]  # what rank 0 sends every member: {"start_step", "any_ckpt"} or {"ended": status}
Command = tuple[list[str], dict[str, str]]


class Role(ABC):
    rank: int = 0
    leads: bool = True  # the one container of a call that registers it, writes its run files and hands over
    port_offset: int = 0  # nodes sharing a host keep their own sidecar ports
    name_suffix: str = ""  # in the sidecar's log name

    def join(self) -> Plan | None:
        """Meet the other containers; a member gets rank 0's plan (None: decide yourself)."""
        return None

    def start(self, plan: Plan, rl_command: Command | None) -> None:
        """Release the members with `plan` (RL: with the trainer's command for the Ray head)."""

    def command(self, argv: list[str], env: dict[str, str]) -> Command:
        """This container's version of a rendered training command."""
        return argv, env

    def deadline(self, own: float) -> float:
        """When this container stops its command to hand over (`own`: the segment's deadline)."""
        return own

    def interrupt(self) -> str:
        """Why this container must stop its command now ("" to go on)."""
        return ""

    def leader_ended(self) -> bool:
        """After a command failed: whether rank 0 had ended its commands (so this one stops with them)."""
        return False

    def finish(self, status: str) -> None:
        """Tell the members how the commands ended, and wait for their commits."""

    def leader_outcome(self) -> str | None:
        """A member's end: how rank 0 ended, once this rank's shards are committed
        (raises when rank 0 was lost). None for a role that leads."""
        return None

    def liveness(self) -> dict[str, RankLiveness] | None:
        """Every rank as this one sees it (for progress.json); None outside a cluster."""
        return None

    def close(self) -> None:
        """Stop what the role started (the rendezvous, the Ray head)."""


class Solo(Role):
    """A single-node stage: the container does everything itself."""


class _Clustered(Role, ABC):
    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.rank = node.rank
        self.port_offset = node.ports.sidecar_offset
        self.name_suffix = f"-rank-{node.rank}"

    @abstractmethod
    def join(self) -> Plan | None: ...

    def command(self, argv: list[str], env: dict[str, str]) -> Command:
        return self.node.command(argv, env)

    def interrupt(self) -> str:
        return self.node.interrupt()

    def close(self) -> None:
        self.node.close()


class Leader(_Clustered):
    """Rank 0 of a multi-node stage: leads the run and the other ranks."""

    def join(self) -> Plan | None:
        self.node.join()
        return None

    def start(self, plan: Plan, rl_command: Command | None) -> None:
        self.node.start(plan, rl_command=rl_command)

    def finish(self, status: str) -> None:
        self.node.finish(status)

    def liveness(self) -> dict[str, RankLiveness] | None:
        return {rank: RankLiveness.model_validate(seen) for rank, seen in self.node.liveness().items()}


class Member(_Clustered):
    """Rank r > 0: trains rank 0's plan and ends when rank 0 says so, never on its own clock."""

    leads = False

    def join(self) -> Plan | None:
        return self.node.join()

    def deadline(self, own: float) -> float:
        return float("inf")

    def leader_ended(self) -> bool:
        return self.node.leader_status() in ("finished", "deadline")

    def leader_outcome(self) -> str | None:
        outcome = self.node.member_outcome()  # rank 0 ended its commands (or was lost: raises)
        self.node.confirm_committed()  # this rank's shards are on the volume: rank 0 may report
        return outcome


def role_for(info_of: Callable[[], ClusterInfo], nodes: int, *, kind: str, run_dir: Path, join_timeout_s: float,
             sandbox_url_var: str, lost_after_s: float | None = None,
             live_log: Callable[[str], Path] | None = None) -> Role:
    """Solo for one node; otherwise this container's rank picks Leader or Member.
    `info_of` gives the cluster's `ClusterInfo` (asked only for a clustered call)."""
    if nodes <= 1:
        return Solo()
    from runtime.cluster.node import ClusterNode

    from runtime.cluster.rendezvous import LOST_AFTER_S

    node = ClusterNode(info_of(), nodes, kind=kind, run_dir=run_dir, join_timeout_s=join_timeout_s,
                       sandbox_url_var=sandbox_url_var, lost_after_s=lost_after_s or LOST_AFTER_S, live_log=live_log)
    return Leader(node) if node.is_leader else Member(node)
