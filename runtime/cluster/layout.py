"""Ranks, addresses, ports and command lines of a multi-node stage (pure functions).

Ports: every node uses the same port plan, from `RETOOL_CLUSTER_PORT_BASE` (default
29400). Nodes on one host (the loopback rehearsal: every "container" has address
127.0.0.1) would collide, so there each rank's per-node ports, Ray temp dir and sandbox
sidecar port are shifted by its rank; on separate machines (Modal) every node uses the
same numbers.
"""

from __future__ import annotations

import json
import os
from pydantic import BaseModel, ConfigDict, Field

PORT_BASE_ENV = "RETOOL_CLUSTER_PORT_BASE"
DEFAULT_PORT_BASE = 29400
RANK_RESOURCE = "retool_rank_{}"  # a Ray custom resource on each node: tells which rank joined
TORCHRUN = ("torchrun", "torch.distributed.run")
# torchrun options the cluster sets itself (a single-node render may carry some of them)
_RENDEZVOUS_OPTS = ("--standalone", "--node_rank", "--node-rank", "--master_addr", "--master-addr",
                    "--master_port", "--master-port", "--rdzv_backend", "--rdzv-backend", "--rdzv_endpoint",
                    "--rdzv-endpoint", "--rdzv_id", "--rdzv-id", "--nnodes")


class ClusterError(RuntimeError):
    """The cluster cannot train as one unit (a missing, late, lost or foreign rank)."""


class ClusterInfo(BaseModel):
    """What a container knows about its cluster (Modal: `modal.experimental.get_cluster_info()`)."""

    model_config = ConfigDict(frozen=True)

    rank: int
    cluster_id: str = ""  # one per cluster start: a retried cluster gets a new one
    ips: list[str] = Field(default_factory=list)  # every container's address, by rank (IPv6 on Modal)
    ipv4_ips: list[str] = Field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        """IPv4 when every rank has one (Ray's tooling is happiest there), else IPv6."""
        if self.ipv4_ips and len(self.ipv4_ips) == len(self.ips) and all(self.ipv4_ips):
            return list(self.ipv4_ips)
        return list(self.ips)

    @property
    def size(self) -> int:
        return len(self.ips)

    @property
    def shared_host(self) -> bool:
        addrs = self.addresses
        return len(set(addrs)) < len(addrs)

    @property
    def leader(self) -> str:
        return self.addresses[0]

    @property
    def own(self) -> str:
        return self.addresses[self.rank]


def cluster_problem(info: ClusterInfo, nodes: int) -> str:
    """Why this container must not train ("" when its cluster is whole)."""
    if info.size != nodes:
        return (f"the stage needs {nodes} nodes but this cluster has {info.size} container(s) "
                f"({', '.join(info.ips) or 'none'}); a partial cluster never trains")
    if not 0 <= info.rank < nodes:
        return f"container rank {info.rank} is outside 0..{nodes - 1}"
    if not all(info.addresses):
        return "the cluster info lists a container without an address"
    return ""


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class NodePorts(BaseModel):
    """The ports one node uses (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    rendezvous: int  # the leader's control channel
    torch_master: int  # torchrun's rendezvous store on rank 0
    ray_gcs: int
    ray_client: int
    ray_dashboard: int
    node_manager: int
    object_manager: int
    agent_listen: int
    agent_grpc: int
    runtime_env_agent: int
    metrics: int
    min_worker: int
    max_worker: int
    sidecar_offset: int = 0  # added to the sandbox sidecar's port


def port_base(env: dict[str, str] | None = None) -> int:
    raw = (env if env is not None else os.environ).get(PORT_BASE_ENV, "")
    try:
        return int(raw) if raw else DEFAULT_PORT_BASE
    except ValueError:
        raise ClusterError(f"{PORT_BASE_ENV}={raw!r} is not a port number") from None


def node_ports(rank: int, *, shared_host: bool, base: int = DEFAULT_PORT_BASE) -> NodePorts:
    slot = rank if shared_host else 0
    per_node = base + 20 + 10 * slot
    workers = base + 600 + 200 * slot
    return NodePorts(
        rendezvous=base, torch_master=base + 1, ray_gcs=base + 2, ray_client=base + 3, ray_dashboard=base + 4,
        node_manager=per_node, object_manager=per_node + 1, agent_listen=per_node + 2, agent_grpc=per_node + 3,
        runtime_env_agent=per_node + 4, metrics=per_node + 5, min_worker=workers, max_worker=workers + 199,
        sidecar_offset=slot,
    )


# --------------------------------------------------------------------------- SFT: torchrun


def is_torchrun(argv: list[str]) -> bool:
    if not argv:
        return False
    if os.path.basename(argv[0]) == "torchrun":
        return True
    return len(argv) > 2 and argv[1] == "-m" and argv[2] == "torch.distributed.run"


def torchrun_argv(argv: list[str], info: ClusterInfo, ports: NodePorts) -> list[str]:
    """The rendered `torchrun --nnodes=N --nproc_per_node=P -m …` with this node's rendezvous:
    `--node_rank`, rank 0's address and port (torchrun's static rendezvous: rank 0 hosts the store)."""
    head = 1 if os.path.basename(argv[0]) == "torchrun" else 3
    opts, rest = [], list(argv[head:])
    while rest and rest[0].startswith("--"):
        opt = rest.pop(0)
        name = opt.split("=", 1)[0]
        if name in _RENDEZVOUS_OPTS:
            if "=" not in opt and name != "--standalone" and rest and not rest[0].startswith("-"):
                rest.pop(0)  # `--opt value` form
            continue
        opts.append(opt)
    rendezvous = [f"--nnodes={info.size}", f"--node_rank={info.rank}", f"--master_addr={info.leader}",
                  f"--master_port={ports.torch_master}"]
    return [*argv[:head], *rendezvous, *opts, *rest]


# --------------------------------------------------------------------------- RL: Ray


def ray_address(info: ClusterInfo, ports: NodePorts) -> str:
    return f"{bracket(info.leader)}:{ports.ray_gcs}"


def ray_cpu_resources(argv: list[str], env: dict[str, str]) -> tuple[int, int] | None:
    """(num_cpus, num_gpus) to declare on a CPU node (verl places each trainer rank on a
    "GPU" resource; see runtime.verl.rl), None on a GPU node (Ray detects the GPUs)."""
    if env.get("VERL_PLATFORM") != "cpu":
        return None
    nproc = 1
    for arg in argv:
        if arg.startswith("trainer.n_gpus_per_node="):
            nproc = int(arg.split("=", 1)[1])
    return 3 * nproc + 8, nproc


def ray_start_argv(info: ClusterInfo, ports: NodePorts, temp_dir: str, cpu: tuple[int, int] | None) -> list[str]:
    """`ray start` for this node: the head on rank 0, a joiner elsewhere; `--block` keeps it
    in the foreground (its process group is the node: stopping it stops every Ray process)."""
    argv = ["ray", "start", "--block", f"--node-ip-address={info.own}", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", f"--resources={json.dumps({RANK_RESOURCE.format(info.rank): 1})}",
            f"--node-manager-port={ports.node_manager}", f"--object-manager-port={ports.object_manager}",
            f"--dashboard-agent-listen-port={ports.agent_listen}", f"--dashboard-agent-grpc-port={ports.agent_grpc}",
            f"--runtime-env-agent-port={ports.runtime_env_agent}", f"--metrics-export-port={ports.metrics}",
            f"--min-worker-port={ports.min_worker}", f"--max-worker-port={ports.max_worker}"]
    if info.rank == 0:
        argv += ["--head", f"--port={ports.ray_gcs}", f"--ray-client-server-port={ports.ray_client}",
                 "--include-dashboard=false", f"--dashboard-port={ports.ray_dashboard}"]
    else:
        argv += [f"--address={ray_address(info, ports)}"]
    if cpu is not None:
        argv += [f"--num-cpus={cpu[0]}", f"--num-gpus={cpu[1]}"]
    return argv


def ray_temp_dir(info: ClusterInfo, ports: NodePorts) -> str:
    """Short (Ray's socket paths must fit 107 bytes) and distinct per node on a shared host."""
    return f"/tmp/retool-ray-{ports.rendezvous}-{info.rank}"


def with_sidecar_port(env: dict[str, str], var: str, offset: int) -> dict[str, str]:
    """This node's sandbox sidecar URL (a shifted port on a shared host)."""
    url = env.get(var)
    if not url or not offset:
        return dict(env)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        return dict(env)
    netloc = f"{parts.hostname}:{parts.port + offset}"
    return {**env, var: urlunsplit(parts._replace(netloc=netloc))}
