"""Tokenized data for bench/tiny_learning_sweep.py: can the builtin tiny Qwen2 learn to copy?

    python bench/tiny_learning_data.py OUT_DIR      # then: python bench/tiny_learning_sweep.py OUT_DIR

Writes OUT_DIR/tokenizer/ (the builtin tiny model's files: its tokenizer and chat template)
and OUT_DIR/data.pt, which holds per data design
- `train`: 512 SFT rows (`TRAIN_ROWS` for some) tokenized as verl's multi-turn SFT dataset does (message by message,
  loss on assistant messages without their generation prompt) as (ids, loss mask, copy
  mask), the copy mask marking the digits the assistant writes (code operands, boxed answer);
- `held`: 64 held-out problems, tokenized the same way, and `prompts` (their prompt ids, code
  and answer) for greedy generation;
- `answer_prior`: the accuracy on the boxed answer's digits of the best guess that ignores
  the context (the most frequent digit at each position in the training answers);
and `pretrain`: generic math-English documents in which numbers and phrases recur.
The sweep itself needs only torch and transformers, so it runs on a machine without the repo's
dependencies.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.data.builtin import expected_sft_messages, user_content
from runtime.data.problems import Problem, generate, is_heldout
from runtime.data.retool_sft import TOOLS
from runtime.models.chat_template import DEFAULT_SYSTEM
from runtime.models.corpus import WORDS

Generator = Callable[[int, int, bool], list[Problem]]


def _distinct(make: Callable[[random.Random], Problem]) -> Generator:
    """n distinct problems of the training (or held-out) bucket, like runtime.data.problems."""

    def gen(n: int, seed: int, heldout: bool) -> list[Problem]:
        rng = random.Random(seed)
        out: list[Problem] = []
        seen: set[str] = set()
        while len(out) < n:
            p = make(rng)
            if p.text not in seen and is_heldout(p.text) == heldout:
                seen.add(p.text)
                out.append(p)
        return out

    return gen


def _arith(fixed_shape: bool) -> Callable[[random.Random], Problem]:
    """`What is a op b?`: one template. With `fixed_shape`, two-digit operands and a three-digit
    answer, so every copy is at a fixed distance."""

    def make(rng: random.Random) -> Problem:
        while True:
            op = rng.choice("+*" if fixed_shape else "+-*")
            a, b = (rng.randint(10, 99), rng.randint(10, 99)) if fixed_shape else (rng.randint(1, 99), rng.randint(1, 99))
            answer = a + b if op == "+" else a * b if op == "*" else a - b
            if not fixed_shape or 100 <= answer <= 999:
                return Problem(template="arith", text=f"What is {a} {op} {b}?", code=f"print({a} {op} {b})", answer=answer)

    return make


def _stated(rng: random.Random) -> Problem:
    """The expression stated as an assignment that the code repeats: after the first digit,
    every copied token follows the same token in the problem and in the code (inducible)."""
    op = rng.choice("+-*")
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    answer = a + b if op == "+" else a * b if op == "*" else a - b
    return Problem(template="stated", text=f"Let x = {a} {op} {b}. What is x?", code=f"x = {a} {op} {b}\nprint(x)", answer=answer)


# name -> (problems, whether the system prompt carries the tool schema as in the tiny spec)
DESIGNS: dict[str, tuple[Generator, bool]] = {
    "base9": (lambda n, seed, heldout: generate(n, seed, heldout=heldout), True),  # the tiny spec's problems
    "arith": (_distinct(_arith(False)), True),
    "arith3": (_distinct(_arith(True)), True),
    "arith3_4096": (_distinct(_arith(True)), True),  # the same with 4096 training rows (TRAIN_ROWS)
    "stated": (_distinct(_stated), True),
    "arith3_nosys": (_distinct(_arith(True)), False),  # a 106-token context instead of 244
    "base9_nosys": (lambda n, seed, heldout: generate(n, seed, heldout=heldout), False),
}


# designs with more training rows than the default 512
TRAIN_ROWS: dict[str, int] = {"arith3_4096": 4096}


def tokenize_conversation(tok: Any, messages: list[dict[str, Any]], with_tools: bool) -> tuple[list[int], list[int], list[int]]:
    """(ids, loss mask, copy mask) the way verl's multi-turn SFT dataset builds them."""
    tools = TOOLS if with_tools else None
    system = tok.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM}], tools=tools, tokenize=False)
    gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = tok(system, add_special_tokens=False)["input_ids"]
    loss = [0] * len(ids)
    for m in messages:
        part = tok(tok.apply_chat_template([m], tools=tools, tokenize=False)[len(system):], add_special_tokens=False)["input_ids"]
        mask = [0] * len(part)
        if m["role"] == "assistant":
            mask = [0] * len(gen_prompt) + [1] * (len(part) - len(gen_prompt))
        ids += part
        loss += mask
    copy = [1 if (lm and t.isdigit()) else 0 for t, lm in zip(tok.convert_ids_to_tokens(ids), loss)]
    return ids, loss, copy


def answer_prior(train: list[Problem], held: list[Problem]) -> float:
    """Accuracy on held-out answer digits of the most frequent training digit at each position."""
    by_position: dict[int, Counter[str]] = {}
    for p in train:
        for i, ch in enumerate(str(p.answer)):
            by_position.setdefault(i, Counter())[ch] += 1
    digits = [(i, ch) for p in held for i, ch in enumerate(str(p.answer))]
    hits = sum(i in by_position and by_position[i].most_common(1)[0][0] == ch for i, ch in digits)
    return hits / len(digits)


def pretrain_documents(rows: int, seed: int, tok: Any) -> list[list[int]]:
    """Short documents of math words in which 2-4 numbers or phrases recur (copying pays off)."""
    rng = random.Random(seed)
    docs: list[list[int]] = []
    for _ in range(rows):
        spans: list[str] = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < 0.6:
                spans.append(str(rng.randint(0, 10 ** rng.randint(1, 4))))
            else:
                spans.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))))
        text = " ".join(rng.choice(spans) if rng.random() < 0.35 else rng.choice(WORDS) for _ in range(rng.randint(10, 16)))
        docs.append(tok(text[0].upper() + text[1:] + ".", add_special_tokens=False)["input_ids"])
    return docs


def main(out_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from runtime.models.tiny import build_tiny_qwen2

    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "tokenizer"
    if not (model_dir / "tokenizer.json").exists():
        build_tiny_qwen2(model_dir, seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data: dict[str, Any] = {"designs": {}}
    for name, (gen, with_tools) in DESIGNS.items():
        train, held = gen(TRAIN_ROWS.get(name, 512), 0, False), gen(64, 7, True)
        gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        prompts = [
            {"ids": tokenize_conversation(tok, [{"role": "user", "content": user_content(p)}], with_tools)[0] + gen_prompt,
             "answer": str(p.answer), "code": p.code}
            for p in held
        ]
        rows = [tokenize_conversation(tok, expected_sft_messages(p), with_tools) for p in train]
        data["designs"][name] = {
            "train": rows, "held": [tokenize_conversation(tok, expected_sft_messages(p), with_tools) for p in held],
            "prompts": prompts, "answer_prior": answer_prior(train, held),
        }
        print(f"{name}: {len(rows)} rows, {sum(len(r[0]) for r in rows) / len(rows):.0f} tokens on average, "
              f"answer-digit prior {data['designs'][name]['answer_prior']:.2f}")
    data["pretrain"] = pretrain_documents(20000, 123, tok)
    torch.save(data, out_dir / "data.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
