"""Modal's per-function limits, checked here because Modal checks them only on its servers
(at deploy, when the function is created: one bad function fails the whole app).

Sources (Modal's documentation, read 2026-12):
- GPU types and counts, https://modal.com/docs/guide/gpu ("Specifying GPU type" /
  "Specifying GPU count"): T4, L4, A10, L40S, A100, A100-40GB, A100-80GB, RTX-PRO-6000,
  H100 / H100!, H200, B200 / B200+; "B200, H200, H100, A100, L4, T4 and L40S instances
  support up to 8 GPUs ... A10 instances support up to 4 GPUs". Modal treats A10G and A10
  alike ("Modal does not distinguish between A10G GPUs and A10s") and the client upper-cases
  the type before sending it (`modal._utils.function_utils.parse_gpu_config`), so names are
  case-insensitive.
- Timeout, https://modal.com/docs/guide/timeouts: "between 1 second and 24 hours", per attempt.
- Clusters, https://modal.com/docs/guide/multi-node-clusters: "Up to 32 nodes and 256 GPUs
  per cluster"; https://modal.com/docs/sdk/py/latest/clustered: "Each container must request
  all GPUs on its host (for example, gpu="H100:8"); CPU-only clusters are not supported".
- CPU and memory, https://modal.com/docs/guide/resources ("How much can I request?"): "a
  maximum is enforced at Function creation time ... Requests exceeding the maximum will be
  rejected with an InvalidError" -- the page publishes no number. `CPU_WARN_CORES` and
  `MEMORY_WARN_MIB` are therefore retool's own thresholds: above them plan and validate warn
  (the request may be refused at deploy), they never block.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

MAX_TIMEOUT_S = 24 * 3600
MAX_CLUSTER_NODES = 32
MAX_CLUSTER_GPUS = 256
CLUSTER_GPUS_PER_NODE = 8  # a clustered container takes every GPU of its host
CPU_WARN_CORES = 64.0  # not published by Modal: a warning threshold, see the module docstring
MEMORY_WARN_MIB = 336 * 1024  # idem

# Modal GPU type (upper-case) -> most GPUs of that type one container may request.
GPU_MAX_COUNT: dict[str, int] = {
    "T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
    "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8,
}

GPU_RE = re.compile(r"^(?P<type>[A-Za-z0-9+!-]+?)(:(?P<count>[^:]*))?$")


class GpuRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: str  # upper-cased, as the client sends it
    count: int


def parse_gpu(value: str) -> GpuRequest:
    """`"h100:8"` -> (H100, 8), the way the client parses it; ValueError for a bad count."""
    m = GPU_RE.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a GPU string (TYPE or TYPE:COUNT)")
    count_text = m.group("count")
    try:
        count = 1 if count_text is None else int(count_text)
    except ValueError:
        raise ValueError(f"Invalid GPU count: {count_text}. Value must be an integer.") from None
    return GpuRequest(type=m.group("type").upper(), count=count)


def gpu_problem(value: str) -> str | None:
    """Why Modal would refuse this GPU string, naming the limit; None when it is accepted."""
    try:
        req = parse_gpu(value)
    except ValueError as exc:
        return str(exc)
    limit = GPU_MAX_COUNT.get(req.type)
    if limit is None:
        return f"{req.type!r} is not a Modal GPU type (Modal offers {', '.join(GPU_MAX_COUNT)})"
    if req.count < 1:
        return f"{value!r}: a GPU count must be at least 1"
    if req.count > limit:
        return f"{value!r}: Modal allows at most {limit} {req.type} GPUs per container"
    return None


def function_problems(
    *, gpu: str | list[str] | None, timeout_s: int, cluster_size: int | None = None,
) -> list[str]:
    """What Modal's servers would reject in one `app.function(...)`, each naming its limit."""
    problems: list[str] = []
    gpus = [gpu] if isinstance(gpu, str) else list(gpu or [])
    for value in gpus:
        why = gpu_problem(value)
        if why:
            problems.append(why)
    if not 1 <= timeout_s <= MAX_TIMEOUT_S:
        problems.append(f"timeout {timeout_s} s is outside Modal's 1 s .. {MAX_TIMEOUT_S} s (24 h) per attempt")
    if cluster_size and cluster_size > 1:
        if cluster_size > MAX_CLUSTER_NODES:
            problems.append(f"{cluster_size} nodes exceed Modal's {MAX_CLUSTER_NODES} nodes per cluster")
        if not gpus:
            problems.append("a Modal cluster needs GPUs (CPU-only clusters are not supported)")
        for value in gpus:
            try:
                req = parse_gpu(value)
            except ValueError:
                continue
            if req.count != CLUSTER_GPUS_PER_NODE:
                problems.append(f"{value!r}: each clustered container must take all {CLUSTER_GPUS_PER_NODE} GPUs of "
                                "its host")
            elif req.count * cluster_size > MAX_CLUSTER_GPUS:
                problems.append(f"{cluster_size} x {req.count} GPUs exceed Modal's {MAX_CLUSTER_GPUS} GPUs per cluster")
    return problems


def size_warnings(*, cpu: float | None, memory_mb: int | None) -> list[str]:
    """CPU/memory requests above retool's thresholds (Modal publishes no maximum)."""
    out: list[str] = []
    if cpu is not None and cpu > CPU_WARN_CORES:
        out.append(f"cpu {cpu:g} cores is above {CPU_WARN_CORES:g}: Modal refuses requests above its (unpublished) "
                   "per-container maximum when the app deploys")
    if memory_mb is not None and memory_mb > MEMORY_WARN_MIB:
        out.append(f"memory {memory_mb} MiB ({memory_mb / 1024:g} GiB) is above {MEMORY_WARN_MIB // 1024} GiB: Modal "
                   "refuses requests above its (unpublished) per-container maximum when the app deploys")
    return out
