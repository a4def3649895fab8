"""A verl platform for machines without an accelerator (verl 0.9.1 ships none).

Loaded by verl itself: `VERL_USE_EXTERNAL_MODULES=runtime.verl.cpu_platform` makes `import verl`
import this module in every process (torchrun ranks, Ray workers), and `VERL_PLATFORM=cpu`
selects the platform registered here. Nothing in verl's files is changed.

What verl needs from a platform on CPU:
- device name "cpu" (tensors go to `get_device_id()`, so the current device is the string
  "cpu", never an index that torch would read as `cuda:0`);
- a device module answering verl's `torch.cuda`-style calls (memory statistics, caches,
  RNG state, streams) — `torch.cpu` has some of them; `CpuDeviceModule` adds the rest;
- gloo as the collective backend. verl builds `cpu:gloo,<device>:<backend>`, which torch
  rejects when both halves name `cpu`; `_patch_init_process_group` collapses that one
  string to plain `gloo` and leaves every other backend string alone.

The launch side (runtime.verl.common.base_env, runtime.verl.sft) also sets
`VERL_ENGINE_DEVICE=cuda` (verl registers its FSDP engine under "cuda" only; the engine
then runs on whatever `trainer.device` says), `trainer.device=cpu`, `engine.strategy=fsdp2`
and sdpa attention. Ray-facing answers stay CUDA's: the RL launch declares fake GPUs to Ray.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
import torch.distributed
from verl.plugin.platform import PlatformBase, PlatformRegistry

PLATFORM_NAME = "cpu"  # what runtime.verl.common renders as VERL_PLATFORM (a test selects it with that env)


def _meminfo_bytes() -> tuple[int, int]:
    """(available, total) system memory in bytes, from /proc/meminfo (0, 0 if unreadable)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    fields[key] = int(parts[0]) * 1024
    except OSError:
        return 0, 0
    return fields.get("MemAvailable", 0), fields.get("MemTotal", 0)


def _rss_bytes() -> int:
    """Resident memory of this process (what "allocated" means on CPU)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class CpuDeviceModule(ModuleType):
    """`torch.cpu` plus the `torch.cuda` functions verl calls, answered for the host."""

    def __init__(self) -> None:
        super().__init__("retool_cpu_device")
        self._peak = 0

    def __getattr__(self, name: str) -> Any:
        # Anything not defined here comes from torch.cpu (Stream, Event, stream, ...).
        return getattr(torch.cpu, name)

    # device management
    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device: Any) -> None:
        return None

    def synchronize(self, device: Any = None) -> None:
        return None

    def get_device_name(self, device: Any = None) -> str:
        return "cpu"

    # memory
    def empty_cache(self) -> None:
        return None

    def ipc_collect(self) -> None:
        return None

    def set_per_process_memory_fraction(self, fraction: float, device: Any = None) -> None:
        return None

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return _meminfo_bytes()

    def memory_allocated(self, device: Any = None) -> int:
        rss = _rss_bytes()
        self._peak = max(self._peak, rss)
        return rss

    def memory_reserved(self, device: Any = None) -> int:
        return self.memory_allocated(device)

    def max_memory_allocated(self, device: Any = None) -> int:
        return max(self._peak, self.memory_allocated(device))

    def max_memory_reserved(self, device: Any = None) -> int:
        return self.max_memory_allocated(device)

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self._peak = 0

    # RNG: the host generator is the device generator
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)


_DEVICE_MODULE = CpuDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform whose device is the host CPU and whose collectives use gloo."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Only ever chosen explicitly through VERL_PLATFORM, never by auto-detection.
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:  # type: ignore[override]
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str) -> Iterator[None]:
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    # Ray: verl places one worker per "GPU"; on CPU the RL launch declares fake GPUs to Ray
    # (`ray_init.num_gpus`), so the Ray-facing answers stay CUDA's.
    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def normalize_backend(backend: str | None) -> str | None:
    """Collapse a backend string whose device types repeat (`cpu:gloo,cpu:gloo`) to `gloo`.

    torch rejects a device type named twice; verl builds exactly that string when the
    device is the CPU. Other strings pass through unchanged."""
    if not backend or "," not in backend:
        return backend
    pairs = [part.split(":", 1) for part in backend.split(",")]
    if all(len(p) == 2 for p in pairs) and {p[0] for p in pairs} == {"cpu"} and {p[1] for p in pairs} == {"gloo"}:
        return "gloo"
    return backend


def _patch_init_process_group() -> None:
    original: Callable[..., Any] = torch.distributed.init_process_group
    if getattr(original, "_retool_cpu", False):
        return

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        if "backend" in kwargs:
            kwargs["backend"] = normalize_backend(kwargs["backend"])
        elif args:
            args = (normalize_backend(args[0]), *args[1:])
        return original(*args, **kwargs)

    init_process_group._retool_cpu = True  # type: ignore[attr-defined]
    torch.distributed.init_process_group = init_process_group


_patch_init_process_group()
