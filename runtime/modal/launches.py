"""Launch keys: finding a stage's run again when the answer to its spawn was lost.

`Function.spawn` can start a call and still fail to answer in time (the adapter gives up
after its deadline, or the connection drops), so the call id never reaches the state.
Every launch therefore carries a key the next apply can find the call by, and no path
starts a second run of the same stage identity:

1. before spawning, the launch's intent (`launch_id`) is written to the stage's volume,
   `<stage>/<restart_id[:16]>/_retool/launch.json`;
2. the payload carries `LaunchKey(registry, key, launch_id)`: `key` is the stage identity
   (app, stage, restart identity), `registry` a Modal Dict;
3. the container registers `{launch_id, call_id, segment}` under `key` as the first thing it
   does (and the CLI does too once the spawn answers); each later segment updates it;
4. the next launch of the same identity first polls the registered call and the one in
   `run.json` and re-attaches to a running one; if the intent was never matched by a
   registration, the call may still wait for a GPU, so while the function has queued inputs
   or running containers the launch refuses (transient) instead of spawning again.

The Dict is only the rendezvous for that window: entries expire after 7 idle days, while
what lasts (`run.json`, checkpoints) is on the volume.
"""

from __future__ import annotations

import json
from pydantic import ValidationError

from runtime.modal.adapter import ModalAdapter
from runtime.modal.models import LaunchKey, Registration


def lookup(adapter: ModalAdapter, registry: str, key: str, *, env: str | None = None) -> Registration | None:
    """The call registered for a stage identity (ModalUnreachable when Modal cannot say)."""
    raw = adapter.dict_get(registry, key, env=env)
    if raw is None:
        return None
    try:
        return Registration.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


def register(adapter: ModalAdapter, launch: LaunchKey, call_id: str, segment: int, at: float,
             *, env: str | None = None) -> None:
    reg = Registration(launch_id=launch.launch_id, call_id=call_id, segment=segment, at=at)
    adapter.dict_put(launch.registry, launch.key, reg.model_dump_json(), env=env)

