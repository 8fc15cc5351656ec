"""The causal language model: embeddings, a stack of `SparseSSMBlock`s, final norm, LM head.

    logits = lm_head(RMSNorm(blocks(embed(input_ids))))      (batch, length, vocab)

Recurrent inference: `prefill(input_ids)` runs the prompt through the parallel scan once and
returns the per-layer `LayerState`s; `step(token_ids, cache)` advances every layer by one token
with the recurrent update (cost independent of the context length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .block import SparseSSMBlock
from .config import SparseSSMConfig
from .layer import LayerState
from .loss import linear_cross_entropy


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None          # (batch, length, vocab); None with return_logits=False
    loss: torch.Tensor | None            # mean next-token cross-entropy when labels are given
    cache: list[LayerState]              # per-layer state after the last token


class SparseSSMForCausalLM(nn.Module):
    def __init__(self, config: SparseSSMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.blocks = nn.ModuleList(SparseSSMBlock(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """GPT-2 style: N(0, 0.02) for linear maps and embeddings, residual outputs scaled by
        1/sqrt(2 * num_layers).  The selective generators keep their own initialisation
        (zero A/D rows, the Mamba dt bias, the HiPPO A base)."""
        std = self.config.initializer_range
        nn.init.normal_(self.embed.weight, std=std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and ".generator." not in name and module is not self.lm_head:
                scale = 1 / math.sqrt(2 * self.config.num_layers) if name.endswith(("out_proj", "ffn.down")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache: list[LayerState] | None = None, return_logits: bool = True,
                last_logits_only: bool = False) -> CausalLMOutput:
        """input_ids (b, L) -> logits (b, L, vocab).  labels (b, L): the loss predicts labels[:, 1:]
        from positions [:, :-1] (pass labels = input_ids); -100 is ignored.  With labels and
        return_logits=False the loss comes from the fused chunked head (`loss.linear_cross_entropy`)
        and the logits are never materialised (logits is None): what training uses.
        last_logits_only: logits for the last position only, (b, 1, vocab) (what prefill needs)."""
        x = self.embed(input_ids)
        states = []
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the block in backward instead of keeping its activations
                x, state = checkpoint(block, x, None if cache is None else cache[i], use_reentrant=False)
            else:
                x, state = block(x, None if cache is None else cache[i])
            states.append(state)
        h = self.norm(x)
        loss = logits = None
        if labels is not None:
            # shift the labels, not the logits: slicing the logits would copy them (and their grad)
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
            if not return_logits:
                loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets)
        if return_logits:
            logits = self.lm_head(h[:, -1:] if last_logits_only else h)
            if labels is not None:
                flat = logits.flatten(0, 1)
                loss = F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), targets, ignore_index=-100)
        return CausalLMOutput(logits, loss, states)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor):
        """Run a prompt (b, L) in one parallel pass: (logits of the last token (b, vocab), cache)."""
        out = self(input_ids, last_logits_only=True)
        return out.logits[:, -1], out.cache

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: list[LayerState]):
        """One recurrent step for tokens (b,): (logits (b, vocab), new cache)."""
        out = self(token_ids[:, None], cache=cache)
        return out.logits[:, -1], out.cache

    def stream(self, prompts, **settings):
        """Iterator over generation steps for a batch of token-id prompts (any lengths): see
        `sparse_ssm.generation.stream_generate`; settings are those of `SamplingSettings`
        (plus eos_token_id)."""
        from .generation import SamplingSettings, stream_generate
        eos = settings.pop("eos_token_id", None)
        return stream_generate(self, prompts, SamplingSettings(**settings), eos)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Continue prompts (b, L): (b, L + new) ids; rows that ended at eos_token_id are padded
        with it.  Temperature 0 is greedy."""
        steps = list(self.stream(input_ids.tolist(), max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                 eos_token_id=eos_token_id))
        new = torch.stack([s.tokens for s in steps], 1).to(input_ids.device)
        new = torch.where(new < 0, eos_token_id if eos_token_id is not None else 0, new)
        return torch.cat([input_ids, new], 1)

    def parameter_groups(self, weight_decay: float, selective_lr_multiplier: float = 1.0) -> list[dict]:
        """Optimizer groups.  No weight decay for norms, biases, embeddings and the SSM's A base,
        D base and dt bias; the selective generators' weights get lr * selective_lr_multiplier
        (the key `lr_multiplier`, read by the trainer's scheduler)."""
        groups = {"decay": [], "no_decay": [], "selective": []}
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if name.endswith(("generator.proj.weight", "generator.a_up.weight")):
                groups["selective"].append(p)
            elif p.dim() < 2 or "embed" in name or name.endswith(("A_base", "D_base", "dt_bias")):
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
        return [
            {"name": "decay", "params": groups["decay"], "weight_decay": weight_decay, "lr_multiplier": 1.0},
            {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0, "lr_multiplier": 1.0},
            {"name": "selective", "params": groups["selective"], "weight_decay": weight_decay,
             "lr_multiplier": selective_lr_multiplier},
        ]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
