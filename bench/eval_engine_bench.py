"""Tokens per second of the eval stage's generation engine, next to transformers' own
`generate` on the same batch (the baseline), on CPU or CUDA.

Workloads:
- `engine`: batches of random prompts (128 tokens), every row decoding exactly `--new`
  tokens (EOS ignored), sampled at temperature 1.0 / top-p 0.6 as the recipe's validation;
  our engine (runtime.verl.rollout.engine through runtime.eval.engine) and `model.generate`
  take turns per batch size, so machine load hits both alike;
- `loop` (with `--model`, a trained chat model): the real eval tool loop — chat template,
  hermes tool calls, the recipe's code_interpreter through a sandbox started here — over
  `--problems` generated math problems; tokens/s counts the model's own tokens over
  generation time, wall includes the tools.

Models: `--model DIR` (a Hugging Face directory, e.g. the tiny spec's merged SFT model) or
`--random-qwen05b` (Qwen2.5-0.5B's shape from its config, random weights: no download).

    python bench/eval_engine_bench.py --model DIR [--device cpu|cuda] [--batches 1,16,64] [--new 256]
    python bench/eval_engine_bench.py --random-qwen05b --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2.5-0.5B's architecture (its published config.json), weights random.
QWEN05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu",
)


def load(args: argparse.Namespace) -> tuple[Any, Any, str, Any]:
    """(GenerationEngine, torch model, device, tokenizer or None)."""
    import torch

    from runtime.verl.rollout.engine import GenerationEngine, default_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device, None)
    if args.random_qwen05b:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        config = Qwen2Config(**QWEN05B, torch_dtype=dtype)
        config._attn_implementation = "sdpa"
        model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
        return GenerationEngine(model, eos_ids=[151645], pad_id=151643, device=device, seed=0), model, device, None
    from transformers import AutoTokenizer

    engine = GenerationEngine.load(args.model, device=device, dtype=dtype, seed=0)
    return engine, engine.model, device, AutoTokenizer.from_pretrained(args.model)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def bench_engine(
    engine: Any, model: Any, device: str, batch: int, new: int, prompt_len: int
) -> tuple[float, float, float]:
    """(our engine tokens/s, transformers generate tokens/s, the eval engine's `generate`
    decoder tokens/s) for one batch size."""
    import torch

    from runtime.verl.rollout.engine import GenRequest
    from runtime.verl.rollout.sampling import RowParams

    gen = torch.Generator().manual_seed(batch)
    vocab = min(model.config.vocab_size, 2048)
    prompts = [torch.randint(10, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    params = RowParams(temperature=1.0, top_p=0.6)
    requests = [GenRequest(prompt_ids=p, max_tokens=new, params=params, ignore_eos=True) for p in prompts]
    sync(device)
    start = time.perf_counter()
    out = engine.generate(requests)
    sync(device)
    ours = sum(len(r.token_ids) for r in out) / (time.perf_counter() - start)
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        res = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=0.6,
            max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
        )
    sync(device)
    base = (res.shape[1] - prompt_len) * batch / (time.perf_counter() - start)
    # The eval engine's `generate` decoder (runtime.eval.engine.TransformersEngine): the
    # baseline plus its own padding and per-row trimming; it stops rows at EOS (rare here).
    from runtime.eval.engine import Sampling, TransformersEngine

    wrapped = TransformersEngine.wrap(engine, Sampling(1.0, 0.6, batch), batch_size=batch, decoder="generate")
    sync(device)
    start = time.perf_counter()
    done = wrapped.generate(prompts, [new] * batch)
    sync(device)
    decoder = sum(len(c.token_ids) for c in done) / (time.perf_counter() - start)
    return ours, base, decoder


def bench_loop(args: argparse.Namespace, tokenizer: Any, device: str) -> dict[str, Any]:
    """The eval tool loop on generated problems, through a sandbox started for it."""
    from runtime.data.builtin import user_content
    from runtime.data.problems import generate
    from runtime.data.retool_sft import TOOLS
    from runtime.eval.engine import Sampling, TransformersEngine
    from runtime.eval.run import CountingEngine
    from runtime.eval.toolloop import LoopLimits, ToolLoop
    from runtime.eval.tools import SandboxTools
    from runtime.verl.recipe.sandbox_call import SandboxCallSettings
    from sandbox.testing import local_server

    engine = CountingEngine(TransformersEngine(
        args.model, Sampling(temperature=1.0, top_p=0.6, seed=0), batch_size=args.loop_batch, device=device,
    ))
    limits = LoopLimits(max_prompt_length=1024, max_response_length=args.loop_response, max_assistant_turns=4,
                        max_user_turns=4, max_tool_response_length=256)
    with local_server(workers=4) as server:
        tools = SandboxTools(SandboxCallSettings(sandbox_url=server.url, timeout_s=10, rate_limit=16, num_workers=16))
        loop = ToolLoop(tokenizer, engine, TOOLS, limits, tools)
        problems = [[{"role": "user", "content": user_content(p)}] for p in generate(args.problems, 7, heldout=True)]
        start = time.perf_counter()
        convs = [loop.start(m) for m in problems]
        loop.run(convs)
        wall = time.perf_counter() - start
    return {
        "conversations": len(convs), "tool_calls": tools.calls, "generated_tokens": engine.tokens,
        "tokens_per_s": round(engine.tokens / engine.seconds, 1), "wall_s": round(wall, 2),
        "mean_turns": round(sum(c.assistant_turns for c in convs) / len(convs), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Hugging Face model directory")
    ap.add_argument("--random-qwen05b", action="store_true", help="Qwen2.5-0.5B's shape, random weights")
    ap.add_argument("--device", choices=("cpu", "cuda"))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new", type=int, default=256, help="tokens decoded per row")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    ap.add_argument("--problems", type=int, default=64, help="loop workload: conversations")
    ap.add_argument("--loop-batch", type=int, default=64)
    ap.add_argument("--loop-response", type=int, default=256)
    ap.add_argument("--threads", type=int, help="torch CPU threads (the eval engine uses 1 for small models)")
    ap.add_argument("--sdp", choices=("default", "no-cudnn"), default="default",
                    help="no-cudnn: PyTorch's flash/efficient attention instead of cuDNN's (no per-length kernel builds)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if bool(args.model) == bool(args.random_qwen05b):
        ap.error("give exactly one of --model and --random-qwen05b")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sdp == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    engine, model, device, tokenizer = load(args)
    name = "Qwen2.5-0.5B-shaped (random)" if args.random_qwen05b else Path(args.model).name
    params = sum(p.numel() for p in model.parameters())
    print(f"model {name}: {params / 1e6:.1f}M parameters on {device} ({next(model.parameters()).dtype}), sdp {args.sdp}")
    bench_engine(engine, model, device, 1, 4, 16)  # warm-up (kernels, allocator)
    rows = []
    print("\n| workload | batch | new tokens/row | engine tok/s | transformers generate tok/s | × baseline "
          "| eval engine's generate decoder tok/s |")
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        # Both first decode these shapes once untimed: CUDA libraries build and cache kernels
        # per shape (cuDNN attention per sequence length), which must not count against either.
        cold = bench_engine(engine, model, device, batch, args.new, args.prompt)
        ours, base, decoder = bench_engine(engine, model, device, batch, args.new, args.prompt)
        rows.append({"batch": batch, "engine_tokens_per_s": round(ours, 1), "generate_tokens_per_s": round(base, 1),
                     "decoder_generate_tokens_per_s": round(decoder, 1),
                     # the untimed first pass: our engine met each new length first (cuDNN's per-shape builds)
                     "first_pass_tokens_per_s": [round(x, 1) for x in cold]})
        print(f"| engine | {batch} | {args.new} | {ours:,.1f} | {base:,.1f} | {ours / base:.2f}× | {decoder:,.1f} |",
              flush=True)
    result: dict[str, Any] = {"model": name, "device": device, "parameters": params, "sdp": args.sdp, "engine": rows}
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    if args.model and tokenizer is not None and args.problems:
        loop = bench_loop(args, tokenizer, device)
        result["loop"] = loop
        print(f"\nloop: {loop['conversations']} conversations, {loop['tool_calls']} sandbox calls, "
              f"{loop['generated_tokens']} tokens, {loop['tokens_per_s']:,.1f} tok/s in generation, "
              f"{loop['wall_s']} s wall, {loop['mean_turns']} assistant turns per conversation")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
