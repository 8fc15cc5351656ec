"""Structures of the selective state matrix A_t (one N x N matrix per head and token).

Every structure turns a flat vector of *raw* parameters per head (a learned base plus what the
selective generator adds for the token) into a continuous-time A_t that is stable by
construction, discretises it without ever forming a dense N x N matrix, and applies the
discrete operator A_bar_t to a state X of shape (..., N, K) at a cost that follows the structure.

==============  ============================  ================  ==========================
structure       A_t                           raw per head      apply A_bar to (N, K)
==============  ============================  ================  ==========================
diagonal        diag(a),  a = -exp(2 r)       N                 N K
rotation        [[-l, -w], [w, -l]] per pair  N                 2 N K
block (b x b)   -L L^T + (S - S^T) per block  N b               N b K
low-rank (r)    diag(lam) + U V^T             N + 2 N r         about 4 N r K
permutation     A_bar = P diag(d), P one-hot  N + N^2           N K (gather); N^2 K as run
householder (r) A_bar = H_r .. H_1 diag(d)    N + r (N + 1)     (1 + 4 r) N K; N^2 K in PyTorch
==============  ============================  ================  ==========================

Eigenvalues of A_bar: the diagonal's exp(dt a) lie in (0, 1] (Mamba); with `signed=True` the
diagonal maps them to 2 exp(dt a) - 1 in (-1, 1] (Grazzi et al., ICLR 2025: what parity needs),
still a contraction.  Rotation pairs (l = exp(2 r0) > 0, w = r1) are complex eigenvalues
exp(dt (-l + i w)): any angle, so counting modulo m is a rotation by 2 pi / m.  Block and dense
A_t with bilinear / gbt discretisation are Cayley transforms of a matrix whose symmetric part is
negative definite: inside the unit disc, orthogonal in the limit of a small symmetric part, and
reflection-like (an eigenvalue near -1) for a large one along a direction.  Permutation-diagonal
transitions (`permutation.py`, PD-SSM) move every state to one state chosen by an arg-max per token:
exact finite-automaton steps (parity, counting mod m, S3), which no learned angle or eigenvalue
gives over long sequences.  Householder products (`householder.py`, DeltaProduct) multiply diag(d)
by r reflections I - beta k k^T (beta in (0, 2), eigenvalue 1 - beta in (-1, 1) along k): symmetric
factors of norm 1, so a contraction; their products reach rotations and permutation matrices.

Stability by construction:

- block-diagonal (and diagonal, b = 1; and dense, b = N): the raw block R (b x b) gives a
  lower-triangular L with positive diagonal exp(diag R) (strict lower part of R) and a skew part
  from the strict upper part of R.  The symmetric part of A is -L L^T, negative definite, so
  every eigenvalue has a negative real part and ||exp(t A)|| <= 1.  The map is onto the
  contractive set that `hippo.project_block_diagonal` projects into (Cholesky factor + skew
  part), so the HiPPO projection is represented exactly.
- low-rank: lam = -exp(d) - ||U||_F ||V||_F.  The symmetric part of U V^T has spectral norm at
  most ||U||_F ||V||_F, so the symmetric part of A is <= -min(exp(d)) I < 0 for any U, V.
  Its matrix exponential is dense, so this structure supports the bilinear / gbt methods only:
  the inverse (I - alpha dt A)^{-1} is applied in O(N r) through the Woodbury identity.

Every exp(.) above that turns a raw parameter into a rate (the diagonal's and the rotation's exp(2 r),
the block's exp(diag R), the low-rank's exp(d)) takes its argument capped at 20 (`block.rate_exp`):
a rate of e^20 already empties the state for any usable dt, and without the cap an input-dependent
raw value above ~44 overflows float32 (an infinite rate, a NaN gradient).

The discrete operators are tuples of tensors with leading dimensions (..., ) = the token dims.
"""

from __future__ import annotations

from ..hippo import block_size_for
from .banded import BandedStructure
from .block import BlockStructure, DiagonalStructure, RotationStructure
from .dense_prefix import DensePrefix
from .householder import INITIAL_REFLECTION_LOGIT, HouseholderStructure
from .low_rank import LowRankStructure
from .permutation import PermutationStructure

__all__ = ["BlockStructure", "DiagonalStructure", "RotationStructure", "BandedStructure", "LowRankStructure",
           "PermutationStructure", "HouseholderStructure", "DensePrefix", "make_structure"]


def make_structure(selective_param_class: str, state_dim: int, sparsity_level: float = 0.0,
                   low_rank_rank: int = 1, sparsity_pattern: str = "block", signed: bool = False,
                   reflection_init_logit: float = INITIAL_REFLECTION_LOGIT, closed_reflections: bool = False,
                   reflection_input: str = "b", reflection_decay: bool = True):
    """Structure for a config: 'dense' (one N x N block), 'sparse' (block size b from
    `hippo.block_size_for`; pattern 'block' = block-diagonal, 'banded' = half-bandwidth b // 2;
    b = 1 is the diagonal case for both, whose eigenvalue range `signed` chooses, as it chooses the
    decay's of 'householder'), 'rotation'
    (2 x 2 scaled-rotation blocks), 'permutation' (PD-SSM's P diag(d)), 'householder' (DeltaProduct's
    low_rank_rank reflections times diag(d), each of strength 2 sigmoid(reflection_init_logit) at
    initialisation; beta in [0, 2] with `closed_reflections`, `HouseholderStructure.close_range`; the
    input through B, by delta writes or both, `reflection_input`; decays held at 1 without
    `reflection_decay`) or 'low_rank'."""
    if selective_param_class == "dense":
        return BlockStructure(state_dim, state_dim)
    if selective_param_class == "rotation":
        return RotationStructure(state_dim)
    if selective_param_class == "permutation":
        return PermutationStructure(state_dim)
    if selective_param_class == "householder":
        return HouseholderStructure(state_dim, low_rank_rank, reflection_init_logit, closed_reflections, signed,
                                    reflection_input, reflection_decay)
    if selective_param_class == "sparse":
        b = block_size_for(state_dim, sparsity_level)
        if b == 1:
            return DiagonalStructure(state_dim, signed)
        if sparsity_pattern == "banded":
            return BandedStructure(state_dim, b)
        if sparsity_pattern != "block":
            raise ValueError(f"unknown sparsity_pattern {sparsity_pattern!r}")
        return BlockStructure(state_dim, b)
    if selective_param_class == "low_rank":
        return LowRankStructure(state_dim, low_rank_rank)
    raise ValueError(f"unknown selective_param_class {selective_param_class!r}")
