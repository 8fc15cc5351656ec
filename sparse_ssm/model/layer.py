"""The selective SSM layer (the token mixer of a block).

    x (batch, length, hidden) --in_proj--> u, z (b, L, E)         E = expand * hidden
    u --causal depthwise conv (kernel K) + SiLU--> u
    u --SelectiveParameterGenerator--> dt, A_t, B_t, C_t, D_t     per head (H heads of P = E/H channels)
    y = selective_scan(u, ...)                                    (b, L, H, P) -> (b, L, E)
    out = out_proj(y * SiLU(z))                                   (b, L, hidden)

`forward(x, state)` runs the whole sequence (the parallel scan) from an optional `LayerState`
and returns the state after the last token, so a prompt is prefilled in one pass; a call with
length 1 is one recurrent step (the sequential scan: O(1) in the context length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SparseSSMConfig
from ..ssm.scan import selective_scan
from ..ssm.structures import make_structure
from ..ssm.selective import SelectiveParameterGenerator


@dataclass
class LayerState:
    """Recurrent state of one layer: the last K-1 conv inputs and the SSM state."""

    conv: torch.Tensor  # (batch, E, K - 1)
    ssm: torch.Tensor   # (batch, heads, N, P), float32


class SelectiveSSMLayer(nn.Module):
    def __init__(self, config: SparseSSMConfig):
        super().__init__()
        self.config = config
        E, H = config.inner_dim, config.resolved_num_heads
        self.inner_dim, self.num_heads, self.head_dim = E, H, E // H
        self.structure = make_structure(config.selective_param_class, config.state_dim,
                                        config.sparsity_level, config.low_rank_rank, config.sparsity_pattern)
        self.in_proj = nn.Linear(config.hidden_dim, 2 * E, bias=False)
        self.conv = nn.Conv1d(E, E, config.conv_kernel, groups=E, bias=True)
        self.generator = SelectiveParameterGenerator(E, H, self.structure, config.hippo_init,
                                                     config.dt_min, config.dt_max, num_groups=config.num_groups,
                                                     a_rank=config.resolved_a_generator_rank,
                                                     selective=config.selective)
        self.out_proj = nn.Linear(E, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, state: LayerState | None = None):
        """x (b, L, hidden) -> (out (b, L, hidden), LayerState after the last token)."""
        b, L, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)
        K = self.config.conv_kernel
        u = u.transpose(1, 2)                                            # (b, E, L)
        past = u.new_zeros(b, self.inner_dim, K - 1) if state is None else state.conv.to(u.dtype)
        u = torch.cat([past, u], dim=-1)
        # a copy, not a view: the state must not keep the whole (b, E, L) input alive
        conv_state = u[..., -(K - 1):].clone() if K > 1 else u[..., :0]
        u = F.silu(self.conv(u)).transpose(1, 2)                         # (b, L, E)

        # the scan runs in (at least) float32, as Mamba's kernels do, whatever the autocast dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            uf = u.float() if u.dtype in (torch.float16, torch.bfloat16) else u
            dt, A, B, C, D = self.generator(uf)
            cfg = self.config
            y, ssm_state = selective_scan(
                uf.reshape(b, L, self.num_heads, self.head_dim), dt, A, B, C, D, self.structure,
                cfg.discretization, cfg.gbt_alpha, None if state is None else state.ssm,
                use_parallel_scan=cfg.use_parallel_scan and L > 1, chunk_size=cfg.scan_chunk_size)
        y = y.reshape(b, L, self.inner_dim).to(z.dtype) * F.silu(z)
        return self.out_proj(y), LayerState(conv_state, ssm_state)

    def ssm_cost_per_token(self) -> dict:
        """Analytic cost of the selective SSM per token (multiply-adds counted as 2 FLOPs).

        `generator`: the fused parameter projection; `state`: per head, building A_t, discretising
        it and the state update A_bar X + B_bar u^T plus the readout X^T C; `params`: parameters of
        the generator (incl. A base, D base, dt bias).  The in/out projections and the conv are the
        same for every structure and are reported apart (`projections`)."""
        H, N, P = self.num_heads, self.structure.state_dim, self.head_dim
        per_head = self.structure.flops_per_token(P)
        state = H * (sum(per_head.values()) + 4 * N * P)
        generator = 2 * (self.inner_dim * self.generator.proj.out_features + self.generator.a_up.weight.numel())
        projections = 2 * (self.in_proj.in_features * self.in_proj.out_features
                           + self.out_proj.in_features * self.out_proj.out_features) + 2 * self.inner_dim * self.config.conv_kernel
        return {"structure": self.structure.name, "generator_flops": generator, "state_flops": state,
                "ssm_flops": generator + state, "projection_flops": projections,
                "generator_params": sum(p.numel() for p in self.generator.parameters())}

