"""The GPU half of `bench/step_costs.py`: what one accelerator can measure of the recipe's
stages, written as plain JSON (the device has no pydantic; `step_costs.py` validates the
file when it reads it back).

Measured, on random weights built from Qwen2.5's published configs (no download):
- `train`: one forward+backward (gradient checkpointing, bf16, SDPA attention, loss over
  every token) and one forward (no grad: the RL log-prob pass) of one sequence of 4k/8k/16k
  tokens, with 2 and 4 decoder layers: the per-layer slope and the constant (embeddings,
  LM head, loss) come from the two depths, so the full 28/64-layer model is
  `constant + layers × slope`;
- `optimizer`: AdamW (betas 0.9/0.95, wd 0.01) over one rank's FSDP shard of fp32
  parameters (model parameters / GPUs), on the GPU and on the CPU (4 and 16 threads), and
  host↔device copies (pageable and pinned), the traffic of verl's param/optimizer offload;
- `decode`: one decoder layer's decode step at the per-GPU shapes of tensor parallelism
  (7B TP4, 32B TP4 and TP8) for batch sizes 1..512 and KV lengths 0..16k, as CUDA-graph
  replays (how vLLM runs decode), plus the LM head; attention through PyTorch's
  flash/efficient SDPA over a contiguous KV cache.

    python bench/step_costs_measure.py --out results.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# Published configs (config.json of Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen2.5-32B-Instruct).
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act="silu",
    ),
    "qwen2.5-32b": dict(
        vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act="silu",
    ),
}
HEAD_DIM = 128
DEPTHS = (2, 4)
LENGTHS = (4096, 8192, 16384)


def cuda_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `reps` timed calls (CUDA events) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def wall_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------- training


def measure_train(name: str, lengths: tuple[int, ...], reps: int) -> list[dict[str, Any]]:
    rows = []
    for depth in DEPTHS:
        rows += _train_depth(name, depth, lengths, reps)
        torch.cuda.empty_cache()
    return rows


def _train_depth(name: str, depth: int, lengths: tuple[int, ...], reps: int) -> list[dict[str, Any]]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rows = []
    config = Qwen2Config(**{**CONFIGS[name], "num_hidden_layers": depth})
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for length in lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), device="cuda")

        def fwd_bwd() -> None:
            model(input_ids=ids, labels=ids).loss.backward()

        def fwd() -> None:
            with torch.no_grad():
                model(input_ids=ids, labels=ids)

        torch.cuda.reset_peak_memory_stats()
        fb = cuda_time(fwd_bwd, reps)
        model.zero_grad(set_to_none=True)
        f = cuda_time(fwd, reps)
        row = {"model": name, "layers": depth, "tokens": length, "fwd_bwd_s": fb, "fwd_s": f,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        print(f"train {name} layers={depth} tokens={length}: fwd+bwd {fb:.3f} s, fwd {f:.3f} s", flush=True)
    return rows


# ---------------------------------------------------------------- optimizer and copies


def measure_optimizer(shard_params: int, reps: int) -> dict[str, Any]:
    """AdamW over one fp32 shard: on the GPU, and on the CPU at 4 and 16 threads."""
    out: dict[str, Any] = {"shard_params": shard_params}
    p = torch.nn.Parameter(torch.zeros(shard_params, dtype=torch.float32, device="cuda"))
    p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW([p], lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    out["gpu_adamw_s"] = cuda_time(opt.step, reps)
    print(f"optimizer gpu: {out['gpu_adamw_s']:.3f} s for {shard_params / 1e9:.3f}B params", flush=True)
    del opt, p
    torch.cuda.empty_cache()
    cpu = torch.nn.Parameter(torch.zeros(shard_params, dtype=torch.float32))
    cpu.grad = torch.randn(shard_params) * 1e-3
    opt = torch.optim.AdamW([cpu], lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    threads = torch.get_num_threads()
    for n in (4, 16):
        torch.set_num_threads(n)
        out[f"cpu_adamw_{n}t_s"] = wall_time(opt.step, max(1, reps // 2))
        print(f"optimizer cpu {n} threads: {out[f'cpu_adamw_{n}t_s']:.3f} s", flush=True)
    torch.set_num_threads(threads)
    del opt, cpu
    return out


def measure_copies(gib: float = 2.0, reps: int = 3) -> dict[str, float]:
    """Host↔device bandwidth in GB/s (pageable and pinned host memory)."""
    n = int(gib * 2**30 // 4)
    dev = torch.empty(n, dtype=torch.float32, device="cuda")
    out = {}
    for kind in ("pageable", "pinned"):
        host = torch.empty(n, dtype=torch.float32, pin_memory=(kind == "pinned"))
        pinned = kind == "pinned"
        h2d = cuda_time(lambda h=host, nb=pinned: dev.copy_(h, non_blocking=nb), reps)
        d2h = cuda_time(lambda h=host, nb=pinned: h.copy_(dev, non_blocking=nb), reps)
        out[f"h2d_{kind}_gbps"] = n * 4 / h2d / 1e9
        out[f"d2h_{kind}_gbps"] = n * 4 / d2h / 1e9
    print("copies:", {k: round(v, 1) for k, v in out.items()}, flush=True)
    return out


# ---------------------------------------------------------------- decode


def tp_shapes(name: str, tp: int) -> dict[str, int]:
    c = CONFIGS[name]
    kv = max(1, c["num_key_value_heads"] // tp)  # fewer KV heads than ranks: each rank keeps a copy
    return {"hidden": c["hidden_size"], "q_heads": c["num_attention_heads"] // tp, "kv_heads": kv,
            "inter": c["intermediate_size"] // tp, "vocab": c["vocab_size"] // tp}


class DecodeLayers:
    """`n` decoder layers' decode-step matmuls at one rank's tensor-parallel shapes."""

    def __init__(self, shapes: dict[str, int], n: int) -> None:
        h, q, kv, i = shapes["hidden"], shapes["q_heads"], shapes["kv_heads"], shapes["inter"]
        self.shapes = shapes

        def w(a: int, b: int) -> torch.Tensor:
            return torch.randn(a, b, device="cuda", dtype=torch.bfloat16) * 0.02

        self.layers = [(w(h, (q + 2 * kv) * HEAD_DIM), w(q * HEAD_DIM, h), w(h, 2 * i), w(i, h)) for _ in range(n)]

    def step(self, x: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        s = self.shapes
        q_dim, kv_dim = s["q_heads"] * HEAD_DIM, s["kv_heads"] * HEAD_DIM
        b = x.shape[0]
        for wqkv, wo, wgu, wd in self.layers:
            qkv = x @ wqkv
            if k is not None and v is not None:
                # One query token per row: the query heads sharing a KV head become that head's
                # query positions (no mask is needed, every cached position is in the past).
                q = qkv[:, :q_dim].reshape(b, s["kv_heads"], s["q_heads"] // s["kv_heads"], HEAD_DIM)
                a = F.scaled_dot_product_attention(q, k, v).reshape(b, q_dim)
            else:
                a = qkv[:, :q_dim]
            _ = qkv[:, q_dim:q_dim + 2 * kv_dim]
            x = x + a @ wo
            gu = x @ wgu
            g, u = gu.chunk(2, dim=-1)
            x = x + (F.silu(g) * u) @ wd
        return x


def graph_time(fn: Callable[[], Any], replays: int = 20) -> float:
    """Seconds per replay of `fn` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, replays, warmup=3)


def measure_decode(batches: tuple[int, ...], contexts: tuple[int, ...]) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    layers = 4
    for name, tp in (("qwen2.5-7b", 4), ("qwen2.5-32b", 4), ("qwen2.5-32b", 8)):
        shapes = tp_shapes(name, tp)
        model = DecodeLayers(shapes, layers)
        head = torch.randn(shapes["hidden"], shapes["vocab"], device="cuda", dtype=torch.bfloat16) * 0.02
        for b in batches:
            x = torch.randn(b, shapes["hidden"], device="cuda", dtype=torch.bfloat16)
            t_head = graph_time(lambda x=x, w=head: torch.softmax((x @ w).float(), dim=-1))
            for c in contexts:
                k: torch.Tensor | None = None
                v: torch.Tensor | None = None
                torch.cuda.empty_cache()
                if c:
                    k = torch.randn(b, shapes["kv_heads"], c, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    v = torch.randn_like(k)
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    t = graph_time(lambda m=model, x=x, k=k, v=v: m.step(x, k, v)) / layers
                rows.append({"model": name, "tp": tp, "batch": b, "context": c, "layer_s": t, "head_s": t_head})
            print(f"decode {name} tp{tp} batch {b}: " + ", ".join(
                f"ctx {r['context']}: {r['layer_s'] * 1e6:.0f} us/layer" for r in rows[-len(contexts):]
            ) + f"; head {t_head * 1e6:.0f} us", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny grid, for checking the script")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    props = torch.cuda.get_device_properties(0)
    result: dict[str, Any] = {
        "device": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpu_count": __import__("os").cpu_count(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    import transformers

    result["transformers"] = transformers.__version__
    lengths = (1024, 2048) if args.quick else LENGTHS
    started = time.perf_counter()

    def save() -> None:  # after every part, so a run cut short keeps what it measured
        result["measure_s"] = round(time.perf_counter() - started, 1)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    batches = (1, 64) if args.quick else (1, 16, 64, 128, 256, 512)
    contexts = (0, 2048) if args.quick else (0, 2048, 8192, 16384)
    result["decode"] = measure_decode(batches, contexts)
    save()
    shard_7b = 7_615_616_512 // 8  # Qwen2.5-7B's parameters over 8 GPUs
    result["optimizer"] = measure_optimizer(shard_7b // (16 if args.quick else 1), args.reps)
    result["copies"] = measure_copies(0.25 if args.quick else 2.0)
    save()
    result["train"] = []
    for name in CONFIGS:
        result["train"] += measure_train(name, lengths, args.reps)
        save()
    print(f"wrote {args.out} in {result['measure_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
