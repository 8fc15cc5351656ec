"""The selective SSM layer (the token mixer of a block).

    x (batch, length, hidden) --in_proj--> u, z (b, L, E)         E = expand * hidden
    u --causal depthwise conv (kernel K) + SiLU--> u              (ssm.conv: fused on CPUs)
    u --SelectiveParameterGenerator--> dt, A_t, B_t, C_t, D_t     per head (H heads of P = E/H channels)
    y = selective_scan(u, ..., z) = scan(u) * SiLU(z)            (b, L, H, P) -> (b, L, E), the gate fused
    out = out_proj(y)                                             (b, L, hidden)

`forward(x, state)` runs the whole sequence (the parallel scan) from an optional `LayerState`
and returns the state after the last token, so a prompt is prefilled in one pass.  `step(x, state)`
is the decoding path: one token per row, the state advanced in place (the conv inputs as a rolling
buffer, the SSM state by the fused kernel's one-token scan), no sequence dimension anywhere:
O(1) in the context length and few operations per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .config import SparseSSMConfig
from ..ssm.conv import causal_conv_silu, conv_step
from ..ssm.fused import BlockStepPlan, block_step_plan, decode_layer_step, decode_rms_norm, step_code
from ..ssm.quantized import decode_weight
from ..ssm.scan import selective_scan, selective_scan_step
from ..ssm.structures import make_structure
from ..ssm.selective import SelectiveParameterGenerator, apply_linear


@dataclass
class LayerState:
    """Recurrent state of one layer: the last K-1 conv inputs and the SSM state."""

    conv: torch.Tensor  # (batch, K - 1, E), oldest input first
    ssm: torch.Tensor   # (batch, heads, N, P), float32
    plan: Optional[BlockStepPlan] = None   # the bound native decoding step, made at the first step


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def norm_step(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for one token a row x (b, D): the native kernel where it runs (at decode sizes
    nn.RMSNorm spends ~10x its arithmetic in operator dispatch), else the module."""
    out = decode_rms_norm(x, norm.weight, norm.eps)
    return norm(x) if out is None else out


class SelectiveSSMLayer(nn.Module):
    def __init__(self, config: SparseSSMConfig):
        super().__init__()
        self.config = config
        E, H = config.inner_dim, config.resolved_num_heads
        self.inner_dim, self.num_heads, self.head_dim = E, H, E // H
        self.structure = make_structure(config.selective_param_class, config.state_dim, config.sparsity_level,
                                        config.low_rank_rank, config.sparsity_pattern,
                                        signed=config.eigenvalue_range == "signed",
                                        reflection_init_logit=config.reflection_init_logit,
                                        closed_reflections=config.reflection_range == "closed",
                                        reflection_input=config.reflection_input,
                                        reflection_decay=config.reflection_decay)
        self.discretization = config.resolved_discretization
        self.in_proj = nn.Linear(config.hidden_dim, 2 * E, bias=False)
        self.conv = nn.Conv1d(E, E, config.conv_kernel, groups=E, bias=True)
        # the grid the generator snaps the transitions to: rotation turns (Z_K) or exact reflections (Z_2)
        angle_grid = 2 if config.exact_reflections else config.rotation_angle_grid
        self.generator = SelectiveParameterGenerator(E, H, self.structure, config.hippo_init,
                                                     config.dt_min, config.dt_max, num_groups=config.num_groups,
                                                     a_rank=config.resolved_a_generator_rank,
                                                     selective=config.selective, angle_grid=angle_grid)
        if config.reflection_init_logit_last is not None:   # write strengths from b to b_last over the heads
            self.structure.spread_initial_logits(self.generator.A_base, config.reflection_init_logit_last)
        self.out_proj = nn.Linear(E, config.hidden_dim, bias=False)
        # `learned_initial_state`: the SSM state before the first token (H, N, P), a parameter; a passed
        # state replaces it.  It starts at N(0, 1), where the readout sees it from the first step (from
        # zero the state-tracking models first learn to count from their inputs and keep to that)
        self.initial_state = (nn.Parameter(torch.randn(H, self.structure.state_dim, E // H))
                              if config.learned_initial_state else None)

    def forward(self, x: torch.Tensor, state: LayerState | None = None):
        """x (b, L, hidden) -> (out (b, L, hidden), LayerState after the last token).  Without a
        state the sequence starts from the learned initial state, or from zero."""
        b, L, _ = x.shape
        u, z = apply_linear(self.in_proj, x).chunk(2, dim=-1)            # views (b, L, E)
        # the conv and the scan run in (at least) float32, as Mamba's kernels do, whatever the autocast
        # dtype or the weights' (the projections run in the weights' dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            u, z = _at_least_float32(u), _at_least_float32(z)
            u, conv_state = causal_conv_silu(u, *self._conv_filter(u.dtype), None if state is None else state.conv)
            dt, A_raw, B, C, D = self.generator(u)
            cfg, heads = self.config, (b, L, self.num_heads, self.head_dim)
            initial = state.ssm if state is not None else (
                None if self.initial_state is None else self.initial_state.to(u.dtype).expand(b, -1, -1, -1))
            y, ssm_state = selective_scan(
                u.view(heads), dt, A_raw, B, C, D, self.structure, self.discretization, cfg.gbt_alpha,
                initial, z.reshape(heads),
                use_parallel_scan=cfg.use_parallel_scan and L > 1, chunk_size=cfg.scan_chunk_size)
        out = apply_linear(self.out_proj, y.reshape(b, L, self.inner_dim))
        return out, LayerState(conv_state, ssm_state)

    def _conv_filter(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The depthwise conv's weight (E, K) and bias (E,) in the scan's dtype (no copy when they are
        in it already: the float32 fused kernels' fast path)."""
        return self.conv.weight[:, 0].to(dtype), self.conv.bias.to(dtype)

    def _native_decode_weights(self) -> dict | None:
        """The generator's tensors for the fused decoding step, or None when the layer's maps are
        not float or weight-only int8 linear maps or the structure (with its discretisation) is not
        the kernel's (`step_code`: checked first, so that such a layer builds no tensors at each step)."""
        plain = decode_weight(self.in_proj) is not None and decode_weight(self.out_proj) is not None
        taken = step_code(self.discretization, self.config.gbt_alpha, self.structure) is not None
        return self.generator.decode_weights() if plain and taken else None

    def residual_step(self, x: torch.Tensor, norm: nn.RMSNorm, state: LayerState) -> torch.Tensor:
        """x + self.step(norm(x), state) for one token x (b, hidden): one native call for the whole
        residual block where it runs (diagonal A and the block family, `ssm.fused.step_code`;
        float32/64 on CPU, float or weight-only int8 maps), else operator by operator.  The call's
        arguments are bound at the first step of a cache (`state.plan`): the cache is decoded with
        the weights' storage of that step (in-place updates are seen).  (No `torch.no_grad` around the
        native call, which records nothing: entering and leaving it cost ~2 us a layer.)"""
        plan = state.plan
        if plan is None or not plan.fits(x, state.conv, state.ssm):
            plan = state.plan = self._step_plan(x, norm, state)
        if plan is not None:
            return plan(x)
        with torch.no_grad():
            return x + self.step(norm_step(norm, x), state)

    @torch.no_grad()
    def _step_plan(self, x: torch.Tensor, norm: nn.RMSNorm, state: LayerState):
        """The bound native step of the residual block for rows like x (`block_step_plan`), or None."""
        weights = self._native_decode_weights()
        return None if weights is None else block_step_plan(
            x, norm.weight, norm.eps, decode_weight(self.in_proj), decode_weight(self.out_proj),
            self.conv.weight[:, 0], self.conv.bias, weights, state.conv, state.ssm, self.discretization,
            self.config.gbt_alpha)

    @torch.no_grad()
    def step(self, x: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token x (b, hidden) -> out (b, hidden); `state` is advanced in place."""
        b = x.shape[0]
        xz = apply_linear(self.in_proj, x)
        weights = self._native_decode_weights()
        if weights is not None:                                          # one native call (`ssm.fused.step_code`)
            cfg = self.config
            y = decode_layer_step(xz, self.conv.weight[:, 0], self.conv.bias, weights, state.conv, state.ssm,
                                  self.discretization, cfg.gbt_alpha)
            if y is not None:
                return self.out_proj(y)
        u, z = xz.chunk(2, dim=-1)                                       # (b, E) each
        u = _at_least_float32(u)
        u = conv_step(u, *self._conv_filter(u.dtype), state.conv)
        dt, A_raw, B, C, D = self.generator(u[:, None])
        cfg, heads = self.config, (b, self.num_heads, self.head_dim)
        y = selective_scan_step(u.view(heads), dt[:, 0], A_raw[:, 0], B[:, 0], C[:, 0], D[:, 0], self.structure,
                                self.discretization, cfg.gbt_alpha, state.ssm, _at_least_float32(z).reshape(heads))
        return apply_linear(self.out_proj, y.reshape(b, self.inner_dim))

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

