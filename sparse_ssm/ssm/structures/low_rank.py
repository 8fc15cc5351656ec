"""Diagonal-plus-low-rank A_t: lam and U V^T, discretised with the bilinear / gbt inverse in O(N r)."""

from __future__ import annotations

import torch

from ..discretization import alpha_for, discretize
from ..hippo import project_low_rank
from .block import rate_exp
from .dense_prefix import DensePrefix


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
        lam = -rate_exp(d) - shift[..., None]
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
    def sweeps(op):
        """The operator of `discretize` as two diagonal-plus-low-rank sweeps X <- diag(s) X + P (Q^T X)
        (the forward step, then the Woodbury solve): s (..., 2, N), P, Q (..., 2, N, r); what the
        Triton kernel takes (`triton/low_rank.py`)."""
        fwd, lam, U, V, dinv, K, W = op
        return (torch.stack([1.0 + fwd[..., 0] * lam, dinv], -2), torch.stack([fwd * U, K], -3),
                torch.stack([V, W], -3))

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
