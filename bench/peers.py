"""Peer models built from configs with random weights (nothing is downloaded).

Each builder returns the model and a callable `loss(input_ids) -> scalar` (from full logits, the
way each library trains: `labels=` for transformers, the same cross-entropy for mamba.py), for the
training-step benchmarks.  Fair against ours (which runs with dropout 0): every dropout of every
peer is 0 (GPT-2's residual, embedding and attention dropouts default to 0.1, and attention
dropout > 0 also keeps PyTorch's CPU SDPA off its flash path), and every model is returned in
train mode; callers that only decode call `.eval()`.  Peers are optional: a missing package is
reported and skipped.
"""

from __future__ import annotations

import torch


def hf_mamba2(vocab, hidden, layers, state, expand):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    heads = expand * hidden // 64
    cfg = Mamba2Config(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                       expand=expand, head_dim=64, num_heads=heads, n_groups=1, chunk_size=64,
                       tie_word_embeddings=True)
    model = Mamba2ForCausalLM(cfg).train()
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def gpt2_config(vocab, hidden, layers, seq_len, heads=None):
    """GPT-2 with SDPA attention and every dropout 0 (transformers' defaults are 0.1)."""
    from transformers import GPT2Config
    return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads or max(1, hidden // 64),
                      n_positions=seq_len, attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, summary_first_dropout=0.0)


def hf_gpt2(vocab, hidden, layers, seq_len):
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel(gpt2_config(vocab, hidden, layers, seq_len)).train()
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

    model = MambaPyLM().train()         # mamba.py has no dropout

    def loss(ids):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return model, loss


def hf_mamba(vocab, hidden, layers, state, expand):
    from transformers import MambaConfig, MambaForCausalLM
    cfg = MambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                      expand=expand, tie_word_embeddings=True)
    model = MambaForCausalLM(cfg).train()
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
