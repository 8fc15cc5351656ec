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
==============  ============================  ================  ==========================

Eigenvalues of A_bar: the diagonal's exp(dt a) lie in (0, 1] (Mamba); with `signed=True` the
diagonal maps them to 2 exp(dt a) - 1 in (-1, 1] (Grazzi et al., ICLR 2025: what parity needs),
still a contraction.  Rotation pairs (l = exp(2 r0) > 0, w = r1) are complex eigenvalues
exp(dt (-l + i w)): any angle, so counting modulo m is a rotation by 2 pi / m.  Block and dense
A_t with bilinear / gbt discretisation are Cayley transforms of a matrix whose symmetric part is
negative definite: inside the unit disc, orthogonal in the limit of a small symmetric part, and
reflection-like (an eigenvalue near -1) for a large one along a direction.

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

The discrete operators are tuples of tensors with leading dimensions (..., ) = the token dims.
"""

from __future__ import annotations

import torch

from .discretization import alpha_for, discretize, discretize_diagonal, discretize_state_matrix
from .hippo import STABILITY_MARGIN, block_size_for, project_block_diagonal, project_low_rank


def _chol_skew_raw(blocks: torch.Tensor) -> torch.Tensor:
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
        L = torch.tril(R, -1) + torch.diag_embed(torch.exp(torch.diagonal(R, dim1=-2, dim2=-1)))
        K = torch.triu(R, 1)
        return -(L @ L.transpose(-1, -2)) + K - K.transpose(-1, -2)

    def raw_from_hippo(self, A: torch.Tensor) -> torch.Tensor:
        """Raw vector (N*b,) representing the block projection of a HiPPO matrix A (N, N)."""
        return _chol_skew_raw(project_block_diagonal(A, self.block_size)).reshape(-1)

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
        return -torch.exp(2 * raw)

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
        lam, w = torch.exp(2 * r[..., 0]), r[..., 1]
        return torch.stack([torch.stack([-lam, -w], -1), torch.stack([w, -lam], -1)], -2)

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


class DensePrefix:
    """Prefix operators for the chunked scan of structures whose products fill in (banded,
    low-rank): carried as dense N x N matrices, built by applying each step to the identity."""

    def identity(self, like, lead):
        eye = torch.eye(self.state_dim, dtype=like.dtype, device=like.device)
        return (eye.expand(*lead, self.state_dim, self.state_dim),)

    def compose(self, op, prefix):
        return (self.apply(op, prefix[0]),)

    def transfer(self, prefix, X):
        return prefix[0] @ X

    def pull_back(self, prefix, C):
        return (prefix[0].transpose(-1, -2) @ C[..., None])[..., 0]


class LowRankStructure(DensePrefix):
    """A = diag(lam) + U V^T with lam = -exp(d) - ||U||_F ||V||_F (stable for any U, V)."""

    def __init__(self, state_dim: int, rank: int):
        if not 1 <= rank <= state_dim:
            raise ValueError(f"low-rank rank must be in [1, {state_dim}], got {rank}")
        self.state_dim, self.rank = state_dim, rank
        self.name = f"lowrank{rank}"
        self.raw_size = state_dim * (1 + 2 * rank)
        self.supports_zoh = False

    def continuous(self, raw):
        """raw (..., N + 2 N r) -> (lam (..., N), U (..., N, r), V (..., N, r))."""
        N, r = self.state_dim, self.rank
        d = raw[..., :N]
        U = raw[..., N:N + N * r].reshape(*raw.shape[:-1], N, r)
        V = raw[..., N + N * r:].reshape(*raw.shape[:-1], N, r)
        shift = U.flatten(-2).norm(dim=-1) * V.flatten(-2).norm(dim=-1)
        lam = -torch.exp(d) - shift[..., None]
        return lam, U, V

    def raw_from_hippo(self, A):
        lam, U, V = project_low_rank(A, self.rank)
        shift = U.norm() * V.norm()
        return torch.cat([torch.log(-lam - shift), U.reshape(-1), V.reshape(-1)])

    def to_dense(self, A):
        lam, U, V = A
        return torch.diag_embed(lam) + U @ V.transpose(-1, -2)

    def dense_discretize(self, A, dt, B, method, alpha=0.5):
        if method == "zoh":
            self.discretize(A, dt, B, method, alpha)  # raises the explanatory error
        return discretize(self.to_dense(A), B, dt, method, alpha)

    def discretize(self, A, dt, B, method, alpha=0.5):
        """Bilinear / gbt in O(N r):  A_bar = (I - a dt A)^{-1} (I + (1 - a) dt A),
        (I - a dt A)^{-1} = D^{-1} + a dt D^{-1} U (I_r - a dt V^T D^{-1} U)^{-1} V^T D^{-1}
        with D = I - a dt diag(lam) (Woodbury).  Returns the operator as a tuple and B_bar."""
        if method == "zoh":
            raise ValueError("the low_rank structure supports discretization 'bilinear' or 'gbt', not 'zoh' "
                             "(the exponential of a diagonal-plus-low-rank matrix is dense)")
        a = alpha_for(method, alpha)
        lam, U, V = A
        dt_ = dt[..., None]
        dinv = 1.0 / (1.0 - a * dt_ * lam)                                  # (..., N)
        W = dinv[..., None] * V                                             # (..., N, r)
        eye = torch.eye(self.rank, dtype=lam.dtype, device=lam.device)
        cap = eye - (a * dt_)[..., None] * (W.transpose(-1, -2) @ U)        # (..., r, r)
        K = (a * dt_)[..., None] * (dinv[..., None] * U) @ torch.linalg.inv(cap)
        fwd = ((1.0 - a) * dt_)[..., None]                                  # (..., 1, 1)
        op = (fwd, lam, U, V, dinv, K, W)
        B_bar = self._solve(op, (dt_ * B)[..., None])[..., 0]
        return op, B_bar

    @staticmethod
    def _solve(op, Y):
        _, _, _, _, dinv, K, W = op
        return dinv[..., None] * Y + K @ (W.transpose(-1, -2) @ Y)

    def apply(self, op, X):
        fwd, lam, U, V, _, _, _ = op
        Y = X + fwd * (lam[..., None] * X + U @ (V.transpose(-1, -2) @ X))
        return self._solve(op, Y)

    def flops_per_token(self, head_dim):
        N, r = self.state_dim, self.rank
        return {"build_A": 4 * N * r, "discretize": 8 * N * r + 2 * r ** 3, "apply": (8 * r + 4) * N * head_dim}


class BandedStructure(DensePrefix):
    """Banded A = A0 + A1: A0 block-diagonal with b x b blocks, A1 the same pattern shifted by
    h = b // 2 (its first and last blocks are cut at the matrix edge).  Every entry with
    |i - j| <= h is in the pattern (and some up to |i - j| = b - 1): a band of half-width h, with
    about 2 b nonzeros per row.

    Both parts are contractive block matrices (as in `BlockStructure`), so A is stable.  The
    exponential of a banded matrix is dense, so the discrete operator is the Lie-Trotter splitting
        A_bar = D(A1) D(A0),   B_bar = D(A1) B_bar(A0, B)
    where D is the chosen method (zoh / bilinear / gbt) applied to each block-diagonal part; it is
    first-order accurate in dt (error O(dt^2 ||[A0, A1]||) per step) and exact when A0 and A1
    commute.  Applying it costs 4 N b K for a state (N, K).  The chunked scan carries N x N prefix
    operators (products of banded operators fill in)."""

    def __init__(self, state_dim: int, block_size: int):
        if block_size < 2 or state_dim % block_size:
            raise ValueError(f"banded needs a block size >= 2 that divides state_dim {state_dim}, got {block_size}")
        self.state_dim, self.block_size = state_dim, block_size
        self.shift = block_size // 2
        self.front = block_size - self.shift            # padding in front of the shifted partition
        self.n0, self.n1 = state_dim // block_size, state_dim // block_size + 1
        self.raw_size = (self.n0 + self.n1) * block_size * block_size
        self.name = f"banded{self.shift}"
        self.supports_zoh = True
        real = torch.zeros(self.n1 * block_size, dtype=torch.bool)
        real[self.front:self.front + state_dim] = True
        real = real.reshape(self.n1, block_size)
        self._mask1 = real[:, :, None] & real[:, None, :]          # (n1, b, b): couplings of real states
        self._blocks = BlockStructure(block_size, block_size)

    def _pad(self, X):
        """(..., N, K) -> (..., n1, b, K) in the shifted partition's coordinates."""
        pad = X.new_zeros(*X.shape[:-2], self.front, X.shape[-1])
        tail = X.new_zeros(*X.shape[:-2], self.shift, X.shape[-1])
        return torch.cat([pad, X, tail], -2).reshape(*X.shape[:-2], self.n1, self.block_size, X.shape[-1])

    def _crop(self, Xb):
        return Xb.flatten(-3, -2)[..., self.front:self.front + self.state_dim, :]

    def continuous(self, raw):
        """raw (..., raw_size) -> (A0 blocks (..., n0, b, b), A1 blocks (..., n1, b, b))."""
        b = self.block_size
        R = raw.reshape(*raw.shape[:-1], self.n0 + self.n1, b * b)
        blocks = self._blocks.continuous(R)[..., 0, :, :]           # (..., n0 + n1, b, b)
        A0, A1 = blocks.split([self.n0, self.n1], dim=-3)
        return A0, A1 * self._mask1.to(A1.dtype)

    def raw_from_hippo(self, A):
        """Split the band of A between the two partitions (entries in both go half and half),
        project every block onto the contractive set, and encode it."""
        N, b = self.state_dim, self.block_size
        idx = torch.arange(N)
        in0 = (idx[:, None] // b) == (idx[None, :] // b)
        in1 = ((idx[:, None] + self.front) // b) == ((idx[None, :] + self.front) // b)
        share = in0.double() + in1.double()
        w = torch.where(share > 0, 1.0 / share.clamp(min=1), 0.0).to(A.dtype)
        A0 = project_block_diagonal(A * w * in0, b)
        padded = torch.zeros(self.n1 * b, self.n1 * b, dtype=A.dtype)
        padded[self.front:self.front + N, self.front:self.front + N] = A * w * in1
        pad_diag = ~torch.cat([torch.zeros(self.front, dtype=torch.bool), torch.ones(N, dtype=torch.bool),
                               torch.zeros(self.shift, dtype=torch.bool)])
        padded = padded - torch.diag(pad_diag.to(A.dtype))          # decoupled pad states: any stable value
        A1 = project_block_diagonal(padded, b)
        return _chol_skew_raw(torch.cat([A0, A1])).reshape(-1)

    def to_dense(self, A):
        A0, A1 = A
        N, b = self.state_dim, self.block_size
        dense1 = BlockStructure(self.n1 * b, b).to_dense(A1)
        return BlockStructure(N, b).to_dense(A0) + dense1[..., self.front:self.front + N, self.front:self.front + N]

    def dense_discretize(self, A, dt, B, method, alpha=0.5):
        """Dense equivalent of the splitting: D(A1) D(A0) and D(A1) B_bar(A0, B), with A0, A1 dense."""
        A0, A1 = A
        N, b = self.state_dim, self.block_size
        dense0 = BlockStructure(N, b).to_dense(A0)
        D0, B0 = discretize(dense0, B, dt, method, alpha)
        D1 = discretize_state_matrix(self.to_dense(A) - dense0, dt, method, alpha)
        return D1 @ D0, (D1 @ B0[..., None])[..., 0]

    def discretize(self, A, dt, B, method, alpha=0.5):
        A0, A1 = A
        b = self.block_size
        A0_bar, B0_bar = discretize(A0, B.reshape(*B.shape[:-1], self.n0, b), dt[..., None], method, alpha)
        A1_bar = discretize_state_matrix(A1, dt[..., None], method, alpha)
        op = (A0_bar, A1_bar)
        return op, self._apply1(A1_bar, B0_bar.reshape(B.shape)[..., None])[..., 0]

    def _apply1(self, A1_bar, X):
        return self._crop(A1_bar @ self._pad(X))

    def apply(self, op, X):
        A0_bar, A1_bar = op
        Xb = X.reshape(*X.shape[:-2], self.n0, self.block_size, X.shape[-1])
        return self._apply1(A1_bar, (A0_bar @ Xb).reshape(X.shape))

    def flops_per_token(self, head_dim):
        N, b = self.state_dim, self.block_size
        return {"build_A": 4 * N * b * b, "discretize": 24 * N * b * b, "apply": 4 * N * b * head_dim}


def make_structure(selective_param_class: str, state_dim: int, sparsity_level: float = 0.0,
                   low_rank_rank: int = 1, sparsity_pattern: str = "block", signed: bool = False):
    """Structure for a config: 'dense' (one N x N block), 'sparse' (block size b from
    `hippo.block_size_for`; pattern 'block' = block-diagonal, 'banded' = half-bandwidth b // 2;
    b = 1 is the diagonal case for both, whose eigenvalue range `signed` chooses), 'rotation'
    (2 x 2 scaled-rotation blocks) or 'low_rank'."""
    if selective_param_class == "dense":
        return BlockStructure(state_dim, state_dim)
    if selective_param_class == "rotation":
        return RotationStructure(state_dim)
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
