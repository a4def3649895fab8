"""The worker-side half: verl builds one `TransformersRolloutAdapter` per trainer rank
(`get_rollout_class("transformers", "async")`) and drives weight sync through it.

On a sync, verl's engine worker hands every rank the same generator of full `(hf_name,
tensor)` pairs; producing them involves collectives (FSDP all-gathers), so every rank must
drain it. The replica's leader rank (rollout rank 0) keeps a host copy and pushes the whole
state dict to its server actor in one call; the others discard what they read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import ray
import torch

from runtime.verl.rollout import server_name, weight_sync_enabled
from verl.workers.rollout.base import BaseRollout

logger = logging.getLogger(__name__)


class TransformersRolloutAdapter(BaseRollout):
    def __init__(self, config: Any, model_config: Any, device_mesh: Any = None, replica_rank: int = -1, **_: Any):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        per_replica = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // per_replica if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % per_replica
        self.is_leader_rank = self.rollout_rank == 0
        self.sync_weights = weight_sync_enabled()
        self._server: ray.actor.ActorHandle | None = None
        if self.is_leader_rank and not self.sync_weights:
            logger.warning("RETOOL_ROLLOUT_WEIGHT_SYNC=0: the rollout keeps its initial weights (diagnostics only)")

    def _handle(self) -> ray.actor.ActorHandle:
        # Looked up lazily: the server is launched after the trainer ranks.
        if self._server is None:
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        if self.is_leader_rank:
            await self._handle().wake_up.remote(tags=tags)

    async def release(self) -> None:
        if self.is_leader_rank:
            await self._handle().sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights: Any, wire_format: str = "named_tensors", **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the transformers rollout takes full named tensors, not {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError(
                "the transformers rollout loads merged weights only: set actor_rollout_ref.model.lora.merge=true"
            )
        keep = self.is_leader_rank and self.sync_weights
        state: dict[str, torch.Tensor] = {}
        async for name, tensor in _pairs(weights):
            if keep:
                # The producer may reuse its buffers: take a host copy now.
                state[name] = tensor.detach().to("cpu", copy=True)
        if not self.is_leader_rank:
            return
        global_steps = kwargs.get("global_steps")
        if keep:
            count = await self._handle().update_weights.remote(state, global_steps)
            logger.info("rollout replica %d: %d tensors synced (step %s)", self.replica_rank, count, global_steps)
        elif global_steps is not None:
            await self._handle().set_global_steps.remote(global_steps)


async def _pairs(weights: Iterator[tuple[str, torch.Tensor]] | AsyncIterator[tuple[str, torch.Tensor]]):
    """Iterate a sync or async generator of (name, tensor) pairs."""
    if hasattr(weights, "__aiter__"):
        async for item in weights:
            yield item
    else:
        for item in weights:
            yield item
