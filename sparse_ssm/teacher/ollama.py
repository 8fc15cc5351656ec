"""The Ollama teacher: an Ollama server through the official `ollama` client (`/api/generate`).

With `logprobs`, Ollama returns token *strings*; they are mapped to ids with the tokenizer of the
model's GGUF blob in the Ollama model store (`gguf.ollama_model_blob`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..util.errors import TeacherError
from .backends import Completion, Request, Teacher
from .config import host_fix, host_problem
from .gguf import BUNDLED_GGUF, TokenStringMapper, gguf_tokenizer_json, ollama_model_blob

OLLAMA_DEFAULT_HOST = "http://127.0.0.1:11434"


class OllamaTeacher(Teacher):
    backend = "ollama"
    concurrent = True

    def __init__(self, model: str, host: str | None = None, timeout_s: float = 600.0):
        try:
            import ollama
        except ImportError:
            raise TeacherError("the ollama backend needs the ollama client: pip install -e '.[teacher]'") from None
        self._ollama = ollama
        self.model = model
        self.host = host or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT_HOST
        if host_problem(self.host):
            where = "--host / synthetic.host" if host else "the environment variable OLLAMA_HOST"
            raise TeacherError(f"{where}: {host_fix(self.host)}", summary=f"{self.host!r} is no server address")
        self.client = ollama.Client(host=self.host, timeout=timeout_s)
        self._mapper = None
        self._tokenizer_json = None
        try:
            self.client.show(model)
        except ConnectionError:
            raise TeacherError(f"no Ollama server answers at {self.host}: start it with `ollama serve` (install: "
                               f"https://ollama.com/download), point --host / OLLAMA_HOST at it, or use the offline "
                               f"teacher: --backend llama_cpp --model {BUNDLED_GGUF}",
                               summary=f"no Ollama server answers at {self.host}") from None
        except ollama.ResponseError as e:
            if e.status_code == 404:
                raise TeacherError(f"the Ollama server at {self.host} does not have the model {model!r}: "
                                   f"run `ollama pull {model}`, or pick another with --model",
                                   summary=f"the Ollama server at {self.host} does not have {model!r}") from None
            raise TeacherError(f"Ollama at {self.host} refused /api/show for {model!r}: {e.error} "
                               f"(HTTP {e.status_code})") from None

    def describe(self) -> dict:
        return {"backend": "ollama", "model": self.model, "host": self.host}

    def tokenizer_json(self) -> Path:
        if self._tokenizer_json is None:
            self._tokenizer_json = gguf_tokenizer_json(ollama_model_blob(self.model))
        return self._tokenizer_json

    def _token_ids(self, strings: list[str]) -> list[int]:
        if self._mapper is None:
            from tokenizers import Tokenizer
            self._mapper = TokenStringMapper(Tokenizer.from_file(str(self.tokenizer_json())))
        return [self._mapper(s) for s in strings]

    def complete(self, request: Request) -> Completion:
        ollama = self._ollama
        options = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
                   "num_predict": request.max_new_tokens, "seed": request.seed}
        k = request.top_logprobs
        try:
            response = self.client.generate(model=self.model, prompt=request.prompt, options=options,
                                            logprobs=True if k else None, top_logprobs=k or None)
        except ConnectionError:
            raise TeacherError(f"the Ollama server at {self.host} stopped answering; start it again and continue "
                               f"with --resume") from None
        except ollama.ResponseError as e:
            raise TeacherError(f"Ollama at {self.host} refused the request: {e.error} (HTTP {e.status_code})") from None
        except Exception as e:  # noqa: BLE001 - httpx timeouts, malformed JSON, ...
            raise TeacherError(f"bad answer from Ollama at {self.host}: {type(e).__name__}: {e}") from None
        text = response.response or ""
        finish = "length" if response.done_reason == "length" else "stop"
        count = response.eval_count or 0
        if not k:
            return Completion(text=text, finish_reason=finish, num_tokens=count)
        entries = response.logprobs or []
        if not entries and text:
            raise TeacherError(f"Ollama at {self.host} returned no logprobs: --distillation needs Ollama >= 0.12.11")
        token_ids = self._token_ids([e.token for e in entries])
        top_ids = np.full((len(entries), k), -1, dtype=np.int32)
        top_lp = np.full((len(entries), k), -np.inf, dtype=np.float32)
        for row, entry in enumerate(entries):
            alternatives = list(entry.top_logprobs or [])[:k]
            ids = self._token_ids([a.token for a in alternatives])
            for col, (a, i) in enumerate(zip(alternatives, ids)):
                if i >= 0:
                    top_ids[row, col], top_lp[row, col] = i, a.logprob
        return Completion(text=text, finish_reason=finish, num_tokens=len(entries), token_ids=token_ids,
                          top_ids=top_ids, top_logprobs=top_lp)
