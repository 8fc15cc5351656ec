"""Banded A_t: two block-diagonal partitions, the second shifted by half a block, discretised by
the Lie-Trotter product of the two."""

from __future__ import annotations

import torch

from ..discretization import discretize, discretize_state_matrix
from ..hippo import project_block_diagonal
from .block import BlockStructure, chol_skew_raw
from .dense_prefix import DensePrefix


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
        return chol_skew_raw(torch.cat([A0, A1])).reshape(-1)

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
