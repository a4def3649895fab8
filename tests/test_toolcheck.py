"""The tool-call check: parsing hermes calls, held-out prompts, greedy decoding of a real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.data.problems import generate, is_heldout
from runtime.data.retool_sft import TOOLS
from runtime.toolcheck import heldout_prompts, parse_tool_call, tool_call_rate


def call(name: str = "code_interpreter", arguments: object = None) -> str:
    args = {"code": "print(1 + 2)"} if arguments is None else arguments
    return "Let me compute.\n<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        (call(), ""),
        (call(arguments=json.dumps({"code": "x = 2\nprint(x)"})), ""),
        ("The answer is 3.", "no <tool_call>"),
        ("<tool_call>\n{\"name\": \"code_interpreter\"", "no </tool_call>"),
        ("<tool_call>{name: code_interpreter}</tool_call>", "call is not JSON"),
        ("<tool_call>[1, 2]</tool_call>", "call is not a JSON object"),
        (call(name="python"), "name is 'python'"),
        (call(arguments=["print(1)"]), "arguments is not an object"),
        (call(arguments={"code": "  "}), "arguments.code is not a non-empty string"),
        (call(arguments={"code": "print(1 + )"}), "code does not compile"),
    ],
)
def test_parse_tool_call(completion: str, reason: str) -> None:
    got = parse_tool_call(completion)
    assert got == "" if reason == "" else got.startswith(reason), got


def test_heldout_prompts_are_deterministic_distinct_and_never_in_training_sets() -> None:
    prompts = heldout_prompts(50, seed=0)
    assert prompts == heldout_prompts(50, seed=0)
    texts = [p[0]["content"] for p in prompts]
    assert len(set(texts)) == 50 and all(p[0]["role"] == "user" for p in prompts)
    problems = [t.split("\n")[0] for t in texts]
    assert all(is_heldout(t) for t in problems)
    training = {p.text for seed in (0, 1, 2) for p in generate(2000, seed)}
    assert not training & set(problems)


def test_untrained_model_makes_no_tool_calls(h4_tiny_model: Path) -> None:
    prompts = heldout_prompts(6, seed=3)
    result = tool_call_rate(h4_tiny_model, prompts, TOOLS, max_new_tokens=24, batch_size=4)
    assert (result.n, result.ok, result.rate) == (6, 0, 0.0)
    assert result.examples and all(not e.ok and e.reason for e in result.examples)
    assert [e.prompt for e in result.examples] == [p[0]["content"] for p in prompts][: len(result.examples)]


@pytest.mark.slow
def test_generated_sft_data_teaches_the_tool_call_format(tmp_path: Path, h4_tiny_model: Path, h4_sandbox_url: str) -> None:
    """The learnability check: plain PyTorch SFT on builtin tiny_sft (512 rows, 2 epochs,
    lr 1e-2, batch 16) makes greedy decoding call the tool on held-out prompts."""
    from reconciler.spec import Dataset
    from runtime.data.prepare import prepare

    data = prepare("tiny_sft", Dataset(source="builtin:tiny_sft", format="messages", options={"rows": 512, "seed": 0}),
                   tmp_path / "data", tmp_path, sandbox_url=h4_sandbox_url)
    trained = train_sft(h4_tiny_model, Path(data.path), tmp_path / "trained", epochs=2, lr=1e-2, batch_size=16)
    result = tool_call_rate(trained, heldout_prompts(50, seed=0), TOOLS)
    assert result.rate >= 0.8, result.examples


def train_sft(model_dir: Path, parquet: Path, out_dir: Path, *, epochs: int, lr: float, batch_size: int) -> Path:
    """A minimal SFT loop over verl's own MultiTurnSFTDataset items (its loss mask), AdamW +
    warm-up + cosine like verl's defaults. Not verl's trainer: that one is H5's test."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ds = MultiTurnSFTDataset(str(parquet), tok, {"max_length": 512, "truncation": "error"})
    items = [ds[i] for i in range(len(ds))]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    steps = epochs * (len(items) // batch_size)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(items), generator=order).tolist()
        for b in range(len(items) // batch_size):
            batch = [items[i] for i in perm[b * batch_size:(b + 1) * batch_size]]
            length = max(int(x["attention_mask"].sum()) for x in batch)
            ids, attn, mask = (torch.stack([x[k][:length] for x in batch]) for k in ("input_ids", "attention_mask", "loss_mask"))
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            target_mask = mask[:, 1:].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (losses * target_mask).sum() / target_mask.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
