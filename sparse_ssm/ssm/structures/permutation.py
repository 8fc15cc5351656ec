"""Permutation-diagonal transitions (PD-SSM: Terzić et al., "Structured Sparse Transition Matrices
to Enable State Tracking in State-Space Models", NeurIPS 2025).

    A_bar_t = P_t diag(d_t)        d_t = the diagonal's discretisation of a_t = -exp(2 r_t), in (0, 1]
    P_t[i, j] = 1 if i = argmax_k logits_t[k, j] else 0       one 1 per column: state j moves to row i

Each token maps every state j to one state f_t(j) (scaled by d_t[j]), so the state of one channel
can be the one-hot code of a finite automaton's state and a word of transitions is followed exactly
at any length: the selection is an arg-max, which small errors in the logits do not move, where a
learned rotation angle or a |eigenvalue| just below 1 drifts over the sequence.  Any automaton
with at most N states (parity, counting modulo m <= N, the group S3 acting on its 6 elements) fits
one head of state N.  Stable by construction: the columns of A_bar have one non-zero entry of
magnitude <= 1, so ||A_bar||_1 <= 1 and the l1 norm of the state never grows without input.

The arg-max has no gradient; the backward pass takes the column softmax's (a straight-through
estimator, as the paper does): P_t = hard + (soft - soft.detach()), exactly one-hot forward.
`B_bar` is the diagonal's (P acts after the step; it has no continuous-time generator).

raw per head = [r (N), logits (N x N, row-major: [j, k] = score of row k for column j)], the
logits from the generator's rank-r bottleneck (a learned dictionary of r logit matrices mixed per
token: the paper's dictionary form).  The scans apply A_bar as one dense N x N block (the
`BlockStructure` operators; O(N^2) per token and channel instead of the O(N) a gather needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..discretization import discretize, discretize_diagonal
from .block import BlockStructure, DiagonalStructure, identity_at_padding, rate_exp

# Initial selection logits: this margin on the diagonal, so P_0 = I (the model starts as the
# diagonal SSM) while the column softmax (p = 0.57 on the diagonal at N = 16) still passes gradients.
# (A margin of 1 left counting mod 3 at chance after 1,500 steps; 3 reached 87.6% at the training length.)
SELECTION_MARGIN = 3.0


class PermutationStructure(BlockStructure):
    """A_bar_t = P_t diag(d_t) (see the module docstring): one dense block of N x N for the scans."""

    def __init__(self, state_dim: int):
        super().__init__(state_dim, state_dim)
        self.name = "permutation"
        self.raw_size = state_dim + state_dim * state_dim

    def continuous(self, raw: torch.Tensor):
        """raw (..., N + N*N) -> (a (..., N) < 0, selection logits (..., N, N): [j, k] scores row k
        for column j)."""
        N = self.state_dim
        return -rate_exp(2 * raw[..., :N]), raw[..., N:].reshape(*raw.shape[:-1], N, N)

    def raw_from_hippo(self, A: torch.Tensor) -> torch.Tensor:
        """The diagonal's raw rates for A's diagonal projection, and P = I (margin SELECTION_MARGIN)."""
        N = self.state_dim
        rates = DiagonalStructure(N).raw_from_hippo(A)
        logits = SELECTION_MARGIN * torch.eye(N, dtype=rates.dtype, device=rates.device)
        return torch.cat([rates, logits.reshape(-1)])

    def selection(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., N, N) -> P (..., N, N): the column-wise one-hot arg-max, with the column
        softmax's gradient."""
        soft = logits.softmax(-1)
        hard = F.one_hot(logits.argmax(-1), self.state_dim).to(soft.dtype)
        return (hard + (soft - soft.detach())).transpose(-1, -2)

    def factors(self, A, dt, B, method, alpha=0.5):
        """A = (a, logits), dt (...), B (..., N) -> the factors of A_bar = P diag(d): P (..., N, N)
        (`selection`; the identity where dt is 0), d (..., N) and B_bar (..., N); what the Triton
        kernel takes (`triton/permutation.py`)."""
        a, logits = A
        d, B_bar = discretize_diagonal(a, B, dt, method, alpha)
        return identity_at_padding(dt, self.selection(logits)), d, B_bar

    def discretize(self, A, dt, B, method, alpha=0.5):
        """A = (a, logits), dt (...), B (..., N) -> ((A_bar (..., 1, N, N),), B_bar (..., N)).  A step
        of dt = 0 is the identity, whatever its logits (the chunked scan pads chunks with such steps)."""
        P, d, B_bar = self.factors(A, dt, B, method, alpha)
        return ((P * d[..., None, :])[..., None, :, :],), B_bar

    def dense_discretize(self, A, dt, B, method, alpha=0.5):
        """The reference: P @ the dense discretisation (`discretization.discretize`) of diag(a)."""
        a, logits = A
        D_bar, B_bar = discretize(torch.diag_embed(a), B, dt, method, alpha)
        return self.selection(logits) @ D_bar, B_bar

    def flops_per_token(self, head_dim: int) -> dict:
        N = self.state_dim
        return {"build_A": 4 * N * N, "discretize": 6 * N, "apply": 2 * N * N * head_dim}
