"""Peer models built from configs with random weights (nothing is downloaded).

Each builder returns a callable `loss(input_ids) -> scalar` and the model, for the training-step
benchmark.  Peers are optional: a missing package is reported and skipped.
"""

from __future__ import annotations

import torch


def hf_mamba2(vocab, hidden, layers, state, expand):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    heads = expand * hidden // 64
    cfg = Mamba2Config(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                       expand=expand, head_dim=64, num_heads=heads, n_groups=1, chunk_size=64,
                       tie_word_embeddings=True)
    model = Mamba2ForCausalLM(cfg)
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def hf_gpt2(vocab, hidden, layers, seq_len):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64),
                     n_positions=seq_len, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg)
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def mambapy(vocab, hidden, layers, state, expand):
    """mambapy's Mamba stack (parallel scan `pscan`) with tied embedding / head and a final norm, as
    its `lm.LM` builds it (importing `mambapy.lm` needs mamba_ssm for its Mamba-2 part)."""
    import torch.nn as nn
    import torch.nn.functional as F
    from mambapy.mamba import Mamba, MambaConfig, RMSNorm

    class MambaPyLM(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = MambaConfig(d_model=hidden, n_layers=layers, d_state=state, expand_factor=expand, pscan=True)
            self.embedding = nn.Embedding(vocab, hidden)
            self.mamba = Mamba(cfg)
            self.norm_f = RMSNorm(hidden)
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
            self.lm_head.weight = self.embedding.weight

        def forward(self, ids):
            return self.lm_head(self.norm_f(self.mamba(self.embedding(ids))))

    model = MambaPyLM()

    def loss(ids):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return model, loss


def hf_mamba(vocab, hidden, layers, state, expand):
    from transformers import MambaConfig, MambaForCausalLM
    cfg = MambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                      expand=expand, tie_word_embeddings=True)
    model = MambaForCausalLM(cfg)
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
