"""How fast does the builtin tiny Qwen2 learn to copy in the tiny spec's SFT? A plain-PyTorch sweep.

    python bench/tiny_learning_data.py DIR                  # the tokenized sets (needs the repo)
    python bench/tiny_learning_sweep.py DIR [--grid table|curve|batch4|smoke] [--device cpu|cuda]

Each row of the table: a Qwen2 built from a config (seeded), optionally pretrained on generic
text where numbers and phrases recur, then fine-tuned as verl's SFT does (AdamW β 0.9/0.95,
weight decay 0.01, cosine schedule with 5% warmup, clip 1.0, batch 16, loss on assistant
tokens) on a design's 512 SFT rows, then evaluated on 64 held-out problems: `tf_code` /
`tf_ans`, the teacher-forced accuracy on the digits the code copies from the problem and on
the boxed answer's digits (`ans_prior`: what the best context-free guess scores); `code`,
greedy code equal to the reference; `solved`, the greedy answer boxed right, with the output
of the model's own code inserted as the tool response. `curve` prints the teacher-forced
accuracies during training. Needs only torch and transformers (no repo imports).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

_CODE = re.compile(r'"code": "(.*?)"\}\}')
_EXPR = re.compile(r"^print\(([0-9+\-*/% ()]+)\)$")
_ASSIGN = re.compile(r"^x = ([0-9+\-*/% ()]+)\nprint\(x\)$")
_BOXED = re.compile(r"\\boxed\{([^}]*)\}")


def build(hidden: int, layers: int, vocab: int, seed: int, kv: int = 1, rope: float = 10000.0) -> Qwen2ForCausalLM:
    heads = hidden // 32
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, rope_parameters={"rope_type": "default", "rope_theta": rope}, max_position_embeddings=2048,
        tie_word_embeddings=True, dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def schedule(opt: torch.optim.Optimizer, lr: float, step: int, total: int, warmup: float = 0.05,
             constant: bool = False) -> None:
    w = max(1, int(warmup * total))
    f = (step + 1) / w if step < w else 1.0 if constant else 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
    for g in opt.param_groups:
        g["lr"] = lr * f


def train_steps(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, device: str,
                every: int = 0, probe: Any = None, constant: bool = False) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    for step, (ids, mask) in enumerate(batches):
        schedule(opt, lr, step, len(batches), constant=constant)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target, m = ids[:, 1:], mask[:, 1:].float()
        loss = (torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none") * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if every and probe is not None and (step + 1) % every == 0:
            probe(step + 1)
            model.train()


def pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(map(len, rows))
    return torch.tensor([([value] * (n - len(r)) + r) if left else (r + [value] * (n - len(r))) for r in rows])


def sft_batches(rows: list[Any], steps: int, batch: int, seed: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(len(rows), generator=g).tolist()
    out = []
    for s in range(steps):
        chunk = [rows[i] for i in order[s * batch:(s + 1) * batch]]
        out.append((pad([r[0] for r in chunk], pad_id), pad([r[1] for r in chunk], 0)))
    return out


def pretrain_batches(docs: list[list[int]], steps: int, batch: int, block: int, seed: int, sep: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stream: list[int] = []
    for d in docs:
        stream += d + [sep]
    data = torch.tensor(stream)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        ids = torch.stack([data[s:s + block] for s in starts])
        out.append((ids, torch.ones_like(ids)))
    return out


@torch.no_grad()
def teacher_forced(model: Any, rows: list[Any], tool_response: int, device: str, pad_id: int) -> tuple[float, float]:
    model.eval()
    ids = pad([r[0] for r in rows], pad_id).to(device)
    copy = pad([r[2] for r in rows], 0).to(device)
    pred = model(input_ids=ids).logits.argmax(-1)
    after = (ids == tool_response).long().cumsum(1) > 0
    hit = (pred[:, :-1] == ids[:, 1:]) & (copy[:, 1:] == 1)
    code_pos = (copy[:, 1:] == 1) & ~after[:, 1:]
    ans_pos = (copy[:, 1:] == 1) & after[:, 1:]
    return (float((hit & code_pos).sum() / code_pos.sum()), float((hit & ans_pos).sum() / ans_pos.sum()))


@torch.no_grad()
def generate(model: Any, prompts: list[list[int]], max_new: int, eos: int, pad_id: int, device: str) -> list[list[int]]:
    model.eval()
    ids = pad(prompts, pad_id, left=True).to(device)
    attn = (pad([[1] * len(p) for p in prompts], 0, left=True)).to(device)
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad_id)
    result = []
    for row in out[:, ids.shape[1]:].tolist():
        result.append(row[: row.index(eos) + 1] if eos in row else row)
    return result


def _unescape(json_string_body: str) -> str:
    try:
        return str(json.loads(f'"{json_string_body}"'))
    except ValueError:
        return json_string_body


def run_code(code: str) -> str:
    m = _EXPR.match(code.strip()) or _ASSIGN.match(code.strip())
    if not m:
        return "Error"
    try:
        return str(eval(m.group(1), {"__builtins__": {}}))  # digits and operators only (regex above)
    except (ArithmeticError, SyntaxError, ValueError):  # the interpreter would print a traceback
        return "Error"


def greedy_solve(model: Any, tok: Any, prompts: list[dict[str, Any]], device: str) -> tuple[float, float]:
    eos, pad_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    first = generate(model, [p["ids"] for p in prompts], 48, eos, pad_id, device)
    seconds, code_ok = [], 0
    for p, gen in zip(prompts, first):
        m = _CODE.search(tok.decode(gen))
        code = _unescape(m.group(1)) if m else ""
        code_ok += code == p["code"]
        cont = f"\n<|im_start|>user\n<tool_response>\n{run_code(code)}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        seconds.append(p["ids"] + gen + tok(cont, add_special_tokens=False)["input_ids"])
    second = generate(model, seconds, 16, eos, pad_id, device)
    solved = 0
    for p, gen in zip(prompts, second):
        m = _BOXED.search(tok.decode(gen))
        solved += bool(m) and m.group(1).strip() == p["answer"]
    return code_ok / len(prompts), solved / len(prompts)


@dataclass(frozen=True)
class Run:
    """One row of the table: model shape, optional pretraining, SFT."""

    design: str = "base9"
    hidden: int = 64
    layers: int = 2
    kv: int = 1
    rope: float = 10000.0
    pre_steps: int = 0
    pre_lr: float = 3e-3
    pre_block: int = 128
    lr: float = 1e-2
    steps: int = 96
    batch: int = 16
    probe_every: int = 0  # print teacher-forced accuracies every this many SFT steps
    constant: bool = False  # the tiny spec's schedule: constant after the warm-up (else cosine)


GRIDS: dict[str, list[Run]] = {
    # what docs/local.md reports ("What the tiny run learns"), about 15 min on 2 idle cores
    "table": [
        Run(), Run("arith"), Run("arith3"), Run("arith3", steps=192),
        Run("arith3", kv=2), Run("arith3", hidden=128, kv=4),
        Run("arith3", rope=300.0), Run("arith3", rope=50.0),
        Run("arith3", pre_steps=200, pre_lr=1e-2),
        Run("stated"), Run("stated", pre_steps=600, pre_block=48, lr=3e-3),
        Run("arith3_nosys"), Run("arith3_nosys", steps=192),
    ],
    # learning curves over many more steps than the tiny spec can afford
    "curve": [
        Run("arith3", steps=768, probe_every=96), Run("arith3", steps=768, lr=3e-3, probe_every=96),
        Run("arith3_nosys", steps=768, lr=3e-3, probe_every=96), Run("arith3_nosys", steps=288, lr=3e-3, probe_every=48),
        Run("base9_nosys", steps=768, lr=3e-3, probe_every=96),
    ],
    # the same number of SFT rows as the spec (3 epochs of 512), in batches of 4
    "batch4": [Run("arith3", steps=384, lr=3e-3, batch=4, probe_every=48)],
    # distinct rows, batch and rate with the tiny spec's constant schedule (arith3_4096: the
    # same problems as arith3, 4096 distinct training rows)
    "rows": [
        Run("arith3", steps=512, lr=3e-3, constant=True, probe_every=32),
        Run("arith3_4096", steps=512, lr=3e-3, constant=True, probe_every=32),
        Run("arith3_4096", steps=512, lr=3e-3, batch=32, constant=True, probe_every=32),
        Run("arith3_4096", steps=512, lr=5e-3, constant=True, probe_every=32),
    ],
    "smoke": [Run(steps=2, pre_steps=2)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--grid", default="table", choices=sorted(GRIDS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", type=int, nargs="*")
    args = ap.parse_args()
    data = torch.load(args.data / "data.pt")
    tok = AutoTokenizer.from_pretrained(args.data / "tokenizer")
    pad_id, tool_response = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<tool_response>")
    print("| design | hidden | layers | kv | rope | pre_steps | pre_block | pre_lr | lr | batch | steps | pre_s | sft_s "
          "| tf_code | tf_ans | ans_prior | code | solved |")
    print("|" + "---|" * 18)
    for i, c in enumerate(GRIDS[args.grid]):
        if args.only and i not in args.only:
            continue
        d = data["designs"][c.design]
        model = build(c.hidden, c.layers, 2048, seed=0, kv=c.kv, rope=c.rope).to(args.device)
        t0 = time.time()
        if c.pre_steps:
            batches = pretrain_batches(data["pretrain"], c.pre_steps, 32, c.pre_block, 1, pad_id)
            train_steps(model, batches, c.pre_lr, args.device)
        t1 = time.time()

        def probe(step: int, model: Any = model, held: list[Any] = d["held"]) -> None:
            code_acc, ans_acc = teacher_forced(model, held, tool_response, args.device, pad_id)
            print(f"  step {step}: tf_code {code_acc:.2f} tf_ans {ans_acc:.2f}", flush=True)

        train_steps(model, sft_batches(d["train"], c.steps, c.batch, 0, pad_id), c.lr, args.device, c.probe_every, probe,
                    constant=c.constant)
        t2 = time.time()
        tf_code, tf_ans = teacher_forced(model, d["held"], tool_response, args.device, pad_id)
        code, solved = greedy_solve(model, tok, d["prompts"], args.device)
        print(f"| {c.design} | {c.hidden} | {c.layers} | {c.kv} | {c.rope:g} | {c.pre_steps} | {c.pre_block} | {c.pre_lr:g} "
              f"| {c.lr:g} | {c.batch} | {c.steps} | {t1 - t0:.0f} | {t2 - t1:.0f} | {tf_code:.2f} | {tf_ans:.2f} | {d['answer_prior']:.2f} "
              f"| {code:.2f} | {solved:.2f} |", flush=True)


if __name__ == "__main__":
    main()
