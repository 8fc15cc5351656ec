"""Text generation on the recurrent cache: prefill once, then O(1) work per new token.

    for step in stream_generate(model, prompts, settings, eos_token_id):   # an iterator
        ...step.tokens (batch,), step.finished (batch,) ...

Each prompt is prefilled on its own with the parallel scan, in chunks of at most
`settings.prefill_chunk_tokens` (so prompts of different lengths need no padding, which a recurrent
state would not ignore, and a long prompt's memory is bounded), the per-layer states are stacked
into one batch, and every further token costs one recurrent step whatever the context length.  Sampling
per sequence: repetition penalty -> temperature -> top-k -> top-p -> draw; temperature 0 is
greedy.  Sequence i draws from its own generator seeded with seed + i, so a batch produces the
same text as the same prompts one by one.  On a GPU the rows are sampled together on the device
(the same draws, see `sampling.sample_rows`) and reach the host in blocks of DEVICE_BLOCK tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..data.tokenizer import EOS
from ..util.errors import ConfigError
from .cache import stack_rows
from .sampling import exponential_noise, next_token, sample_rows, seeded_generator
from .settings import GenerationConfig
from .text import TextStream


@dataclass
class Step:
    tokens: torch.Tensor      # (batch,) the token each sequence produced at this step (-1 once finished)
    finished: torch.Tensor    # (batch,) bool


# tokens a device-resident decode loop samples before it copies them to the host in one transfer
DEVICE_BLOCK = 16


@torch.no_grad()
def stream_generate(model, prompts: Sequence[Sequence[int]], settings: GenerationConfig,
                    eos_token_id: int | None = None, stop=None, on_device: bool | None = None) -> Iterator[Step]:
    """Yield one `Step` per new token for a batch of prompts (lists of token ids, any lengths).

    `stop(i, ids)` may return True to finish sequence i (e.g. when its text hit a stop string).
    `on_device` (None: when the model is not on the CPU): sample on the model's device with no
    host synchronisation per token; the tokens come to the host every DEVICE_BLOCK steps (the
    Steps arrive in bursts, `stop` sees them then) - the same tokens for a seed."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompt: every prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device
    caches, last = [], []
    for p in prompts:
        logits, cache = model.prefill(torch.tensor([list(p)], device=device), chunk_tokens=settings.prefill_chunk_tokens)
        caches.append(cache)
        last.append(logits[0])
    cache = stack_rows(caches)
    logits = torch.stack(last)
    vocab = logits.shape[-1]
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(list(p), device=device).clamp(max=vocab - 1)] = True
    generators = [None if settings.seed is None else seeded_generator(settings.seed, i) for i in range(len(prompts))]
    loop = _device_loop if (device.type != "cpu" if on_device is None else on_device) else _host_loop
    yield from loop(model, cache, logits, seen, generators, settings, eos_token_id, stop)


def _host_loop(model, cache, logits, seen, generators, settings, eos_token_id, stop):
    """One row at a time on the host: the CPU's loop."""
    rows = logits.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(settings.max_length):
        tokens = torch.full((rows,), -1, dtype=torch.long)
        for i in range(rows):
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
        feed = tokens.clamp(min=0).to(device=logits.device)   # finished rows feed a dummy token; output ignored
        logits, cache = model.step(feed, cache)


def _device_loop(model, cache, logits, seen, generators, settings, eos_token_id, stop):
    """All rows at once on the model's device; a block of DEVICE_BLOCK tokens comes to the host
    in one copy, where end-of-text and `stop` are checked in order.  Rows the host finished
    mid-block keep decoding on the device until the block ends (rows are independent; their
    tokens are dropped)."""
    rows, device = logits.shape[0], logits.device
    finished = torch.zeros(rows, dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in range(rows)]
    seeded = generators[0] is not None and settings.temperature != 0
    done = 0
    while done < settings.max_length:
        block = []
        for _ in range(min(DEVICE_BLOCK, settings.max_length - done)):
            noise = exponential_noise(generators, logits.shape[-1], device) if seeded else None
            tokens = sample_rows(logits, seen, settings, noise)
            seen.scatter_(1, tokens[:, None], True)
            block.append(tokens)
            logits, cache = model.step(tokens, cache)
        for tokens in torch.stack(block).cpu():
            done += 1
            tokens = torch.where(finished, -1, tokens)
            for i in (~finished).nonzero().flatten().tolist():
                generated[i].append(int(tokens[i]))
                if tokens[i] == eos_token_id or (stop is not None and stop(i, generated[i])):
                    finished[i] = True
            yield Step(tokens, finished.clone())
            if finished.all():
                return


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Continue prompts (b, L): (b, L + new) ids; rows that ended at eos_token_id are padded with
    it.  Temperature 0 is greedy."""
    settings = GenerationConfig(max_length=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed)
    steps = list(stream_generate(model, input_ids.tolist(), settings, eos_token_id))
    new = torch.stack([s.tokens for s in steps], 1).to(input_ids.device)
    new = torch.where(new < 0, eos_token_id if eos_token_id is not None else 0, new)
    return torch.cat([input_ids, new], 1)


def generate_streams(model, tokenizer, prompts: Sequence[str], settings: GenerationConfig,
                     num_return_sequences: int = 1, on_text=None) -> list[TextStream]:
    """Generate continuations of text prompts (num_return_sequences each, in prompt order): one
    `TextStream` a sequence, whose `text` is the continuation and `ids` the ids it sampled.

    Stops at <|endoftext|> or at a stop string (the text is cut before it).  `on_text(i, piece)`
    receives new text of sequence i as it is produced (held back while it could still become a
    stop string or ends inside a multi-byte character: `TextStream`)."""
    if not prompts or any(not p for p in prompts):
        raise ConfigError("prompt: empty prompt; give a non-empty --prompt (or non-empty lines in --prompts-file)")
    eos = tokenizer.token_to_id(EOS)
    expanded = [p for p in prompts for _ in range(num_return_sequences)]
    encoded = [tokenizer.encode(p).ids for p in expanded]
    texts = [TextStream(tokenizer, settings.stop_strings, eos) for _ in expanded]

    def stop(i, token_ids):
        return texts[i].push(token_ids[-1])

    for step in stream_generate(model, encoded, settings, eos, stop):
        for i, token in enumerate(step.tokens.tolist()):
            if on_text is not None and token >= 0:
                piece = texts[i].take(final=bool(step.finished[i]))
                if piece:
                    on_text(i, piece)
    if on_text is not None:
        for i, text in enumerate(texts):
            piece = text.take(final=True)
            if piece:
                on_text(i, piece)
    return texts


def generate_text(model, tokenizer, prompts: Sequence[str], settings: GenerationConfig,
                  num_return_sequences: int = 1, on_text=None) -> list[str]:
    """The continuations of `generate_streams` as strings."""
    return [s.text for s in generate_streams(model, tokenizer, prompts, settings, num_return_sequences, on_text)]
