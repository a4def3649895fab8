"""A rollout engine for verl 0.9.1 built on transformers, for machines without vLLM/SGLang.

verl's async agent loop talks to a rollout *server* (token ids in, token ids and log-probs
out) and keeps it in step with the actor through a worker-side *adapter*. This package
provides both and registers them through verl's own extension points, from the module
`runtime.verl.rollout.plugin` listed in `VERL_USE_EXTERNAL_MODULES` (verl imports it in every
process); nothing in verl is patched:

- `runtime.verl.rollout.sampling`  per-row temperature / top-k / top-p / repetition penalty (torch);
- `runtime.verl.rollout.engine`    batched, KV-cached decoding with a transformers model;
- `runtime.verl.rollout.server`    the Ray actor verl's LLMServerClient calls (`generate(...)`);
- `runtime.verl.rollout.replica`   `RolloutReplica` that launches it next to the trainer ranks;
- `runtime.verl.rollout.adapter`   `BaseRollout` on each trainer rank: drains the actor's weights,
                               the leader rank pushes them to the server;
- `runtime.verl.rollout.plugin`    the registrations.

Select it with `actor_rollout_ref.rollout.name=transformers`. Setting
`RETOOL_ROLLOUT_WEIGHT_SYNC=0` keeps the server on its initial weights (a diagnostic: verl's
rollout-vs-actor probability difference then grows as the actor trains).
"""

from __future__ import annotations

NAME = "transformers"
PLUGIN_MODULE = "runtime.verl.rollout.plugin"
ENV_WEIGHT_SYNC = "RETOOL_ROLLOUT_WEIGHT_SYNC"  # "0" disables weight sync (diagnostics only)
ENV_DEVICE = "RETOOL_ROLLOUT_DEVICE"  # force "cpu" / "cuda"; default: cuda when available
ENV_DTYPE = "RETOOL_ROLLOUT_DTYPE"  # force a torch dtype name; default: see engine.default_dtype


def server_name(replica_rank: int) -> str:
    """The Ray actor name of a replica's server (the adapter finds it by this name)."""
    return f"{NAME}_server_{replica_rank}_0"


def weight_sync_enabled(environ: dict[str, str] | None = None) -> bool:
    import os

    value = (environ if environ is not None else os.environ).get(ENV_WEIGHT_SYNC, "1")
    return value.strip().lower() not in {"0", "false", "no", "off"}
