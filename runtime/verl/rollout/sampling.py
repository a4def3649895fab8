"""Next-token choice for a batch whose rows may each have their own sampling parameters.

Log-probabilities are `log_softmax(logits / temperature)` of the chosen token, before
top-k/top-p filtering: the quantity verl's actor recomputes (`old_log_probs`), so the
rollout-vs-actor difference verl logs measures weight staleness, not a definition mismatch.
Greedy rows (temperature 0) report plain `log_softmax(logits)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RowParams:
    """One request's sampling parameters, normalised from verl's sampling_params dict."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0: off
    repetition_penalty: float = 1.0

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "RowParams":
        top_k = params.get("top_k")
        return cls(
            temperature=float(params.get("temperature", 1.0) or 0.0),
            top_p=float(params.get("top_p", 1.0) or 1.0),
            top_k=int(top_k) if top_k is not None else -1,
            repetition_penalty=float(params.get("repetition_penalty", 1.0) or 1.0),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class BatchParams:
    """Per-row parameters as tensors on the model's device."""

    temperature: torch.Tensor  # [B], 1.0 on greedy rows (scale only)
    greedy: torch.Tensor  # [B] bool
    top_p: torch.Tensor  # [B]
    top_k: torch.Tensor  # [B] long, 0 = off
    penalty: torch.Tensor  # [B]
    any_top_p: bool
    any_top_k: bool
    any_penalty: bool

    @classmethod
    def of(cls, rows: list[RowParams], device: torch.device) -> "BatchParams":
        temps = [r.temperature if not r.greedy and r.temperature > 0 else 1.0 for r in rows]
        top_k = [r.top_k if r.top_k > 0 else 0 for r in rows]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            greedy=torch.tensor([r.greedy for r in rows], dtype=torch.bool, device=device),
            top_p=torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            penalty=torch.tensor([r.repetition_penalty for r in rows], dtype=torch.float32, device=device),
            any_top_p=any(r.top_p < 1.0 for r in rows),
            any_top_k=any(k > 0 for k in top_k),
            any_penalty=any(r.repetition_penalty != 1.0 for r in rows),
        )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the sequence: positive logits divided by it,
    negative ones multiplied (penalty 1 leaves a row unchanged)."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus; at least one token stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def choose_next(
    logits: torch.Tensor,
    params: BatchParams,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token ids [B], their log-probabilities [B]) for the last-position logits [B, V]."""
    logits = logits.float()
    if params.any_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.penalty)
    scaled = logits / params.temperature[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    greedy_ids = torch.argmax(logits, dim=-1)
    if bool(params.greedy.all()):
        chosen = greedy_ids
    else:
        filtered = scaled
        if params.any_top_k or params.any_top_p:
            filtered = filter_top_k_top_p(scaled, params.top_k, params.top_p)
        probs = torch.softmax(filtered, dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        chosen = torch.where(params.greedy, greedy_ids, sampled)
    return chosen, logprobs.gather(1, chosen[:, None]).squeeze(1)
