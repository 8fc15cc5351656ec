"""The `generation` section: the one class of sampling settings, used by `main.py generate` (whose
flags override it), `generate.stream_generate`, the teachers' own decoding and the server, and the
weights a checkpoint is loaded with for inference (`generate.loading`: generate, evaluate, serve)."""

from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import Field, field_validator

from ..util.schema import Section

MAX_SEED = 2**64 - 1                 # the largest seed torch.Generator.manual_seed takes
# prompt tokens a prefill pass takes at most (bench/results/prefill_chunks.md, a 4,096-token prompt at
# widths 128 / 512: 256 keeps 0.89 / 0.99x the one-pass prefill's tokens/s at 1/3 / 1/7 of its peak
# memory, and a chunk - what a long prompt may stall the server's other streams by - takes 14 / 138 ms;
# 128 loses 13-23% of the throughput, 512 doubles the stall for 5-9%)
PREFILL_CHUNK_TOKENS = 256


class GenerationConfig(Section):
    """Sampling per sequence: repetition penalty -> temperature -> top-k -> top-p -> draw."""

    section = "generation"

    max_length: int = Field(100, ge=1)                                   # number of NEW tokens
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)         # 0 (or tiny): greedy
    top_k: int = Field(0, ge=0)                                          # 0: off
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)       # 1: off
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)  # 1: off
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)    # sequence i draws from a generator seeded seed + i
    stop_strings: List[str] = Field(default_factory=list)
    num_return_sequences: int = Field(1, ge=1)
    # the weights for inference (the scan and its state stay float32): fp32 as trained, bf16, or int8
    # weight-only with per-output-channel scales (`model.quantize`); flag --weights
    weights: Literal["fp32", "bf16", "int8"] = "fp32"
    # the prompt runs through the parallel scan in chunks of at most this many tokens, each layer's
    # state carried between them: the prefill's memory is bounded by it, not by the prompt's length
    prefill_chunk_tokens: int = Field(PREFILL_CHUNK_TOKENS, ge=1)

    @field_validator("stop_strings")
    @classmethod
    def _no_empty_stop(cls, stops: list[str]) -> list[str]:
        if any(not s for s in stops):
            raise ValueError("an empty stop string would end every sequence at once; leave it out")
        return stops
