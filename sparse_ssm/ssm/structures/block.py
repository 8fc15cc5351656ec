"""The block-diagonal family of A_t: blocks of any size (the dense class is one block), the
diagonal (blocks of one: the Mamba case, with its signed eigenvalue range) and rotation pairs.
See the package docstring for the parameterisations and their stability."""

from __future__ import annotations

import math

import torch

from ..discretization import discretize, discretize_diagonal
from ..hippo import STABILITY_MARGIN, project_block_diagonal

# The exponentials that turn raw parameters into decay rates take their argument capped at this
# value (a rate of at most e^20 ~ 4.9e8: exp(dt a) is already 0 for any dt above ~1e-7).  Without the
# cap an input-dependent raw value above ~44 makes a float32 rate inf, and its gradient NaN (seen when
# training at lr 1e-2).  The native kernels apply the same cap (`rate_exp` in kernels/vec.h).
RATE_EXP_MAX = 20.0
# The raw decay of a rotation pair of magnitude 1 (`RotationStructure.snap_to_grid`): rate
# l = exp(2 raw) = e^-40 ~ 4e-18, so exp(-dt l) rounds to 1 in float32 and float64 for any dt < 25,
# and ZOH's input gain (a series near 0, `discretization.expm1_ratio`) stays dt
UNIT_MAGNITUDE_RAW = -RATE_EXP_MAX


def rate_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(min(x, RATE_EXP_MAX)): no gradient above the cap."""
    return torch.exp(x.clamp(max=RATE_EXP_MAX))


def identity_at_padding(dt: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """M (..., N, N) with the identity wherever dt (...) is 0: the steps the chunked scan pads chunks
    with, for the discrete-only structures whose A_bar does not follow from dt (permutation;
    householder zeroes its reflections' strengths there instead)."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return torch.where((dt == 0)[..., None, None], eye, M)


def chol_skew_raw(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `BlockStructure.continuous` for contractive blocks (..., b, b)."""
    sym = (blocks + blocks.transpose(-1, -2)) / 2
    skew = (blocks - blocks.transpose(-1, -2)) / 2
    L = torch.linalg.cholesky(-sym)
    return torch.tril(L, -1) + torch.diag_embed(torch.log(torch.diagonal(L, dim1=-2, dim2=-1))) + torch.triu(skew, 1)


class BlockStructure:
    """Block-diagonal A with blocks of size b (b = N is the dense class)."""

    def __init__(self, state_dim: int, block_size: int):
        if state_dim % block_size:
            raise ValueError(f"block_size {block_size} does not divide state_dim {state_dim}")
        self.state_dim, self.block_size = state_dim, block_size
        self.num_blocks = state_dim // block_size
        self.name = "dense" if block_size == state_dim else f"block{block_size}"
        self.raw_size = state_dim * block_size
        self.supports_zoh = True

    # --- continuous-time parameterisation -------------------------------------------------
    def continuous(self, raw: torch.Tensor) -> torch.Tensor:
        """raw (..., N*b) -> blocks (..., N/b, b, b)."""
        b = self.block_size
        R = raw.reshape(*raw.shape[:-1], self.num_blocks, b, b)
        L = torch.tril(R, -1) + torch.diag_embed(rate_exp(torch.diagonal(R, dim1=-2, dim2=-1)))
        K = torch.triu(R, 1)
        return -(L @ L.transpose(-1, -2)) + K - K.transpose(-1, -2)

    def raw_from_hippo(self, A: torch.Tensor) -> torch.Tensor:
        """Raw vector (N*b,) representing the block projection of a HiPPO matrix A (N, N)."""
        return chol_skew_raw(project_block_diagonal(A, self.block_size)).reshape(-1)

    def to_dense(self, blocks: torch.Tensor) -> torch.Tensor:
        """(..., N/b, b, b) -> (..., N, N)."""
        b, N = self.block_size, self.state_dim
        dense = blocks.new_zeros(*blocks.shape[:-3], N, N)
        for i in range(self.num_blocks):
            dense[..., i * b:(i + 1) * b, i * b:(i + 1) * b] = blocks[..., i, :, :]
        return dense

    def dense_discretize(self, A, dt, B, method, alpha=0.5):
        """The dense equivalent of `discretize`: (A_bar (..., N, N), B_bar (..., N)) from dense
        matrices with `discretization.discretize` (what the reference scan uses)."""
        return discretize(self.to_dense(A), B, dt, method, alpha)

    # --- discrete operator ------------------------------------------------------------------
    def discretize(self, blocks, dt, B, method, alpha=0.5):
        """blocks (..., N/b, b, b), dt (...), B (..., N) -> ((A_bar blocks,), B_bar (..., N))."""
        Bb = B.reshape(*B.shape[:-1], self.num_blocks, self.block_size)
        A_bar, B_bar = discretize(blocks, Bb, dt[..., None], method, alpha)
        return (A_bar,), B_bar.reshape(B.shape)

    def apply(self, A_bar, X: torch.Tensor) -> torch.Tensor:
        """A_bar X for X (..., N, K)."""
        (blocks,) = A_bar
        Xb = X.reshape(*X.shape[:-2], self.num_blocks, self.block_size, X.shape[-1])
        return (blocks @ Xb).reshape(X.shape)

    def identity(self, like: torch.Tensor, lead) -> tuple:
        eye = torch.eye(self.block_size, dtype=like.dtype, device=like.device)
        return (eye.expand(*lead, self.num_blocks, self.block_size, self.block_size),)

    # prefix products of a chunk stay block-diagonal, in the operator's own layout
    def compose(self, A_bar, prefix):
        return (A_bar[0] @ prefix[0],)

    def compose_prefixes(self, later, earlier):
        """later earlier: two prefix products compose like operators (the same layout)."""
        return self.compose(later, earlier)

    def transfer(self, prefix, X):
        """prefix X for X (..., N, K)."""
        return self.apply(prefix, X)

    def pull_back(self, prefix, C: torch.Tensor) -> torch.Tensor:
        """prefix^T C for C (..., N)."""
        Cb = C.reshape(*C.shape[:-1], self.num_blocks, self.block_size, 1)
        return (prefix[0].transpose(-1, -2) @ Cb).reshape(C.shape)

    def flops_per_token(self, head_dim: int) -> dict:
        N, b = self.state_dim, self.block_size
        return {"build_A": 2 * N * b * b, "discretize": 12 * N * b * b, "apply": 2 * N * b * head_dim}


class DiagonalStructure(BlockStructure):
    """Block size 1: A = diag(a), a = -exp(2 r).  The layers run it through the fused or chunked
    scan of `sparse_ssm.ssm.scan`; the operator methods here serve the sequential and reference
    paths.  `signed`: the discrete eigenvalues 2 exp(dt a) - 1 in (-1, 1] instead of exp(dt a)."""

    def __init__(self, state_dim: int, signed: bool = False):
        super().__init__(state_dim, 1)
        self.signed = signed
        self.name = "diagonal-signed" if signed else "diagonal"

    def dense_discretize(self, A, dt, B, method, alpha=0.5):
        A_bar, B_bar = super().dense_discretize(A, dt, B, method, alpha)
        if self.signed:
            A_bar = 2 * A_bar - torch.eye(self.state_dim, dtype=A_bar.dtype, device=A_bar.device)
        return A_bar, B_bar

    def continuous(self, raw):
        """raw (..., N) -> a (..., N)."""
        return -rate_exp(2 * raw)

    def to_dense(self, a):
        return torch.diag_embed(a)

    def discretize(self, a, dt, B, method, alpha=0.5):
        A_bar, B_bar = discretize_diagonal(a, B, dt, method, alpha)
        return ((2 * A_bar - 1) if self.signed else A_bar,), B_bar

    def apply(self, A_bar, X):
        return A_bar[0][..., None] * X

    def identity(self, like, lead):
        return (torch.ones(*lead, self.state_dim, dtype=like.dtype, device=like.device),)

    def compose(self, A_bar, prefix):
        return (A_bar[0] * prefix[0],)

    def pull_back(self, prefix, C):
        return prefix[0] * C

    def flops_per_token(self, head_dim):
        N = self.state_dim
        return {"build_A": 2 * N, "discretize": 6 * N, "apply": 2 * N * head_dim}


class RotationStructure(BlockStructure):
    """2 x 2 scaled-rotation blocks A = [[-l, -w], [w, -l]], l = exp(2 r0) > 0, w = r1: each pair
    of states is one complex state with eigenvalue -l + i w (Mamba-3's complex transitions).  ZOH
    has the closed form exp(dt A) = exp(-dt l) R(dt w) (the fused kernel uses it; the reference
    methods inherited from the block structure compute the same through the dense formulas)."""

    def __init__(self, state_dim: int):
        if state_dim % 2:
            raise ValueError(f"rotation blocks pair the states: state_dim must be even, got {state_dim}")
        super().__init__(state_dim, 2)
        self.name = "rotation"
        self.raw_size = state_dim

    def continuous(self, raw):
        """raw (..., N) -> blocks (..., N/2, 2, 2)."""
        r = raw.reshape(*raw.shape[:-1], self.num_blocks, 2)
        lam, w = rate_exp(2 * r[..., 0]), r[..., 1]
        return torch.stack([torch.stack([-lam, -w], -1), torch.stack([w, -lam], -1)], -2)

    def snap_to_grid(self, raw: torch.Tensor, dt: torch.Tensor, grid: int) -> torch.Tensor:
        """raw (..., N), dt (...) -> raw whose pairs are exact elements of the cyclic group Z_grid:
        every turn dt w snapped to the nearest multiple of 2 pi / grid and every magnitude
        exp(-dt l) set to 1 (the decay raw set to UNIT_MAGNITUDE_RAW), so counting modulo any m
        dividing grid neither drifts nor fades at any length.  The turns are straight-through (the
        forward value is snapped, the gradient is the identity's, so the continuous angle keeps
        learning across the grid's cells); the decays get no gradient while snapped.  A step of
        dt = 0 (the scan's padding) keeps its w."""
        w, dt = raw[..., 1::2], dt[..., None]
        cell, moving = 2 * math.pi / grid, dt > 0
        snapped = torch.where(moving, torch.round(dt * w / cell) * cell / torch.where(moving, dt, 1.0), w)
        unit = torch.full_like(w, UNIT_MAGNITUDE_RAW)
        return torch.stack([unit, w + (snapped - w).detach()], -1).flatten(-2)

    def raw_from_hippo(self, A):
        """The Frobenius-nearest scaled rotation of each 2 x 2 diagonal block (its components along
        I and J), with the decay kept >= the stability margin."""
        blocks = torch.stack([A[2 * i:2 * i + 2, 2 * i:2 * i + 2] for i in range(self.num_blocks)])
        lam = (-(blocks[:, 0, 0] + blocks[:, 1, 1]) / 2).clamp(min=STABILITY_MARGIN)
        w = (blocks[:, 1, 0] - blocks[:, 0, 1]) / 2
        return torch.stack([torch.log(lam) / 2, w], -1).reshape(-1)

    def flops_per_token(self, head_dim):
        N = self.state_dim
        return {"build_A": 2 * N, "discretize": 10 * N, "apply": 4 * N * head_dim}
