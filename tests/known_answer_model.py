"""A known-answer model for end-to-end tests of the grading path.

The tiny SFT model learns the tool-call format but not to copy a problem's numbers into its
code, so every evaluation of it reads ~0 and no end-to-end test would see the grader say
"correct". Fine-tuning it until it has memorised the solutions of the very problems an
evaluation asks (with plain PyTorch, on the same chat rendering and tool schema as the SFT
data) gives a model that solves most of them by calling the code tool and boxing the output:
the engines, the sandbox round trip, the recipe's scorer, mean@n, pass@k and verl's
validation then all see correct answers. It proves nothing about learning; it is a fixture.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any


def assistant_masked_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of the chat-rendered conversation and a 0/1 mask of the assistant's tokens."""
    ids: list[int] = []
    mask: list[int] = []
    previous = ""
    for i, message in enumerate(messages):
        text = str(tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False))
        assert text.startswith(previous), "the chat template does not render conversations prefix by prefix"
        piece = tokenizer(text[len(previous):], add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(message["role"] == "assistant")] * len(piece)
        previous = text
    return ids, mask


def memorise(base: Path, out: Path, conversations: list[list[dict[str, Any]]], *, steps: int = 150,
             lr: float = 1e-2, seed: int = 0) -> Path:
    """`base` fine-tuned on `conversations` (loss on the assistant's tokens), saved to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.data.retool_sft import TOOLS

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    encoded = [assistant_masked_ids(tokenizer, c, TOOLS) for c in conversations]
    pad = int(tokenizer.pad_token_id or 0)
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded])
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)] + [-100] * (width - len(ids)) for ids, mask in encoded])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded])
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = random.Random(seed)
    batch = min(16, len(encoded))
    model.train()
    for _ in range(steps):
        rows = order.sample(range(len(encoded)), batch)
        loss = model(input_ids=input_ids[rows], attention_mask=attention[rows], labels=labels[rows]).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
