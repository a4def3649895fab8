"""The replica-side half: verl's `LLMServerManager` builds one `TransformersReplica` per
rollout replica (through `RolloutReplicaRegistry`) and calls `launch_servers()` once its
trainer ranks (`self.workers`) exist.

The server is a single Ray actor per replica, named `transformers_server_<replica>_0` so the
adapter on the replica's leader rank can find it, pinned to the node of the replica's first
rank. On a CUDA machine it is given that rank's GPU (Ray would otherwise hide all GPUs from
an actor that reserves none); it reserves no Ray resources itself, so it fits beside the
trainer on any machine.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from runtime.verl.rollout import server_name
from runtime.verl.rollout.server import TransformersServer
from verl.workers.rollout.replica import RolloutReplica

logger = logging.getLogger(__name__)


def _placement_of_worker(_: Any) -> tuple[str, str | None, bool]:
    """(node id, the GPU Ray assigned, CUDA usable) as seen inside a trainer rank."""
    import torch

    ctx = ray.get_runtime_context()
    gpus = ctx.get_accelerator_ids().get("GPU") or []
    return ctx.get_node_id(), (str(gpus[0]) if gpus else None), torch.cuda.is_available()


class TransformersReplica(RolloutReplica):
    async def launch_servers(self) -> None:
        if self.workers:
            node_id, gpu, cuda = await self.workers[0].__ray_call__.remote(_placement_of_worker)
        else:
            node_id, gpu, cuda = ray.get_runtime_context().get_node_id(), None, False
        env: dict[str, str] = {}
        if cuda and gpu is not None:
            # Share the replica's first GPU with its trainer rank (the server sleeps on the host
            # while the actor trains).
            env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": gpu}
        name = server_name(self.replica_rank)
        server = (
            ray.remote(TransformersServer)
            .options(
                name=name,
                num_cpus=0,
                max_concurrency=self.max_concurrency,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                runtime_env={"env_vars": env} if env else None,
            )
            .remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        )
        if not isinstance(server, ActorHandle):  # ray types `.remote()` as a handle or the class itself
            raise TypeError(f"ray returned {type(server).__name__} for the rollout server, not an actor handle")
        info = await server.ready.remote()  # surfaces model-loading errors here, not mid-rollout
        logger.info("rollout replica %d: server %s ready %s", self.replica_rank, name, info)
        self.servers = [server]
        self._server_handle = server
        self._server_address = name  # a load-balancer key; there is no HTTP endpoint

    def rollout_worker_use_gpu(self) -> bool:
        import torch

        return torch.cuda.is_available()
