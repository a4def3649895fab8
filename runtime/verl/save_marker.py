"""Completion markers for verl's checkpoints. Listed in `VERL_USE_EXTERNAL_MODULES`, so
`import verl` imports it in every process of an SFT or RL run.

verl writes a checkpoint from many processes and marks it with its tracker file only; a
save of `global_step_N` over an older copy that dies between shards leaves old and new
shards side by side with every file present. This module wraps the one function of each
trainer that saves a whole checkpoint:

- SFT: `CheckpointHandler.save_checkpoint(step)` (every rank calls it; it ends with a
  barrier, so when it returns on rank 0 every rank's shards are on disk);
- RL: `RayPPOTrainer._save_checkpoint()` (v0) and `PPOTrainer._save_checkpoint()` (v1), in
  the driver; the worker-group save they call returns when every rank finished.

Around the original: the old marker is removed before anything of the save is written
(SFT: by rank 0, then a barrier, so no rank writes a shard while a stale marker stands), and
rank 0 / the driver writes `global_step_N/retool_complete.json` after the original returned, naming
the step, the world size and the run directory's restart identity (runtime.checkpoints
judges it). The marker lands after verl's tracker file (verl writes that inside the same
function); a save killed between the two leaves step N unmarked, so it is skipped and the
previous checkpoint resumed.

Only rank 0 (or the driver) ever touches the marker. On a Modal cluster each node writes to
its own view of the volume and the last commit of a file wins: a member that removed the
marker and committed after rank 0 would delete the marker rank 0 wrote.

verl imports a trainer module after this one runs (or, in a process that never trains,
not at all), so each wrapper is applied when its module is first imported, by a meta path
finder; a module already imported is wrapped at once. Only the standard library is
imported here at import time.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

WRAPPED = "__retool_save_marker__"


def _markers() -> Any:
    from runtime import checkpoints  # lazy: verl is still importing when this module loads

    return checkpoints


def _mark(default_local_dir: str, step: int, world_size: int) -> None:
    ck = _markers()
    step_dir = os.path.join(default_local_dir, f"global_step_{step}")
    ck.write_complete(step_dir, step, world_size, ck.restart_id_of(default_local_dir), now=time.time())


def _sft_save(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def save_checkpoint(self: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        if self.rank == 0:
            _markers().clear_complete(os.path.join(self.default_local_dir, f"global_step_{step}"))
        _sft_barrier()  # no rank writes a shard before the stale marker is gone
        result = original(self, step, *args, **kwargs)
        if self.rank == 0:
            _mark(self.default_local_dir, step, _sft_world_size())
        return result

    setattr(save_checkpoint, WRAPPED, True)
    return save_checkpoint


def _sft_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _sft_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rl_save(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _save_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        root, step = str(self.config.trainer.default_local_dir), int(self.global_steps)
        _markers().clear_complete(os.path.join(root, f"global_step_{step}"))
        result = original(self, *args, **kwargs)
        checkpoint_cfg = self.config.actor_rollout_ref.actor.get("checkpoint", {}) or {}
        if not checkpoint_cfg.get("async_save", False):  # an async save is not finished here
            _mark(root, step, int(self.actor_rollout_wg.world_size))
        return result

    setattr(_save_checkpoint, WRAPPED, True)
    return _save_checkpoint


# module -> (class, method, wrapper factory)
TARGETS: dict[str, tuple[str, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = {
    "verl.utils.checkpoint.checkpoint_handler": ("CheckpointHandler", "save_checkpoint", _sft_save),
    "verl.trainer.ppo.ray_trainer": ("RayPPOTrainer", "_save_checkpoint", _rl_save),
    "verl.trainer.ppo.v1.trainer_base": ("PPOTrainer", "_save_checkpoint", _rl_save),
}


def wrap(module: ModuleType) -> None:
    """Wrap the save method of `module`'s trainer class (once)."""
    cls_name, method, factory = TARGETS[module.__name__]
    cls = getattr(module, cls_name, None)
    original = getattr(cls, method, None) if cls is not None else None
    if original is None or getattr(original, WRAPPED, False):
        return
    setattr(cls, method, factory(original))


class _WrapOnLoad(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        wrap(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... (tracebacks, inspect)
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the other finders find a target module, then wraps it
    after it has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WrapOnLoad(spec.loader)
                return spec
        return None


def install() -> None:
    for name in TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            wrap(module)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
