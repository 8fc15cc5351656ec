"""The causal language model: embeddings, a stack of `SparseSSMBlock`s, final norm, LM head.

    logits = lm_head(RMSNorm(blocks(embed(input_ids))))      (batch, length, vocab)

Recurrent inference: `prefill(input_ids)` runs the prompt through the parallel scan (in one pass,
or in chunks of `chunk_tokens` with each layer's state carried between them, so that memory is
bounded) and returns the per-layer `LayerState`s; `step(token_ids, cache)` advances every layer by
one token with the recurrent update, in place (cost independent of the context length).  Sampling loops live in
`sparse_ssm.generate`; optimizer groups in `sparse_ssm.train.optim`.
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
from .layer import LayerState, norm_step
from .loss import linear_cross_entropy
from ..ssm.kernels import lm_head_rows
from ..ssm.selective import SelectiveParameterGenerator

# decoding batches up to this many rows take the native LM head kernel (bf16: from 8 rows F.linear's
# bf16 GEMM is as fast, bench/lm_head.py)
HEAD_KERNEL_ROWS = {torch.float32: 8, torch.float64: 8, torch.bfloat16: 4}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None          # (batch, length, vocab); None with return_logits=False
    loss: torch.Tensor | None            # mean next-token cross-entropy when labels are given
    cache: list[LayerState]              # per-layer state after the last token


class SparseSSMForCausalLM(nn.Module):
    def __init__(self, config: SparseSSMConfig, init_weights: bool = True):
        """init_weights=False: the linear maps and embedding keep what their constructors gave them
        (a loader that overwrites every parameter skips the work: `weights_file.empty_model`)."""
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.blocks = nn.ModuleList(SparseSSMBlock(config.layer_config(i)) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False
        if init_weights:
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """Embeddings N(0, initializer_range); the linear maps by `config.weight_init`:

        - `mamba` (mamba_ssm's `_init_weights`): nn.Linear's own Kaiming-uniform init,
          uniform(+-1/sqrt(fan_in)), for every linear map including the generator's dt/B/C rows,
          and the residual outputs (out_proj, ffn.down) divided by sqrt(residuals per layer *
          num_layers);
        - `gpt2`: N(0, initializer_range) for every linear map but the generator's (which keeps
          its N(0, 0.02) rows), residual outputs scaled by 1/sqrt(2 * num_layers).

        Either way the generator's A/D rows start at zero and dt bias, A base, D base keep their
        Mamba / HiPPO initialisation (`SelectiveParameterGenerator`)."""
        cfg = self.config
        mamba = cfg.weight_init == "mamba"
        residual_scale = 1 / math.sqrt((2 if cfg.ffn_dim or not mamba else 1) * cfg.num_layers)
        nn.init.normal_(self.embed.weight, std=cfg.initializer_range)
        for name, module in self.named_modules():
            if mamba and isinstance(module, SelectiveParameterGenerator):
                module.reset_generator(std=None)
            if not isinstance(module, nn.Linear) or ".generator." in name or module is self.lm_head:
                continue
            scale = residual_scale if name.endswith(("out_proj", "ffn.down")) else 1.0
            if mamba:
                module.reset_parameters()
                module.weight *= scale
            else:
                nn.init.normal_(module.weight, std=cfg.initializer_range * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range)

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
        # the fused chunked head needs a float head weight (an int8 head computes its logits)
        fused_loss = labels is not None and not return_logits and isinstance(self.lm_head, nn.Linear)
        if labels is not None:
            # shift the labels, not the logits: slicing the logits would copy them (and their grad)
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
            if fused_loss:
                loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets)
        if return_logits or (labels is not None and not fused_loss):
            logits = self.lm_head(h[:, -1:] if last_logits_only else h)
            if labels is not None:
                flat = logits.flatten(0, 1)
                loss = F.cross_entropy(flat.to(torch.promote_types(flat.dtype, torch.float32)), targets, ignore_index=-100)
        return CausalLMOutput(logits if return_logits else None, loss, states)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: list[LayerState] | None = None,
                chunk_tokens: int | None = None):
        """Run a prompt (b, L) through the parallel scan: (logits of its last token (b, vocab), cache).

        `cache`: continue from this state (e.g. the previous chunk's; it is not modified); None: from
        the start.  `chunk_tokens` C: at most C tokens a pass, each layer's state (SSM state and conv
        tail) carried from chunk to chunk, so the activations' memory is set by C, not L (None: one
        pass).  The result equals the one-pass prefill's up to float rounding."""
        if input_ids.shape[1] == 0:
            raise ValueError("prefill needs at least one token a row")
        L = input_ids.shape[1]
        step = L if chunk_tokens is None else chunk_tokens
        for start in range(0, L, step):          # the LM head only for the last chunk's last token
            out = self(input_ids[:, start:start + step], cache=cache, return_logits=start + step >= L,
                       last_logits_only=True)
            cache = out.cache
        return out.logits[:, -1], cache

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: list[LayerState]):
        """One recurrent step for tokens (b,): (logits (b, vocab), cache).  The cache is advanced in
        place and returned (copy it first to keep the state before the step)."""
        x = self.embed(token_ids)
        for block, state in zip(self.blocks, cache):
            x = block.step(x, state)
        return self.head_rows(norm_step(self.norm, x)), cache

    def head_rows(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head of a decoding step's rows h (b, hidden) -> logits (b, vocab): a float head by
        the native few-rows kernel for b <= HEAD_KERNEL_ROWS (one pass over its weight; 1.5-2x
        F.linear at the 130 M size, bench/lm_head.py), otherwise (and as the reference) `lm_head`."""
        head = self.lm_head
        if isinstance(head, nn.Linear) and head.bias is None and h.shape[0] <= HEAD_KERNEL_ROWS.get(h.dtype, 0):
            logits = lm_head_rows(h, head.weight)
            if logits is not None:
                return logits
        return head(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
