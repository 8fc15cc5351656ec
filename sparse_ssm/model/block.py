"""A Mamba-inspired residual block: pre-norm SSM mixer, then (optionally) a pre-norm FFN.

    x = x + dropout(SelectiveSSMLayer(RMSNorm(x)))
    x = x + dropout(FFN(RMSNorm(x)))          FFN: Linear(hidden, ffn_dim) -> activation -> Linear
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ssm.fused import decode_ffn
from ..ssm.quantized import decode_weight
from .config import SparseSSMConfig
from .layer import LayerState, SelectiveSSMLayer, norm_step

ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "relu": nn.ReLU}


class FeedForward(nn.Module):
    def __init__(self, config: SparseSSMConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_dim, config.ffn_dim)
        self.activation = config.activation
        self.act = ACTIVATIONS[config.activation]()
        self.down = nn.Linear(config.ffn_dim, config.hidden_dim)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class SparseSSMBlock(nn.Module):
    def __init__(self, config: SparseSSMConfig):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.hidden_dim, eps=config.norm_eps)
        self.mixer = SelectiveSSMLayer(config)
        self.ffn_norm = nn.RMSNorm(config.hidden_dim, eps=config.norm_eps) if config.ffn_dim else None
        self.ffn = FeedForward(config) if config.ffn_dim else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, state: LayerState | None = None):
        """x (b, L, hidden) -> (x (b, L, hidden), LayerState)."""
        mixed, state = self.mixer(self.mixer_norm(x), state)
        x = x + self.dropout(mixed)
        if self.ffn is not None:
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, state

    def step(self, x: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token x (b, hidden) -> (b, hidden); `state` is advanced in place."""
        x = self.mixer.residual_step(x, self.mixer_norm, state)
        if self.ffn is not None:
            x = self._ffn_step(x)
        return x

    def _ffn_step(self, x: torch.Tensor) -> torch.Tensor:
        """x + ffn(ffn_norm(x)) for one token a row x (b, hidden): one native call where it runs
        (float32/64 on CPU, float or weight-only int8 linear maps), else the modules."""
        up, down, norm = self.ffn.up, self.ffn.down, self.ffn_norm
        W_up, W_down = decode_weight(up), decode_weight(down)
        if W_up is not None and W_down is not None:
            out = decode_ffn(x, norm.weight, norm.eps, W_up, up.bias, W_down, down.bias, self.ffn.activation)
            if out is not None:
                return out
        return x + self.ffn(norm_step(norm, x))
