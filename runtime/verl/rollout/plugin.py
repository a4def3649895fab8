"""Registers the transformers rollout with verl. Listed in `VERL_USE_EXTERNAL_MODULES`, so
`import verl` imports it in every process (trainer ranks, task runner, agent-loop workers).

- worker side: `_ROLLOUT_REGISTRY` maps `(name, mode)` to a class path that
  `get_rollout_class` imports; verl exposes no function to add to it, so the entry is set on
  the dict directly (the only non-public name used);
- replica side: `RolloutReplicaRegistry.register(name, loader)`, verl's public hook.

Importing the adapter and replica modules is deferred to when verl asks for them.
"""

from __future__ import annotations

from runtime.verl.rollout import NAME
from verl.workers.rollout import base as _rollout_base
from verl.workers.rollout.replica import RolloutReplicaRegistry

ADAPTER_CLASS = "runtime.verl.rollout.adapter.TransformersRolloutAdapter"


def _load_replica() -> type:
    from runtime.verl.rollout.replica import TransformersReplica

    return TransformersReplica


_rollout_base._ROLLOUT_REGISTRY[(NAME, "async")] = ADAPTER_CLASS
RolloutReplicaRegistry.register(NAME, _load_replica)
