"""Seconds per step of the 7B and 32B specs' stages on 8-GPU H100 nodes, derived from what
one GPU measured (`bench/step_costs_measure.py`, saved under bench/results/), with the
model of what scales and what does not printed beside every figure.

    python bench/step_costs.py                      # the derivation from the saved measurements
    python bench/step_costs.py --results FILE       # ... from another measurement file
    python bench/step_costs.py --json               # the per-stage figures as JSON
    # on a GPU machine, to measure again (about 4 minutes on one H100/H200):
    python bench/step_costs_measure.py --out bench/results/step_costs_<gpu>.json

The model, in short (each assumption is printed with its number):
- training work is the sum over sequences of one GPU's measured time for a sequence of that
  length (forward+backward with gradient checkpointing, or forward alone), divided by the
  GPUs: FSDP shards parameters, Ulysses sequence parallelism splits each sequence's tokens
  (and attention heads) over its group, so a micro-batch of 4 × 16k tokens on a group of 4
  GPUs is one 16k-token sequence of work per GPU. Communication is a stated overhead;
- the optimizer step is AdamW over one rank's shard (parameters / GPUs) on the GPU; with
  verl's offload the shard's parameters and optimizer states also cross PCIe at the
  measured bandwidth;
- decoding is a continuous-batching simulation per vLLM replica (tensor parallel 4): one
  step costs layers × (measured per-layer time at that batch and mean KV length + two TP
  all-reduces) + the LM head, the batch bounded by the KV cache that fits in 90% of the
  GPU; the step ends when the longest response does (plus its tool calls);
- what one GPU cannot show (the all-reduce latency, weight sync into vLLM, checkpoint
  writes, response lengths) are stated assumptions, varied in the low/high columns.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "bench" / "results" / "step_costs_h200.json"


# ---------------------------------------------------------------- the measurement file


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainRow(_Row):
    model: str
    layers: int
    tokens: int
    fwd_bwd_s: float
    fwd_s: float
    peak_gib: float


class DecodeRow(_Row):
    model: str
    tp: int
    batch: int
    context: int
    layer_s: float
    head_s: float


class OptimizerRow(_Row):
    shard_params: int
    gpu_adamw_s: float
    cpu_adamw_4t_s: float
    cpu_adamw_16t_s: float


class Copies(_Row):
    h2d_pageable_gbps: float
    d2h_pageable_gbps: float
    h2d_pinned_gbps: float
    d2h_pinned_gbps: float


class Measurements(_Row):
    device: str
    gpu_memory_gib: float
    torch: str
    cuda: str | None
    python: str
    transformers: str
    cpu_count: int | None
    date: str
    measure_s: float
    decode: list[DecodeRow]
    optimizer: OptimizerRow
    copies: Copies
    train: list[TrainRow]


# ---------------------------------------------------------------- models and assumptions

PARAMS = {"qwen2.5-7b": 7_615_616_512, "qwen2.5-32b": 32_763_876_352}
LAYERS = {"qwen2.5-7b": 28, "qwen2.5-32b": 64}
KV_HEADS = {"qwen2.5-7b": 4, "qwen2.5-32b": 8}
HEAD_DIM = 128
H100_GIB = 79.6  # an H100 80GB's memory as PyTorch reports it

# Memory-bound work (decode, AdamW) runs at HBM bandwidth: a device-to-device copy moved
# ~3.0 TB/s on this workplace's H100 and ~4.3 TB/s on its H200 (the device notes' readings).
# Compute-bound work (training matmuls, ~790 TFLOP/s bf16 on both) is taken as is.
HBM_TBPS = {"H100": 3.0, "H200": 4.3}


@dataclass(frozen=True)
class Assumptions:
    """What one GPU cannot measure; low/high vary the response lengths."""

    response_lo: int = 1024  # responses spread evenly from response_lo to response_hi tokens
    response_hi: int = 16384
    prompt_tokens: int = 250  # a DAPO/AIME prompt with the chat template and tool schema
    tool_calls: int = 8  # tool calls on the longest response's critical path
    tool_call_s: float = 2.0  # sandbox round trip of one call (the recipe allows 30 s)
    tool_output_tokens: int = 100  # ≤256 characters of tool output, prefilled per call
    sft_row_tokens: int = 16384  # SFT rows packed without padding; max_length bounds each row
    comm_overhead: float = 0.10  # FSDP all-gathers / reduce-scatters and Ulysses all-to-alls not hidden
    allreduce_s: float = 12e-6  # one TP all-reduce of a decode step's activations (NVLink, small message)
    rollout_fixed_s: float = 20.0  # vLLM wake-up/sleep and the actor→vLLM weight sync per RL step
    checkpoint_gbps_per_node: float = 1.0  # writing sharded model + optimizer to the volume
    kv_reserve_gib: float = 3.0  # activations and CUDA graphs beside weights and KV cache
    gpu_memory_utilization: float = 0.9


CENTRAL = Assumptions()
LOW = Assumptions(response_lo=512, response_hi=8192, tool_calls=4, comm_overhead=0.05, rollout_fixed_s=10.0,
                  sft_row_tokens=8192)
HIGH = Assumptions(response_lo=12288, response_hi=16384, tool_calls=16, tool_call_s=4.0, comm_overhead=0.25,
                   rollout_fixed_s=40.0, checkpoint_gbps_per_node=0.5)


class Costs:
    """Interpolations over the measurements, rescaled to an H100."""

    def __init__(self, m: Measurements) -> None:
        self.m = m
        measured_on = "H200" if "H200" in m.device else "H100"
        self.memory_scale = HBM_TBPS[measured_on] / HBM_TBPS["H100"]  # × on memory-bound work

    # -- training: one sequence on one GPU, the whole model

    def _full(self, model: str, attr: Literal["fwd_bwd_s", "fwd_s"]) -> dict[int, float]:
        """Whole-model seconds per sequence length: the two measured depths give the
        per-layer slope and the constant (embeddings, LM head, loss)."""
        rows = [r for r in self.m.train if r.model == model]
        out: dict[int, float] = {}
        for tokens in sorted({r.tokens for r in rows}):
            by_depth = {r.layers: getattr(r, attr) for r in rows if r.tokens == tokens}
            (d1, t1), (d2, t2) = sorted(by_depth.items())[:2]
            slope = (t2 - t1) / (d2 - d1)
            out[tokens] = t1 - d1 * slope + LAYERS[model] * slope
        return out

    def sequence_s(self, model: str, tokens: float, attr: Literal["fwd_bwd_s", "fwd_s"]) -> float:
        """Seconds for one sequence of `tokens`: a·n + b·n² fitted to the measured lengths
        (linear layers scale with n, attention with n²)."""
        points = self._full(model, attr)
        # least squares for t = a n + b n^2
        s11 = sum(n * n for n in points)
        s12 = sum(n ** 3 for n in points)
        s22 = sum(n ** 4 for n in points)
        r1 = sum(n * t for n, t in points.items())
        r2 = sum(n * n * t for n, t in points.items())
        det = s11 * s22 - s12 * s12
        a, b = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
        return a * tokens + b * tokens * tokens

    # -- optimizer

    def adamw_gpu_s(self, shard_params: float) -> float:
        o = self.m.optimizer
        return o.gpu_adamw_s * shard_params / o.shard_params * self.memory_scale

    def pcie_s(self, nbytes: float) -> float:
        c = self.m.copies
        return nbytes / (c.h2d_pageable_gbps * 1e9) / 2 + nbytes / (c.d2h_pageable_gbps * 1e9) / 2

    # -- decode

    def _layer(self, model: str, tp: int, batch: int, context: float) -> float:
        rows = [r for r in self.m.decode if r.model == model and r.tp == tp]
        batches = sorted({r.batch for r in rows})

        def at(b: int) -> float:
            pts = sorted((r.context, r.layer_s) for r in rows if r.batch == b)
            return _interp(pts, context)

        return _interp([(b, at(b)) for b in batches], batch)

    def _head(self, model: str, tp: int, batch: int) -> float:
        pts = sorted({(r.batch, r.head_s) for r in self.m.decode if r.model == model and r.tp == tp})
        return _interp(pts, batch)

    def decode_step_s(self, model: str, tp: int, batch: int, mean_context: float, a: Assumptions) -> float:
        layers = LAYERS[model]
        per_layer = self._layer(model, tp, batch, mean_context) * self.memory_scale + 2 * a.allreduce_s
        return layers * per_layer + self._head(model, tp, batch) * self.memory_scale

    def kv_tokens(self, model: str, tp: int, a: Assumptions) -> int:
        """KV-cache tokens one replica holds: 90% of each GPU minus its weight shard."""
        kv_per_gpu = max(1, KV_HEADS[model] // tp)
        per_token = LAYERS[model] * 2 * kv_per_gpu * HEAD_DIM * 2  # K and V, bf16
        free = H100_GIB * a.gpu_memory_utilization - PARAMS[model] * 2 / tp / 2**30 - a.kv_reserve_gib
        return int(free * 2**30 / per_token)


def _interp(points: list[tuple[int, float]], x: float) -> float:
    """Piecewise-linear through sorted points; linear extrapolation past both ends."""
    if len(points) == 1:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1 or (x1, y1) == points[-1]:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable")


def responses(n: int, a: Assumptions) -> list[int]:
    """`n` response lengths spread evenly over [response_lo, response_hi] (deterministic)."""
    return [round(a.response_lo + (a.response_hi - a.response_lo) * (i + 0.5) / n) for i in range(n)]


def simulate_rollout(costs: Costs, model: str, tp: int, lengths: list[int], a: Assumptions, chunk: int = 64) -> float:
    """Seconds for one replica to decode `lengths` with continuous batching: admit while the
    KV cache holds every active context, decode `chunk` tokens at a time, retire finished rows,
    preempt the newest when growing contexts overflow (their progress kept, as vLLM recomputes)."""
    budget = costs.kv_tokens(model, tp, a)
    waiting = [(a.prompt_tokens, a.prompt_tokens + n) for n in sorted(lengths, reverse=True)]
    active: list[tuple[int, int]] = []
    t = 0.0
    while waiting or active:
        used = sum(c for c, _ in active)
        while waiting and used + waiting[0][0] + chunk <= budget:
            used += waiting[0][0]
            active.append(waiting.pop(0))
        if not active:  # one row longer than the whole cache: it runs alone
            active.append(waiting.pop(0))
        step = min(chunk, min(end - c for c, end in active))
        mean_ctx = sum(c for c, _ in active) / len(active) + step / 2
        t += step * costs.decode_step_s(model, tp, len(active), mean_ctx, a)
        active = [(c + step, end) for c, end in active if c + step < end]
        while active and sum(c for c, _ in active) > budget:
            waiting.insert(0, active.pop())
    prefill_tokens = len(lengths) * (a.prompt_tokens + a.tool_calls * a.tool_output_tokens)
    prefill = prefill_tokens / 16384 * costs.sequence_s(model, 16384, "fwd_s") / tp
    return t + prefill + a.tool_calls * a.tool_call_s


# ---------------------------------------------------------------- stages


@dataclass
class Stage:
    spec: str
    name: str
    seconds: float
    low: float
    high: float
    lines: list[str]


def sft_step(costs: Costs, model: str, gpus: int, batch: int, a: Assumptions) -> tuple[float, list[str]]:
    fb = costs.sequence_s(model, a.sft_row_tokens, "fwd_bwd_s")
    compute = batch * fb / gpus * (1 + a.comm_overhead)
    opt = costs.adamw_gpu_s(PARAMS[model] / gpus)
    return compute + opt, [
        f"fwd+bwd of one {a.sft_row_tokens}-token row on one GPU: {fb:.2f} s; {batch} rows / {gpus} GPUs "
        f"× (1 + {a.comm_overhead:.0%} communication) = {compute:.1f} s",
        f"AdamW on the GPU over {PARAMS[model] / gpus / 1e9:.2f}B fp32 parameters (one rank's shard): {opt:.2f} s",
    ]


def rl_step(
    costs: Costs, model: str, gpus: int, prompts: int, n: int, tp: int, a: Assumptions, *, updates: int,
    critic: bool, val_seqs: int, test_freq: int, steps: int, save_freq: int, nodes: int,
) -> tuple[float, list[str]]:
    replicas = gpus // tp
    seqs = prompts * n
    lengths = responses(seqs, a)
    per_replica = [lengths[i::replicas] for i in range(replicas)]
    rollout = max(simulate_rollout(costs, model, tp, part, a) for part in per_replica)
    seq_tokens = [a.prompt_tokens + r for r in lengths]
    fwd = sum(costs.sequence_s(model, s, "fwd_s") for s in seq_tokens) / gpus
    fb = sum(costs.sequence_s(model, s, "fwd_bwd_s") for s in seq_tokens) / gpus
    nets = 2 if critic else 1
    train = nets * (fwd + fb) * (1 + a.comm_overhead)
    shard = PARAMS[model] / gpus
    opt = nets * updates * costs.adamw_gpu_s(shard)
    # verl's offload: fp32 parameters in and out twice (log-prob pass, update), Adam's two
    # states in and out once per update phase.
    offload = nets * costs.pcie_s(2 * 2 * shard * 4 + 2 * shard * 8)
    val_lengths = responses(val_seqs, a)
    val = max(simulate_rollout(costs, model, tp, val_lengths[i::replicas], a) for i in range(replicas))
    val_share = val * (steps // test_freq + 1) / steps
    ckpt = PARAMS[model] * 12 / 1e9 / (a.checkpoint_gbps_per_node * nodes) / save_freq
    total = rollout + train + opt + offload + a.rollout_fixed_s + val_share + ckpt
    mean_len = sum(seq_tokens) / len(seq_tokens)
    return total, [
        f"rollout: {seqs} responses ({a.response_lo}–{a.response_hi} tokens) over {replicas} vLLM replicas of TP{tp}, "
        f"{costs.kv_tokens(model, tp, a):,} KV tokens each, + {a.tool_calls} tool calls × {a.tool_call_s:g} s: {rollout:.0f} s",
        f"{'actor + critic' if critic else 'actor'}: log-prob forward + update fwd+bwd over {seqs} sequences "
        f"(mean {mean_len:,.0f} tokens) / {gpus} GPUs × (1 + {a.comm_overhead:.0%}): {train:.0f} s",
        f"{updates} AdamW steps{' per network' if critic else ''} on a {shard / 1e9:.2f}B shard: {opt:.1f} s; "
        f"offload traffic at {costs.m.copies.h2d_pageable_gbps:.0f}/{costs.m.copies.d2h_pageable_gbps:.0f} GB/s: {offload:.1f} s",
        f"vLLM wake/sleep and weight sync (assumed): {a.rollout_fixed_s:g} s; checkpoint every {save_freq} steps at "
        f"{a.checkpoint_gbps_per_node:g} GB/s per node: {ckpt:.1f} s per step",
        f"validation ({val_seqs} responses, before training and every {test_freq} steps of {steps}): {val:.0f} s, "
        f"{val_share:.0f} s per step",
    ]


def eval_round(costs: Costs, model: str, gpus: int, tp: int, problems: int, samples: int, chunk: int,
               a: Assumptions) -> tuple[float, list[str]]:
    total_seqs = problems * samples
    replicas = gpus // tp
    lengths = responses(total_seqs, a)
    t = 0.0
    for start in range(0, total_seqs, chunk * replicas):
        wave = lengths[start:start + chunk * replicas]
        t += max(simulate_rollout(costs, model, tp, wave[i::replicas], a) for i in range(replicas))
    return t / samples, [
        f"{problems} problems × {samples} samples = {total_seqs} conversations in waves of {chunk} "
        f"on TP{tp} ({costs.kv_tokens(model, tp, a):,} KV tokens): {t:.0f} s in all, / {samples} rounds",
    ]


def derive(costs: Costs) -> list[Stage]:
    stages: list[Stage] = []

    def add(spec: str, name: str, fn: object) -> None:
        results = {k: fn(a) for k, a in (("central", CENTRAL), ("low", LOW), ("high", HIGH))}  # type: ignore[operator]
        stages.append(Stage(spec, name, results["central"][0], results["low"][0], results["high"][0],
                            results["central"][1]))

    seven, big = "qwen2.5-7b", "qwen2.5-32b"
    add("retool-qwen7b", "sft", lambda a: sft_step(costs, seven, 8, 32, a))
    add("retool-qwen7b", "dapo", lambda a: rl_step(
        costs, seven, 8, 64, 16, 4, a, updates=64 // 16, critic=False, val_seqs=60 * 30, test_freq=10, steps=400,
        save_freq=20, nodes=1))
    add("retool-qwen7b", "eval_*", lambda a: eval_round(costs, seven, 4, 4, 60, 30, 1024, a))
    add("retool-qwen32b", "sft", lambda a: sft_step(costs, big, 16, 32, a))
    add("retool-qwen32b", "grpo", lambda a: rl_step(
        costs, big, 16, 512, 16, 4, a, updates=512 // 64, critic=False, val_seqs=30 * 30, test_freq=5, steps=150,
        save_freq=30, nodes=2))
    add("retool-qwen32b", "ppo", lambda a: rl_step(
        costs, big, 16, 1024, 1, 4, a, updates=1024 // 256, critic=True, val_seqs=30 * 30, test_freq=5, steps=250,
        save_freq=30, nodes=2))
    add("retool-qwen32b", "eval_*", lambda a: eval_round(costs, big, 8, 8, 30, 30, 1024, a))
    return stages


def print_measurements(m: Measurements, costs: Costs) -> None:
    print(f"Measured on {m.device} ({m.gpu_memory_gib} GiB), torch {m.torch}, CUDA {m.cuda}, transformers "
          f"{m.transformers}, {m.date}; memory-bound times × {costs.memory_scale:.2f} for an H100's HBM.\n")
    print("Training, one sequence on one GPU (gradient checkpointing, bf16, SDPA), whole model "
          "(constant + layers × per-layer slope from 2 and 4 layers):")
    print("| model | tokens | fwd+bwd s | fwd s | peak GiB (4 layers) |\n|---|---|---|---|---|")
    for model in PARAMS:
        fb, f = costs._full(model, "fwd_bwd_s"), costs._full(model, "fwd_s")
        peak = {r.tokens: r.peak_gib for r in m.train if r.model == model and r.layers == 4}
        for tokens in sorted(fb):
            print(f"| {model} | {tokens} | {fb[tokens]:.2f} | {f[tokens]:.2f} | {peak.get(tokens, math.nan):.1f} |")
    o, c = m.optimizer, m.copies
    print(f"\nAdamW over {o.shard_params / 1e9:.3f}B fp32 parameters (7B / 8 GPUs): GPU {o.gpu_adamw_s:.3f} s; "
          f"CPU offload (FSDP CPUOffload style) {o.cpu_adamw_4t_s:.2f} s at 4 threads, {o.cpu_adamw_16t_s:.2f} s at 16")
    print(f"Host↔device: pageable {c.h2d_pageable_gbps:.1f}/{c.d2h_pageable_gbps:.1f} GB/s, "
          f"pinned {c.h2d_pinned_gbps:.1f}/{c.d2h_pinned_gbps:.1f} GB/s (h2d/d2h)")
    print("\nDecode, per-GPU shapes under tensor parallelism, CUDA-graph replays, µs per layer "
          "(context 0 = matmuls only), and tokens/s of a whole replica:")
    print("| model | TP | batch | ctx 0 | ctx 2k | ctx 8k | ctx 16k | replica tok/s at 8k |\n|---|---|---|---|---|---|---|---|")
    for (model, tp) in sorted({(r.model, r.tp) for r in m.decode}):
        for b in sorted({r.batch for r in m.decode if r.model == model and r.tp == tp}):
            by = {r.context: r.layer_s for r in m.decode if r.model == model and r.tp == tp and r.batch == b}
            cells = " | ".join(f"{by[k] * 1e6:,.0f}" if k in by else "–" for k in (0, 2048, 8192, 16384))
            tps = b / costs.decode_step_s(model, tp, b, 8192, CENTRAL)
            print(f"| {model} | {tp} | {b} | {cells} | {tps:,.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--json", action="store_true", help="print the per-stage figures as JSON only")
    args = ap.parse_args()
    try:
        m = Measurements.model_validate_json(args.results.read_text())
    except (OSError, ValueError) as e:
        print(f"{args.results}: {e}", file=sys.stderr)
        return 2
    costs = Costs(m)
    stages = derive(costs)
    if args.json:
        print(json.dumps([{"spec": s.spec, "stage": s.name, "seconds_per_step": round(s.seconds),
                           "low": round(s.low), "high": round(s.high)} for s in stages], indent=1))
        return 0
    print_measurements(m, costs)
    print("\nAssumptions (central; low / high):")
    for field in CENTRAL.__dataclass_fields__:
        print(f"- {field}: {getattr(CENTRAL, field)} ({getattr(LOW, field)} / {getattr(HIGH, field)})")
    print("\nDerivation, 8-GPU H100 nodes:")
    for s in stages:
        print(f"\n{s.spec} {s.name}: {s.seconds:,.0f} s per step (low {s.low:,.0f}, high {s.high:,.0f})")
        for line in s.lines:
            print(f"  - {line}")
    print("\n| spec | stage | seconds_per_step | low | high |\n|---|---|---|---|---|")
    for s in stages:
        print(f"| {s.spec} | {s.name} | {s.seconds:,.0f} | {s.low:,.0f} | {s.high:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
