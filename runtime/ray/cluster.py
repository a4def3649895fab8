"""What the Ray cluster has, for `retool plan` and `retool doctor`: its Ray version, its
alive nodes and their resources (Ray's state API over the dashboard address), whether a
stage's GPUs fit, and how many GPUs are free now.

`python -m runtime.ray.cluster DIR NODE_ID...` is the storage probe doctor submits as a
job: one task pinned to each node writes `DIR/<node id>`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.spec import RLStage, Stage
from runtime.verl.common import world

RAY_ACCELERATORS = {"A100-80GB": "A100-80G", "A100-40GB": "A100-40G", "H100!": "H100"}
TIMEOUT_S = 10
PLAN_TIMEOUT_S = 3  # plan waits this long at most for the cluster's free GPUs


def accelerator(gpu: str) -> str:
    """Ray's name for a spec GPU type (its `accelerator_type:<name>` node resource)."""
    return RAY_ACCELERATORS.get(gpu, gpu)


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def gpu_types(self) -> list[str]:
        return sorted(k.split(":", 1)[1] for k in self.resources if k.startswith("accelerator_type:"))


def versions(address: str) -> tuple[str, str]:
    """(this machine's Ray, the cluster's Ray), from the dashboard's /api/version."""
    import httpx
    import ray

    reply = httpx.get(address.rstrip("/") + "/api/version", timeout=TIMEOUT_S)
    reply.raise_for_status()
    return str(ray.__version__), str(reply.json().get("ray_version", "unknown"))


def nodes(address: str) -> list[Node]:
    from ray.util.state import list_nodes

    alive = list_nodes(address=address, filters=[("state", "=", "ALIVE")], timeout=TIMEOUT_S, detail=True)
    return [Node(node_id=n.node_id, ip=n.node_ip, resources=dict(n.resources_total or {})) for n in alive]


def free_gpus(address: str) -> tuple[int, int]:
    """(free, total) GPUs of the cluster now, from the dashboard's cluster status."""
    import httpx

    reply = httpx.get(address.rstrip("/") + "/api/cluster_status", timeout=PLAN_TIMEOUT_S)
    reply.raise_for_status()
    usage = ((reply.json().get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport", {}).get("usage", {})
    used, total = usage.get("GPU", [0, 0])
    return int(total - used), int(total)


def pending_placement(address: str, job_id: str) -> str | None:
    """Why a running job waits, when it does: the placement groups it created that Ray cannot
    place yet (verl's resource pools, a multi-node SFT's bundles), or None. Ray's own state
    API; None too when the cluster cannot say (the poll goes on without it)."""
    from ray.util.state import list_placement_groups

    try:
        pending = list_placement_groups(
            address=address, filters=[("state", "=", "PENDING"), ("creator_job_id", "=", job_id)],
            detail=True, timeout=PLAN_TIMEOUT_S,
        )
    except Exception:  # noqa: BLE001 - Ray's state API raises its own and transport errors; the poll must not fail
        return None
    if not pending:
        return None
    shapes: dict[str, int] = {}
    for pg in pending:
        for bundle in pg.bundles or []:
            res = bundle.get("unit_resources") or {}
            shape = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"
            shapes[shape] = shapes.get(shape, 0) + 1
    why = sorted({str((pg.stats or {}).get("scheduling_state") or "pending") for pg in pending})
    asks = " + ".join(f"{n} x {shape}" for shape, n in shapes.items())
    return (f"waits for Ray to place {len(pending)} placement group(s): {asks} ({', '.join(why)}); "
            "the cluster has no room for them yet")


def describe(found: list[Node]) -> str:
    if not found:
        return "no alive node"
    parts = [f"{n.ip} ({n.gpus} GPU{' ' + '/'.join(n.gpu_types) if n.gpu_types else ''}, "
             f"{n.resources.get('CPU', 0):g} CPU)" for n in found]
    return f"{len(found)} node(s): " + ", ".join(parts)


@dataclass(frozen=True)
class NodeShare:
    """What one node gives a stage's trainer: a single-node job's entrypoint asks Ray for it
    (runtime.ray.backend.entrypoint_resources), a multi-node job's bundles too (node_bundle)."""

    cpus: float | int  # the spec's `cpu` may be fractional
    gpus: int
    memory_bytes: int
    accelerator: str | None  # Ray's `accelerator_type:<name>` resource, asked for in a token amount


def node_share(stage: Stage) -> NodeShare:
    r = stage.resources
    return NodeShare(
        cpus=r.cpu or (r.processes_per_node or r.gpus_per_node or 1), gpus=r.gpus_per_node,
        memory_bytes=(r.memory_mb or 0) * 2**20, accelerator=f"accelerator_type:{accelerator(r.gpu)}" if r.gpu else None,
    )


def node_bundle(stage: Stage) -> dict[str, float]:
    """One node's share of a multi-node stage, as a placement group bundle."""
    share = node_share(stage)
    bundle: dict[str, float] = {"CPU": float(share.cpus)}
    if share.gpus:
        bundle["GPU"] = float(share.gpus)
    if share.memory_bytes:
        bundle["memory"] = float(share.memory_bytes)
    if share.accelerator:
        bundle[share.accelerator] = 0.001
    return bundle


def need_text(stage: Stage) -> str:
    r = stage.resources
    if not r.gpu:
        return f"{r.nodes} node(s) on CPU"
    return f"{r.nodes} node(s) x {r.gpus_per_node} {r.gpu}"


def fit_problem(stage: Stage, found: list[Node]) -> str | None:
    """Why the cluster can never run `stage` (too few nodes with its GPUs, or, for a stage
    across nodes, with its CPUs per node), or None."""
    r = stage.resources
    if not r.gpu:
        if len(found) < r.nodes:
            return f"needs {r.nodes} node(s), the cluster has {len(found)}"
        if isinstance(stage, RLStage):
            # On CPU verl still places each trainer rank on a "GPU" resource, and refuses to
            # start when the cluster declares fewer than trainer.nnodes x n_gpus_per_node.
            _, ranks = world(stage)
            declaring = [n for n in found if n.gpus >= ranks]
            if len(declaring) < r.nodes:
                return (f"needs {r.nodes} node(s) declaring {ranks} GPU resource(s) each (on CPU verl places each "
                        f"trainer rank on one: `ray start --num-gpus={ranks}`); nodes with that many: "
                        f"{len(declaring)} ({describe(found)})")
        elif r.nodes > 1:
            cpus = node_bundle(stage)["CPU"]
            roomy = [n for n in found if n.resources.get("CPU", 0) >= cpus]
            if len(roomy) < r.nodes:
                return (f"needs {r.nodes} distinct nodes with {cpus:g} CPU each (one rank per node); "
                        f"nodes with that many: {len(roomy)} ({describe(found)})")
        return None
    want = accelerator(r.gpu)
    fitting = [n for n in found if n.gpus >= r.gpus_per_node and (not n.gpu_types or want in n.gpu_types)]
    if len(fitting) >= r.nodes:
        return None
    return f"needs {need_text(stage)}; nodes with that many {want}: {len(fitting)} ({describe(found)})"


def probe_storage(directory: Path, node_ids: list[str]) -> None:
    """Write `directory/<node id>` from a task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def touch(path: str) -> None:
        Path(path).write_text("ok\n")

    ray.init()
    ray.get([
        touch.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n, soft=False)).remote(
            str(directory / n)
        ) for n in node_ids
    ])


if __name__ == "__main__":
    probe_storage(Path(sys.argv[1]), sys.argv[2:])
