"""HiPPO initialisation of the continuous-time state matrix, and its projection onto structures.

`hippo(kind, state_dim)` returns the continuous-time pair (A, B) of the HiPPO operator with the
stable sign convention of the S4 reference code (`transition(measure, N)`):

- ``legs`` (scaled Legendre):  A[n, k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n == k,
  0 for n < k;  B[n] = sqrt(2n+1).  Lower triangular, so its eigenvalues are exactly -(n+1).
- ``legt`` (translated Legendre): A[n, k] = -1/2 sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else
  (-1)^(n-k));  B[n] = 1/2 sqrt(2n+1)  (the "halved for timescale correctness" version).
- ``fourier`` (translated Fourier): frequencies m = 0 .. N/2-1 couple states 2m and 2m+1 through
  A[2m+1, 2m] = pi m, A[2m, 2m+1] = -pi m;  B = (1, 0, sqrt2, 0, sqrt2, 0, ...);  then the rank-one
  correction A <- A - B B^T.  Needs an even state_dim.
- ``random``: a random matrix whose symmetric part is negative definite (always stable).

The projections map a HiPPO matrix onto the structures the selective layers use.  Each returns a
matrix in the *contractive* set {A : (A + A^T)/2 <= -eps I}: every such A is stable (all
eigenvalues have real part <= -eps) and ||exp(t A)||_2 <= exp(-eps t), which is what the stable
parameterisation in `sparse_ssm.ssm.structures` represents.  Projection onto that set in the
Frobenius norm is exact and cheap: split A into symmetric and skew parts (orthogonal in the
Frobenius inner product), keep the skew part, and clip the eigenvalues of the symmetric part to
at most -eps.

- `project_block_diagonal(A, block_size)`: the diagonal blocks of A, each projected as above.
  Block size 1 gives the diagonal (for LegS exactly the S4D-Real spectrum -(n+1)).
- `project_diagonal(A)`: the block size 1 case as a vector.
- `project_low_rank(A, rank)`: diag(lam) + U V^T with U V^T the best rank-r approximation of the
  off-diagonal part of A (truncated SVD, split as U = U_r sqrt(S), V = V_r sqrt(S)) and
  lam = min(diag(A), -(||U||_F ||V||_F + eps)): the shift that the stable low-rank
  parameterisation needs (see `LowRankStructure`).
"""

from __future__ import annotations

import math

import torch

HIPPO_KINDS = ("legs", "legt", "fourier", "random")
STABILITY_MARGIN = 1e-3  # eps: the symmetric part of every projected block is <= -eps I


def hippo(kind: str, state_dim: int, generator: torch.Generator | None = None):
    """Continuous-time HiPPO pair.

    Returns (A, B): float64 tensors of shapes (state_dim, state_dim) and (state_dim,).
    """
    if state_dim < 1:
        raise ValueError(f"state_dim must be >= 1, got {state_dim}")
    n = torch.arange(state_dim, dtype=torch.float64)
    row, col = n[:, None], n[None, :]
    root = torch.sqrt(2 * n + 1)
    if kind == "legs":
        outer = root[:, None] * root[None, :]
        A = torch.where(row > col, -outer, torch.zeros_like(outer))
        A = A - torch.diag(n + 1)
        B = root.clone()
    elif kind == "legt":
        sign = torch.where(row >= col, torch.ones_like(row * col), (-1.0) ** (row - col))
        A = -0.5 * root[:, None] * sign * root[None, :]
        B = 0.5 * root
    elif kind == "fourier":
        if state_dim % 2:
            raise ValueError(f"hippo 'fourier' needs an even state_dim, got {state_dim}")
        A = torch.zeros(state_dim, state_dim, dtype=torch.float64)
        for m in range(state_dim // 2):
            A[2 * m + 1, 2 * m] = math.pi * m
            A[2 * m, 2 * m + 1] = -math.pi * m
        B = torch.zeros(state_dim, dtype=torch.float64)
        B[0::2] = math.sqrt(2.0)
        B[0] = 1.0
        A = A - torch.outer(B, B)
    elif kind == "random":
        M = torch.randn(state_dim, state_dim, dtype=torch.float64, generator=generator)
        M = M / math.sqrt(state_dim)
        skew = torch.randn(state_dim, state_dim, dtype=torch.float64, generator=generator)
        skew = (skew - skew.T) / math.sqrt(2 * state_dim)
        A = -(M @ M.T) / 2 - 0.5 * torch.eye(state_dim, dtype=torch.float64) + skew
        B = torch.randn(state_dim, dtype=torch.float64, generator=generator)
    else:
        raise ValueError(f"unknown hippo kind {kind!r}; expected one of {HIPPO_KINDS}")
    return A, B


def project_contractive(A: torch.Tensor, eps: float = STABILITY_MARGIN) -> torch.Tensor:
    """Frobenius-nearest matrix whose symmetric part is <= -eps I.  A: (..., b, b)."""
    sym = (A + A.transpose(-1, -2)) / 2
    skew = (A - A.transpose(-1, -2)) / 2
    evals, evecs = torch.linalg.eigh(sym)
    evals = evals.clamp(max=-eps)
    sym = evecs @ torch.diag_embed(evals) @ evecs.transpose(-1, -2)
    return sym + skew


def block_size_for(state_dim: int, sparsity_level: float) -> int:
    """Block size of the block-diagonal pattern for a sparsity level.

    A block-diagonal N x N matrix with blocks of size b has density b / N.  The block size is the
    largest divisor of N not above max(1, (1 - sparsity_level) * N), so the realised sparsity is
    at least the requested one: sparsity 0 gives one dense block, and any level whose density is
    below 2 / N gives the diagonal (Mamba) case.
    """
    target = max(1.0, (1.0 - sparsity_level) * state_dim + 1e-9)
    return max(d for d in range(1, state_dim + 1) if state_dim % d == 0 and d <= target)


def project_block_diagonal(A: torch.Tensor, block_size: int, eps: float = STABILITY_MARGIN):
    """Diagonal blocks of A (N, N), each projected onto the contractive set.

    Returns a tensor of shape (N // block_size, block_size, block_size).
    """
    N = A.shape[-1]
    if N % block_size:
        raise ValueError(f"block_size {block_size} does not divide state_dim {N}")
    nb = N // block_size
    blocks = torch.stack(
        [A[i * block_size:(i + 1) * block_size, i * block_size:(i + 1) * block_size] for i in range(nb)]
    )
    return project_contractive(blocks, eps)


def project_diagonal(A: torch.Tensor, eps: float = STABILITY_MARGIN) -> torch.Tensor:
    """Diagonal of A clipped to <= -eps: shape (N,)."""
    return project_block_diagonal(A, 1, eps)[:, 0, 0]


def project_low_rank(A: torch.Tensor, rank: int, eps: float = STABILITY_MARGIN):
    """Stable diagonal-plus-low-rank fit diag(lam) + U V^T of A (N, N).

    Returns (lam (N,), U (N, rank), V (N, rank)); lam <= -(||U||_F ||V||_F + eps) elementwise.
    """
    N = A.shape[-1]
    if not 1 <= rank <= N:
        raise ValueError(f"rank must be in [1, {N}], got {rank}")
    off = A - torch.diag(torch.diagonal(A))
    Us, S, Vh = torch.linalg.svd(off)
    root = S[:rank].sqrt()
    U = Us[:, :rank] * root
    V = Vh[:rank].T * root
    shift = U.norm() * V.norm() + eps
    lam = torch.diagonal(A).clamp(max=-shift)
    return lam, U, V
