"""What docs/fidelity.md says verl 0.9.1's code forces, checked against verl 0.9.1 itself.

The recipe ran verl 0.6.1; no flag of 0.9.1 restores three of its behaviours, so they are listed
as `behaviour` rows of runtime.verl.recipe.differences. These tests pin what those rows claim:
the RL `token-mean` is one token mean over the mini-batch (0.6.1: each micro-batch's mean,
scaled by its share of the mini-batch's sequences); the SFT loss is one token mean over the
step (0.6.1: per micro-batch, then averaged); and the tool agent loop's token merge puts the
chat template's newline after the model's `<|im_end|>`, nothing else differing from 0.6.1's
concatenation. If a verl upgrade changes any of them, these fail and the rows must be rewritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from runtime.data.retool_sft import TOOLS, tool_call


def _old_token_mean(micro: list[tuple[torch.Tensor, torch.Tensor]], mini_batch_size: int) -> torch.Tensor:
    """verl 0.6.1's dp_actor with dynamic batching, written out: per micro-batch
    `masked_mean(loss, mask) * (its sequences / ppo_mini_batch_size)`, summed by accumulation."""
    return sum((m * l).sum() / m.sum() * (l.shape[0] / mini_batch_size) for l, m in micro)  # type: ignore[return-value]


def test_token_mean_is_one_mean_over_the_mini_batch() -> None:
    from verl.trainer.ppo.core_algos import agg_loss

    gen = torch.Generator().manual_seed(0)
    # one mini-batch of 4 sequences split the way dynamic batching does: 3 short, then 1 long
    lengths = [[3, 2, 4], [12]]
    micro = []
    for group in lengths:
        width = max(group)
        mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in group])
        micro.append((torch.rand(len(group), width, generator=gen).requires_grad_(), mask))
    total_tokens = sum(sum(g) for g in lengths)
    ours = sum(agg_loss(l, m, "token-mean", batch_num_tokens=total_tokens) for l, m in micro)
    every_token = torch.cat([l[m.bool()] for l, m in micro]).mean()
    assert torch.allclose(ours, every_token)  # each response token weighs 1 / (the mini-batch's tokens)
    assert not torch.allclose(ours, _old_token_mean(micro, mini_batch_size=4))
    # the long response's weight in the gradient: 12 of 21 tokens now; 1 of 4 sequences in 0.6.1
    long_loss = micro[1][0]
    (new_grad,) = torch.autograd.grad(ours, long_loss)
    (old_grad,) = torch.autograd.grad(_old_token_mean(micro, mini_batch_size=4), long_loss)
    assert torch.isclose(new_grad.sum(), torch.tensor(12 / 21)) and torch.isclose(old_grad.sum(), torch.tensor(1 / 4))


def test_sft_loss_is_one_token_mean_over_the_step() -> None:
    """verl 0.9.1's SFT loss, summed over a step's micro-batches, is the mean over all their
    loss tokens; 0.6.1 averaged each micro-batch and then the micro-batches
    (`data.balance_dp_token: false`), so the short micro-batch's tokens weighed more."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import sft_loss

    gen = torch.Generator().manual_seed(0)
    micro = []
    for lengths in ([4, 3], [20, 18]):  # two micro-batches of 2 rows: short, then long
        log_probs = torch.nested.nested_tensor([-torch.rand(n, generator=gen) for n in lengths], layout=torch.jagged)
        # every token in the loss, so verl's left shift of the mask changes nothing
        mask = torch.nested.nested_tensor([torch.ones(n, dtype=torch.long) for n in lengths], layout=torch.jagged)
        micro.append((log_probs, mask))
    total = sum(int(m.values().sum()) for _, m in micro)
    ours = torch.zeros(())
    for log_probs, mask in micro:
        data = TensorDict({"loss_mask": mask}, batch_size=[2])
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=total)
        loss, _ = sft_loss(None, {"log_probs": log_probs}, data)
        ours = ours + loss
    every_token = -torch.cat([lp.values() for lp, _ in micro]).mean()
    old = torch.stack([-lp.values().mean() for lp, _ in micro]).mean()
    assert torch.allclose(ours, every_token) and not torch.allclose(ours, old)


def _chat_ids(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=False)
    return list(ids)


def test_the_turn_merge_adds_only_the_templates_newline(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    user = [{"role": "user", "content": "What is 2+2?"}]
    generated = ('Let me compute.\n<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(2+2)"}}\n'
                 "</tool_call><|im_end|>")
    generated_ids = tokenizer.encode(generated, add_special_tokens=False)
    assistant = {"role": "assistant", "content": "Let me compute.", "tool_calls": [tool_call("print(2+2)")]}
    tool = [{"role": "tool", "content": "4"}]

    # verl 0.6.1's tool agent loop: prompt + generated + the tool turn's template minus the
    # default system block (which Qwen2.5 renders for `[{}]`, the tiny template for any message)
    prompt = _chat_ids(tokenizer, user, generation_prompt=True)
    system_block = tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                                    add_special_tokens=False)
    tool_turn = list(tokenizer.apply_chat_template(tool, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert tool_turn[:len(system_block)] == system_block
    old = prompt + generated_ids + tool_turn[len(system_block):]

    # verl 0.9.1's continuous-token builder, as its tool agent loop calls it
    builder = QwenContinuousTokenBuilder(tokenizer)
    ids = builder.build_initial_tokens(user, tools=TOOLS)
    assert ids == prompt
    ids = builder.merge_assistant_tokens(ids, generated_ids).token_ids
    merged = builder.merge_context_tokens(user + [assistant], user + [assistant] + tool, ids, tools=TOOLS)
    junction = len(prompt) + len(generated_ids)
    assert tokenizer.decode(merged.inserted_token_ids) == "\n"
    assert merged.token_ids[junction] == merged.inserted_token_ids[0]
    assert merged.token_ids[:junction] + merged.token_ids[junction + 1:] == old
    # with it, the junction is the chat template's own: `<|im_end|>` then a newline
    assert tokenizer.decode(merged.token_ids[junction - 1:junction + 2]) == "<|im_end|>\n<|im_start|>"
    whole = tokenizer.decode(_chat_ids(tokenizer, user + [assistant] + tool, generation_prompt=True))
    assert "</tool_call><|im_end|>\n<|im_start|>user" in whole
