"""A real (small, randomly initialised) language model of ours behind the teacher interface,
decoded by the same loop as the GGUF backends: the teacher of the create-synthetic and
distillation tests (and, through `ollama_server.model_backed`, the model behind the local Ollama
API server)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from helpers import make_text
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.data.tokenizer import EOS, train_tokenizer
from sparse_ssm.teacher.backends import LocalTeacher
from sparse_ssm.teacher.config import SyntheticConfig


@functools.lru_cache(maxsize=1)
def teacher_tokenizer():
    """The teachers' byte-level BPE (vocabulary 300), trained once per session; read-only."""
    return train_tokenizer([make_text(400, seed=s) for s in range(3)], 300)


class SSMTeacher(LocalTeacher):
    backend = "ssm"

    def __init__(self, folder: Path, fail_after: int | None = None):
        self.tokenizer = teacher_tokenizer()
        self.path = Path(folder) / "teacher-tokenizer.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(self.path))
        torch.manual_seed(0)
        self.model = SparseSSMForCausalLM(SparseSSMConfig(vocab_size=self.tokenizer.get_vocab_size(), hidden_dim=32,
                                                          state_dim=8, ffn_dim=0, num_layers=2, max_seq_len=512,
                                                          dropout=0.0)).eval()
        self.stop_ids = {self.tokenizer.token_to_id(EOS)}
        self.pad_id = self.tokenizer.token_to_id(EOS)
        self.fail_after, self.calls = fail_after, 0

    def describe(self):
        return {"backend": "ssm", "model": "tiny"}

    def tokenizer_json(self):
        return self.path

    def complete(self, request):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return super().complete(request)

    def _tokenize(self, text):
        return self.tokenizer.encode(text).ids

    @torch.no_grad()
    def _start(self, prompts):
        logits, self.cache = self.model.prefill(torch.tensor(prompts))
        return logits

    @torch.no_grad()
    def _next(self, tokens):
        logits, self.cache = self.model.step(torch.tensor(tokens), self.cache)
        return logits

    def _detokenize(self, ids):
        return self.tokenizer.decode(ids)


def synthetic_config(folder, **kw) -> SyntheticConfig:
    """A small create-synthetic run writing FOLDER/out/data.json (sampling without top-k/top-p)."""
    values = dict(backend="transformers", num_samples=4, max_new_tokens=24, min_words=3,
                  output_dir=str(Path(folder) / "out"), output_file="data.json", temperature=1.0, top_k=0, top_p=1.0)
    values.update(kw)
    return SyntheticConfig(**values)
