"""Batched generation with a transformers causal LM: left-padded prefill, KV-cached decode,
per-row sampling parameters, stop tokens and token budgets.

One `generate` call serves many requests at once (the server groups concurrent requests
into a batch); rows that finish early ride along masked until the batch is done. Greedy
rows of a batch produce the same tokens as when decoded alone (tested).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from runtime.verl.rollout.sampling import BatchParams, RowParams, choose_next

logger = logging.getLogger(__name__)

Finish = Literal["stop", "length", "aborted"]


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: RowParams = field(default_factory=RowParams)
    stop_ids: frozenset[int] = frozenset()
    logprobs: bool = False
    ignore_eos: bool = False


@dataclass
class GenResult:
    token_ids: list[int]
    log_probs: list[float] | None
    finish: Finish


def default_dtype(device: str, configured: str | None) -> torch.dtype:
    """The rollout's compute dtype: the configured one on an accelerator; float32 on CPU,
    where the trainer also computes in float32 (bf16 matmuls there are slow and would make
    rollout and actor log-probs disagree)."""
    if device == "cpu":
        return torch.float32
    return getattr(torch, configured or "bfloat16")


class GenerationEngine:
    """A transformers model plus what decoding needs (stop ids, padding, RNG)."""

    def __init__(self, model: torch.nn.Module, *, eos_ids: Iterable[int], pad_id: int, device: str, seed: int = 0):
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"the rollout engine needs a Hugging Face causal LM, not {type(model).__name__}")
        self.model = model.eval()
        self.vocab_size: int = model.config.vocab_size
        self.device = device
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.lock = threading.Lock()  # generation, weight loads and offload never overlap
        self._on_device = True

    @classmethod
    def load(
        cls, path: str, *, device: str, dtype: torch.dtype, trust_remote_code: bool = False, seed: int = 0
    ) -> "GenerationEngine":
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
        )
        # transformers wraps PreTrainedModel.to with functools.wraps, so its type is torch's
        # unbound Module.to; called through the Module type it checks (and moves in place).
        module: torch.nn.Module = model
        module.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        eos: set[int] = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            gen_eos = None
        for value in (gen_eos, model.config.eos_token_id, tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif value:
                eos.update(int(v) for v in value)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        return cls(model, eos_ids=eos, pad_id=pad, device=device, seed=seed)

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy named tensors into the model (HF names; tied aliases accepted). Every
        parameter must be covered; returns the number of tensors copied."""
        with self.lock, torch.no_grad():
            targets = self.model.state_dict(keep_vars=True)
            params = {id(p): name for name, p in self.model.named_parameters()}
            covered: set[int] = set()
            count = 0
            for name, tensor in weights:
                target = targets.get(name)
                if target is None:
                    raise KeyError(f"weight {name!r} has no counterpart in the rollout model")
                target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
                covered.add(id(target))
                count += 1
            missing = [name for pid, name in params.items() if pid not in covered]
            if missing:
                raise KeyError(f"weight sync left {len(missing)} parameters stale, e.g. {missing[:3]}")
            return count

    def offload(self) -> None:
        """Free accelerator memory between rollouts (no-op on CPU)."""
        with self.lock:
            if self.device != "cpu" and self._on_device:
                self.model.to("cpu")
                torch.cuda.empty_cache()
                self._on_device = False

    def onload(self) -> None:
        with self.lock:
            if not self._on_device:
                self.model.to(self.device)
                self._on_device = True

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def generate(self, requests: list[GenRequest], should_abort: Callable[[], bool] = lambda: False) -> list[GenResult]:
        if not requests:
            return []
        with self.lock:
            if not self._on_device:
                self.model.to(self.device)
                self._on_device = True
            return self._generate(requests, should_abort)

    def _generate(self, requests: list[GenRequest], should_abort: Callable[[], bool]) -> list[GenResult]:
        dev = torch.device(self.device)
        rows = len(requests)
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((rows, width), dtype=torch.long, device=dev)
        for i, r in enumerate(requests):
            if not r.prompt_ids:
                raise ValueError("empty prompt")
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        budgets = [max(1, min(r.max_tokens, self.max_positions - len(r.prompt_ids))) for r in requests]
        stops = [r.stop_ids if r.ignore_eos else r.stop_ids | self.eos_ids for r in requests]
        params = BatchParams.of([r.params for r in requests], dev)
        seen = None
        if params.any_penalty:
            seen = torch.zeros((rows, self.vocab_size), dtype=torch.bool, device=dev)
            seen.scatter_(1, ids, mask.bool())

        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        tokens: list[list[int]] = [[] for _ in requests]
        logps: list[list[float]] = [[] for _ in requests]
        finish: list[Finish | None] = [None] * rows
        next_pos = positions[:, -1:]
        for _ in range(max(budgets)):
            chosen, chosen_lp = choose_next(logits, params, seen, self.generator)
            chosen_list, lp_list = chosen.tolist(), chosen_lp.tolist()
            for i in range(rows):
                if finish[i] is not None:
                    continue
                tokens[i].append(chosen_list[i])
                logps[i].append(lp_list[i])
                if chosen_list[i] in stops[i]:
                    finish[i] = "stop"
                elif len(tokens[i]) >= budgets[i]:
                    finish[i] = "length"
            if all(f is not None for f in finish):
                break
            if should_abort():
                finish = [f if f is not None else "aborted" for f in finish]
                break
            if seen is not None:
                seen.scatter_(1, chosen[:, None], True)
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=dev)], dim=1)
            next_pos = next_pos + 1
            out = self.model(
                input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos,
                past_key_values=cache, use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1, :]
        return [
            GenResult(token_ids=tokens[i], log_probs=logps[i] if r.logprobs else None, finish=finish[i] or "length")
            for i, r in enumerate(requests)
        ]
