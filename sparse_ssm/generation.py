"""Text generation on the recurrent cache: prefill once, then O(1) work per new token.

    for step in stream_generate(model, prompts, settings, eos_token_id):   # an iterator
        ...step.tokens (batch,), step.finished (batch,) ...

Each prompt is prefilled on its own with the parallel scan (so prompts of different lengths need
no padding, which a recurrent state would not ignore), the per-layer states are stacked into one
batch, and every further token costs one recurrent step whatever the context length.  Sampling
per sequence: repetition penalty -> temperature -> top-k -> top-p -> draw; temperature 0 is
greedy.  Sequence i draws from its own generator seeded with seed + i, so a batch produces the
same text as the same prompts one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .layer import LayerState


@dataclass
class SamplingSettings:
    max_new_tokens: int = 100
    temperature: float = 1.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)

    def validate(self):
        from .config import ConfigError
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_length: must be >= 1 new token, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty: must be > 0 (1 = off), got {self.repetition_penalty}")


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


def next_token(logits: torch.Tensor, seen: torch.Tensor, settings: SamplingSettings,
               generator: torch.Generator | None) -> int:
    """One token id from the logits (vocab,) of one sequence."""
    logits = apply_repetition_penalty(logits.float(), seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(logits / settings.temperature, settings.top_k), settings.top_p)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


@dataclass
class Step:
    tokens: torch.Tensor      # (batch,) the token each sequence produced at this step (-1 once finished)
    finished: torch.Tensor    # (batch,) bool


def _stack(caches: list[list[LayerState]]) -> list[LayerState]:
    return [LayerState(torch.cat([c[i].conv for c in caches]), torch.cat([c[i].ssm for c in caches]))
            for i in range(len(caches[0]))]


@torch.no_grad()
def stream_generate(model, prompts: Sequence[Sequence[int]], settings: SamplingSettings,
                    eos_token_id: int | None = None, stop=None) -> Iterator[Step]:
    """Yield one `Step` per new token for a batch of prompts (lists of token ids, any lengths).

    `stop(i, ids)` may return True to finish sequence i (e.g. when its text hit a stop string)."""
    settings.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    caches, last = [], []
    for p in prompts:
        logits, cache = model.prefill(torch.tensor([list(p)], device=device))
        caches.append(cache)
        last.append(logits[0])
    cache = _stack(caches)
    logits = torch.stack(last)
    vocab = logits.shape[-1]
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(list(p), device=device).clamp(max=vocab - 1)] = True
    generators = [None if settings.seed is None else torch.Generator(device="cpu").manual_seed(settings.seed + i)
                  for i in range(len(prompts))]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in prompts]
    for _ in range(settings.max_new_tokens):
        tokens = torch.full((len(prompts),), -1, dtype=torch.long)
        for i in range(len(prompts)):
            if finished[i]:
                continue
            token = next_token(logits[i].cpu(), seen[i].cpu(), settings, generators[i])
            tokens[i] = token
            generated[i].append(token)
            seen[i, token] = True
            if token == eos_token_id or (stop is not None and stop(i, generated[i])):
                finished[i] = True
        yield Step(tokens, finished.clone())
        if finished.all():
            return
        feed = tokens.clamp(min=0).to(device)     # finished rows feed a dummy token; their output is ignored
        logits, cache = model.step(feed, cache)


def generate_text(model, tokenizer, prompts: Sequence[str], settings: SamplingSettings,
                  num_return_sequences: int = 1, on_text=None) -> list[str]:
    """Generate continuations of text prompts (num_return_sequences each, in prompt order).

    Stops at <|endoftext|> or at a stop string (the text is cut before it).  `on_text(i, piece)`
    receives new text of sequence i as it is produced (held back while it could still become a
    stop string or ends inside a multi-byte character)."""
    from .tokenizer import EOS

    if not prompts or any(not p for p in prompts):
        raise ValueError("empty prompt: give a non-empty --prompt (or non-empty lines in --prompts-file)")
    eos = tokenizer.token_to_id(EOS)
    expanded = [p for p in prompts for _ in range(num_return_sequences)]
    encoded = [tokenizer.encode(p).ids for p in expanded]
    ids: list[list[int]] = [[] for _ in expanded]
    shown = [0] * len(expanded)
    hold = max((len(s) for s in settings.stop_strings), default=1) - 1

    def cut(text):
        ends = [text.find(s) for s in settings.stop_strings if s in text]
        return text[:min(ends)] if ends else text

    def stop(i, token_ids):
        return bool(settings.stop_strings) and cut(tokenizer.decode(token_ids)) != tokenizer.decode(token_ids)

    for step in stream_generate(model, encoded, settings, eos, stop):
        for i, token in enumerate(step.tokens.tolist()):
            if token >= 0 and token != eos:
                ids[i].append(token)
            if on_text is None or token < 0:
                continue
            text = cut(tokenizer.decode(ids[i]))
            ready = len(text) if step.finished[i] else max(len(text) - hold, 0)
            while ready > shown[i] and text[ready - 1] == "\ufffd" and not step.finished[i]:
                ready -= 1
            if ready > shown[i]:
                on_text(i, text[shown[i]:ready])
                shown[i] = ready
    texts = [cut(tokenizer.decode(t)) for t in ids]
    if on_text is not None:
        for i, text in enumerate(texts):
            if len(text) > shown[i]:
                on_text(i, text[shown[i]:])
    return texts
