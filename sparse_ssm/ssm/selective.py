"""Selective parameter generators: A_t, B_t, C_t, D_t and the step size dt_t as functions of u_t.

For every head h and token t, from the layer's (convolved) input u_t in R^E:

    [dt_raw, a_low, B_t, C_t, d_raw] = W u_t                     one fused linear map, no bias
    a_raw = W_A a_low                                            rank-r bottleneck (r = a_generator_rank,
                                                                 like Mamba's dt_rank): per-head
                                                                 structured A needs H * raw_size values
    dt_t = softplus(dt_raw + dt_bias)                            (heads,)        positive step
    A_raw_t = A_base + a_raw;  A_t = structure.continuous(A_raw_t)   stable by construction (the scans
                                                                 build A_t from A_raw_t themselves;
                                                                 rotation pairs with an angle grid K
                                                                 become exact elements of Z_K: turns
                                                                 dt_t w_t snapped to multiples of
                                                                 2 pi / K, magnitude 1; reflections
                                                                 with grid 2 exact ones: `snap_to_grid`)
    B_t, C_t                                                     (groups, N), shared by the
                                                                 heads of a group (Mamba-2's ngroups;
                                                                 the scans take them per group); with
                                                                 an angle grid B_t = 0: exact
                                                                 transitions keep the state's norm, so
                                                                 inputs would add up without bound,
                                                                 and the state is its start (a learned
                                                                 initial state) moved by them
    D_t  = D_base + d_raw                                        (heads,)        skip gain

W_A and the rows of W that produce d_raw start at zero, so at initialisation A_t is exactly the
HiPPO matrix projected onto the structure and D_t = 1; training makes them input dependent.  The
other rows of W are random (`reset_generator`: N(0, 0.02), or Mamba's x_proj init, which the
model's default `weight_init: mamba` picks).  dt_bias is initialised like Mamba:
dt = exp(uniform(log dt_min, log dt_max)) and dt_bias = softplus^{-1}(dt) = dt + log(-expm1(-dt));
`SparseSSMForCausalLM._init_weights` does not touch it (or A_base, D_base).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gemm import linear_rows
from .hippo import hippo
from .structures.householder import HouseholderStructure


def apply_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) (..., in) -> (..., out) in the map's own precision: x is cast to the weight's dtype
    (a bf16/fp16 model's matmuls run in bf16/fp16); a map without a float `weight` (a quantised
    one, `model.quantize`) takes x as it is and answers in x's dtype.  A plain nn.Linear (no hooks)
    runs through `gemm.linear_rows` (oneDNN's GEMM on CPUs for float32 without gradient, else F.linear)."""
    weight = getattr(linear, "weight", None)
    if type(linear) is nn.Linear and not (linear._forward_hooks or linear._forward_pre_hooks):
        return linear_rows(x.to(weight.dtype), weight, linear.bias)
    return linear(x if weight is None else x.to(weight.dtype))


class SelectiveParameterGenerator(nn.Module):
    """u (batch, length, E) -> dt (b, L, H), A_raw (b, L, H, structure.raw_size),
    B (b, L, G, N), C (b, L, G, N), D (b, L, H)."""

    def __init__(self, inner_dim: int, num_heads: int, structure, hippo_init: str = "legs",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4, num_groups: int = 1,
                 a_rank: int = 16, selective: bool = True, angle_grid: int = 0):
        super().__init__()
        self.selective = selective
        self.angle_grid = angle_grid       # exact elements of Z_K: rotation pairs, reflections (K = 2); 0: off
        self.num_heads, self.num_groups, self.structure = num_heads, num_groups, structure
        N = structure.state_dim
        self.sizes = [num_heads, a_rank, num_groups * N, num_groups * N, num_heads]
        self.proj = nn.Linear(inner_dim, sum(self.sizes), bias=False)
        self.a_up = nn.Linear(a_rank, num_heads * structure.raw_size, bias=False)
        A_hippo, _ = hippo(hippo_init, N)
        self.A_base = nn.Parameter(structure.raw_from_hippo(A_hippo).float().repeat(num_heads, 1))
        self.D_base = nn.Parameter(torch.ones(num_heads))
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # the ablation without selection (a time-invariant SSM): the generators read a learned
        # constant instead of the token, so dt, A, B, C, D are parameters, the same at every step
        self.lti_input = None if selective else nn.Parameter(torch.randn(inner_dim) / math.sqrt(inner_dim))
        self.reset_generator()

    @torch.no_grad()
    def reset_generator(self, std: float | None = 0.02):
        """Random dt/A-bottleneck/B/C rows, zero D rows and zero W_A (so A_t and D_t start at
        their base values while W_A still receives gradients).  The random rows are N(0, std), or
        with std None nn.Linear's own init, uniform(+-1/sqrt(E)), as Mamba's x_proj."""
        if std is None:
            self.proj.reset_parameters()
        else:
            nn.init.normal_(self.proj.weight, std=std)
        self.proj.weight[-self.sizes[4]:].zero_()
        nn.init.zeros_(self.a_up.weight)

    def forward(self, u: torch.Tensor):
        b, L, _ = u.shape
        H, N = self.num_heads, self.structure.state_dim
        source = u if self.selective else self.lti_input.to(u.dtype).expand_as(u)
        # the maps run in the weights' dtype; their outputs, and all that follows, in u's (at least float32)
        dt_raw, a_low, B, C, d_raw = apply_linear(self.proj, source).to(u.dtype).split(self.sizes, dim=-1)
        dt = F.softplus(dt_raw + self.dt_bias.to(u.dtype))
        A_raw = self.A_base.to(u.dtype) + apply_linear(self.a_up, a_low).to(u.dtype).reshape(b, L, H, -1)
        if isinstance(self.structure, HouseholderStructure):
            if self.structure.closed:
                A_raw = self.structure.close_range(A_raw)      # beta in [0, 2]: exact flips are reachable
            if not self.structure.decays:
                A_raw = self.structure.hold_decays(A_raw)      # d = 1: only the delta writes forget
        if self.angle_grid:
            A_raw = self.structure.snap_to_grid(A_raw, dt, self.angle_grid)
            B = torch.zeros_like(B)
        G = self.num_groups
        return dt, A_raw, B.reshape(b, L, G, N), C.reshape(b, L, G, N), self.D_base.to(u.dtype) + d_raw

    def decode_weights(self) -> dict | None:
        """The generator's tensors in the layout of the fused decoding step
        (`ssm.kernels.layer_step.cpp`, which decides from "structure" whether it takes the structure),
        or None when this generator is not the one it implements (maps other than float or weight-only
        int8 linear ones, the angle grid's snapped transitions, the closed range of reflections).  With
        int8 maps Wg (O, E) and Wa (H R, r) are (int8 weight, scales) (`quantized.decode_weight`)."""
        from .quantized import decode_weight

        closed = isinstance(self.structure, HouseholderStructure) and self.structure.closed
        Wg, Wa = decode_weight(self.proj), decode_weight(self.a_up)
        if self.angle_grid or closed or Wg is None or Wa is None:
            return None
        return {"Wg": Wg, "dt_bias": self.dt_bias, "Wa": Wa,
                "A_base": self.A_base, "D_base": self.D_base, "groups": self.num_groups,
                "lti": None if self.selective else self.lti_input, "structure": self.structure}