"""Logit filters and the draw of one token (temperature 0 is greedy).  Any finite logits and any
settings a `GenerationConfig` accepts give a proper distribution: a tiny temperature or penalty,
whose division would overflow, behaves as its limit (greedy) instead of producing inf / nan."""

from __future__ import annotations

import torch

from .settings import MAX_SEED, GenerationConfig


def seeded_generator(seed: int, offset: int = 0) -> torch.Generator:
    """The CPU generator of sequence `offset` under `seed` (seed + offset, wrapped into the range
    torch.Generator.manual_seed takes, so the last seeds do not overflow)."""
    return torch.Generator(device="cpu").manual_seed((seed + offset) % (MAX_SEED + 1))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the sequence: positive logits / penalty, negative
    logits * penalty, kept finite (a tiny penalty saturates at the dtype's largest value instead of
    overflowing to inf).  logits (vocab,), seen: bool (vocab,)."""
    if penalty == 1.0:
        return logits
    largest = torch.finfo(logits.dtype).max
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty).clamp(-largest, largest)
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


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - max) / temperature, (..., vocab): the same distribution as logits / temperature,
    but the largest logit is 0 and the rest <= 0, so a tiny temperature sends them to -inf
    (greedy, ties kept) instead of overflowing to inf - inf = nan."""
    return (logits - logits.max(dim=-1, keepdim=True).values) / temperature


def next_token(logits: torch.Tensor, seen: torch.Tensor, settings: GenerationConfig,
               generator: torch.Generator | None) -> int:
    """One token id from the logits (vocab,) of one sequence."""
    logits = apply_repetition_penalty(logits.float(), seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(tempered(logits, settings.temperature), settings.top_k), settings.top_p)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def exponential_noise(generators, vocab: int, device: torch.device) -> torch.Tensor:
    """(rows, vocab) float32 Exp(1) draws on `device`, row i from generators[i] (CPU generators,
    as `next_token` uses them), drawn on the host and copied without waiting for the device."""
    noise = torch.empty(len(generators), vocab, dtype=torch.float32, pin_memory=device.type == "cuda")
    for row, generator in zip(noise, generators):
        row.exponential_(1, generator=generator)
    return noise.to(device, non_blocking=True)


def sample_rows(logits: torch.Tensor, seen: torch.Tensor, settings: GenerationConfig,
                noise: torch.Tensor | None) -> torch.Tensor:
    """`next_token` for every row at once, on the logits' device, with no host synchronisation:
    logits (rows, vocab), seen bool (rows, vocab), noise (rows, vocab) Exp(1) draws
    (`exponential_noise`; None: drawn here from the device's default generator) -> (rows,) ids.
    torch.multinomial draws one sample as argmax(probs / q) with q ~ Exp(1), so the same q gives
    the same token as `next_token`."""
    logits = apply_repetition_penalty(logits.float(), seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(tempered(logits, settings.temperature), settings.top_k), settings.top_p)
    probs = torch.softmax(logits, dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(-1)


def sample_group(logits: torch.Tensor, seen: torch.Tensor, settings: GenerationConfig,
                 generators) -> list[int] | None:
    """`next_token` for several rows that share `settings`, each drawing from its own generator, in
    one pass over the (rows, vocab) block: the same tokens as row by row (torch.multinomial's draw is
    argmax(probs / q) with q ~ Exp(1) from the generator, which `exponential_noise` draws the same
    way).  logits (rows, vocab) on the CPU, seen bool (rows, vocab).  None when a row's logits are
    not all finite (or their sum overflows): draw those row by row, where a failure is reported.
    The draws themselves (vocab Exp(1) samples a row from its generator) stay most of the cost."""
    if not bool(torch.isfinite(logits.sum())):                # 1/5 the time of isfinite(logits).all()
        return None
    noise = None if settings.temperature == 0 else exponential_noise(generators, logits.shape[-1], logits.device)
    return sample_rows(logits, seen, settings, noise).tolist()
