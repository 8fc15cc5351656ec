"""The `serve` section: where the server listens, the name it serves the model under, its limits
and who may use it."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..generate.settings import PREFILL_CHUNK_TOKENS
from ..util.schema import Section

API_KEY_ENV = "SPARSE_SSM_API_KEY"         # the API key when serve.api_key is not set


class ServeConfig(Section):
    section = "serve"

    host: str = "127.0.0.1"
    port: int = Field(11434, ge=0, le=65535)          # 0: any free port (printed at start)
    name: Optional[str] = None                        # model name in the APIs; None: the model directory's name
    max_batch: int = Field(16, ge=1)                  # sequences decoded together
    max_waiting: int = Field(64, ge=0)                # requests queued beyond those; more are refused (503)
    max_tokens: int = Field(1024, ge=1)               # new tokens per request at most (num_predict / max_tokens)
    max_prompt_tokens: int = Field(4096, ge=1)        # prompt tokens per request at most
    prefill_chunk_tokens: int = Field(PREFILL_CHUNK_TOKENS, ge=1)   # prompt tokens prefilled between two
    #                                                   decode steps at most (a long prompt stalls no stream longer)
    max_body_bytes: int = Field(1 << 20, ge=1024)     # request body size at most (413 beyond)
    read_timeout: float = Field(30.0, gt=0, allow_inf_nan=False)   # seconds to send a request's head, and
    #                                                   at most between two pieces of its body (408 / closed)
    api_key: Optional[str] = Field(None, min_length=1, repr=False)  # Bearer key every route but / requires
    device: str = "auto"
    weights: Optional[Literal["fp32", "bf16", "int8"]] = None   # None: the checkpoint's generation.weights
