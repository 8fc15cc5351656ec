"""Logit filters and the draw of one token (temperature 0 is greedy)."""

from __future__ import annotations

import torch

from .settings import GenerationConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the sequence: positive logits / penalty, negative
    logits * penalty.  logits (vocab,), seen: bool (vocab,)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value are kept), -inf elsewhere.  (..., vocab)"""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (the most
    likely token is always kept), -inf elsewhere.  (..., vocab)"""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs            # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, seen: torch.Tensor, settings: GenerationConfig,
               generator: torch.Generator | None) -> int:
    """One token id from the logits (vocab,) of one sequence."""
    logits = apply_repetition_penalty(logits.float(), seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits / settings.temperature, settings.top_k), settings.top_p)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
