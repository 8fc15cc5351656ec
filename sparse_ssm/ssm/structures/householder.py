"""Products of generalised Householder reflections (DeltaProduct: Siems et al., "DeltaProduct:
Improving State-Tracking in Linear RNNs via Householder Products", 2025; with one reflection,
DeltaNet with eigenvalues in [-1, 1]: Grazzi et al., ICLR 2025).

    A_bar_t = H_{t,r} ... H_{t,1} diag(d_t)      H_{t,i} = I - beta_{t,i} k_{t,i} k_{t,i}^T / |k_{t,i}|^2
    beta = 2 sigmoid(b) in (0, 2)                  H's eigenvalue along k is 1 - beta in (-1, 1), 1 elsewhere
    d_t = the diagonal's discretisation of a_t = -exp(2 r_t), in (0, 1]; with `signed` 2 d_t - 1 in
          (-1, 1] (the model's `eigenvalue_range: signed`: each state can flip its sign alone, as the
          signed diagonal's parity does, beside the reflections' flips along learnt keys)

The input (`reflection_input`): 'b' adds B_bar_t x_t^T, the diagonal's (Mamba's B, beside the
reflections); 'delta' makes each reflection a delta write (DeltaNet's rule, DeltaProduct's r writes a
token), S <- S - beta k (k^T S - x_t^T) for unit k, the state's value along k moved towards the
token's x_t (replaced at beta = 1, mirrored about it at beta = 2); the writes add up to B_bar_t =
sum_i beta_i H_r ... H_{i+1} k_i, so the PyTorch and Triton scans take them as a B_bar (the native
kernel applies them in place), and no B enters (it is still generated; its weights get no gradient);
'both' adds the two.  A write replaces or mirrors the value along k instead of adding to it: with
beta < 2 the state stays bounded without a decay, and at beta = 2 it stays bounded when the same
value is written again, so d can stay at 1 and a flip at -1: parity's exact automaton writes at
beta = 2 on a one (the value along k, s, becomes 2 x - s) and not at all on a zero (beta = 0), which
keeps s at 0 or 2 x when x is the same on every one.

A_bar_t - diag(d_t) has rank at most r (`low_rank_rank` reflections per token): a diagonal-plus-
low-rank transition that is discrete by construction (it has no continuous-time generator; the
decay, and `B_bar` when the input enters through B, are the diagonal's).  Stable by construction:
each H is symmetric with eigenvalues in (-1, 1], so its spectral norm is 1, and ||A_bar_t||_2 <=
max d <= 1: the Euclidean norm of the state never grows without input.

What it can express: one reflection with beta -> 2 flips the sign along k (parity's -1, as the
signed diagonal); two reflections whose normals meet at an angle phi compose to a rotation by 2 phi
in their plane (counting modulo m: phi = pi / m); and products of reflections reach every
orthogonal matrix (Cartan-Dieudonne), among them the permutation matrices: S3 acting on three
states needs two reflections per token (a 3-cycle is two transpositions, each the reflection across
e_i - e_j).  Unlike the rotation pairs, whose angle and decay come from one rate, the directions
are learnt apart from the decay, which can stay at 1.

Exact reflections (`snap_to_grid`, the model's `exact_reflections`): every beta snapped to 0 or 2
(b's sign) and every decay d to 1, so each H is the identity or an exact reflection (H^2 = I,
eigenvalue -1 along k) and A_bar_t an orthogonal matrix: a flip along k is a sign that neither
fades nor drifts, at any length (one reflection per token: parity; counting modulo 3 needs a
rotation, two reflections whose angle would still be learnt).

raw per head = [r (N), then per reflection i: k_i (N), b_i (1)], from the generator's rank-r
bottleneck like the other structures.  The pure-PyTorch scans apply A_bar as one dense N x N block
(the `BlockStructure` operators; O(N^2) per token and channel); the native kernel
(`kernels/householder_scan.cpp`, the default on CPUs) applies diag(d) and then the reflections to the
state one rank-1 update at a time, O(r N) per channel, and recomputes them in the backward.
"""

from __future__ import annotations

import torch

from ..discretization import discretize, discretize_diagonal
from .block import UNIT_MAGNITUDE_RAW, BlockStructure, DiagonalStructure, rate_exp

# The reflections' initial strength: beta = 2 sigmoid(-3) = 0.095, so A_bar starts close to the
# diagonal SSM's diag(d) while every direction already passes gradients.
INITIAL_REFLECTION_LOGIT = -3.0
# The closed range (`close_range`): beta = 2 ((1 + 2 s) sigmoid(b) - s) clipped to [0, 2], so beta = 2
# (an exact flip) at b = log((1 + s) / s) ~ 3.0 and 0 at -3.0, where 2 sigmoid(b) never gets
CLOSED_STRETCH = 0.05
# b of an exact reflection (+) or of none (-) (`snap_to_grid`): 2 sigmoid(40) is 2 and
# 2 sigmoid(-40) = 8e-18 leaves 1 - beta = 1, both exactly, in float32 and float64.
EXACT_REFLECTION_LOGIT = 40.0


class HouseholderStructure(BlockStructure):
    """A_bar_t = H_{t,r} ... H_{t,1} diag(d_t) (see the module docstring): one dense N x N block
    for the scans."""

    def __init__(self, state_dim: int, num_reflections: int = 2, initial_logit: float = INITIAL_REFLECTION_LOGIT,
                 closed: bool = False, signed: bool = False, reflection_input: str = "b", decays: bool = True):
        super().__init__(state_dim, state_dim)
        if reflection_input not in ("b", "delta", "both"):
            raise ValueError(f"reflection_input: 'b', 'delta' or 'both', got {reflection_input!r}")
        if not decays and reflection_input != "delta":
            raise ValueError("a householder structure without decays needs reflection_input 'delta': an input "
                             "through B would add up without bound")
        self.name = f"householder{num_reflections}" + ("-signed" if signed else "") + \
            ("" if reflection_input == "b" else f"-{reflection_input}") + ("" if decays else "-undecayed")
        self.num_reflections, self.initial_logit, self.closed = num_reflections, initial_logit, closed
        self.signed, self.reflection_input, self.decays = signed, reflection_input, decays
        self.raw_size = state_dim + num_reflections * (state_dim + 1)

    def continuous(self, raw: torch.Tensor):
        """raw (..., raw_size) -> (a (..., N) < 0, keys (..., r, N), beta (..., r) in (0, 2))."""
        N = self.state_dim
        reflections = raw[..., N:].reshape(*raw.shape[:-1], self.num_reflections, N + 1)
        return -rate_exp(2 * raw[..., :N]), reflections[..., :N], 2 * torch.sigmoid(reflections[..., N])

    def raw_from_hippo(self, A: torch.Tensor) -> torch.Tensor:
        """The diagonal's raw rates for A's diagonal projection; fixed pseudo-random key directions
        (distinct for every reflection) of strength b = initial_logit (beta = 2 sigmoid(b))."""
        N = self.state_dim
        rates = DiagonalStructure(N).raw_from_hippo(A)
        g = torch.Generator().manual_seed(0)
        keys = torch.randn(self.num_reflections, N, generator=g, dtype=torch.float64).to(rates)
        logits = torch.full((self.num_reflections, 1), self.initial_logit, dtype=rates.dtype)
        return torch.cat([rates, torch.cat([keys, logits], -1).reshape(-1)])

    @torch.no_grad()
    def spread_initial_logits(self, base: torch.Tensor, last_logit: float) -> None:
        """base (H, raw_size), every head's reflections at b = initial_logit -> in place, head h's at
        b evenly spaced from initial_logit (head 0) to last_logit (head H - 1): write strengths
        spread over the heads, as Mamba spreads dt (the model's `reflection_init_logit_last`), so
        some heads start as near-identity transitions that keep long context and others as strong
        writes and flips (one head: initial_logit)."""
        H, N = base.shape[0], self.state_dim
        logits = torch.linspace(self.initial_logit, last_logit, H, dtype=base.dtype, device=base.device)
        base[:, N:].view(H, self.num_reflections, N + 1)[..., N] = logits[:, None]

    def close_range(self, raw: torch.Tensor) -> torch.Tensor:
        """raw (..., raw_size) -> the same with each reflection's b replaced by c, 2 sigmoid(c) = beta of
        the closed range [0, 2] (CLOSED_STRETCH; the model's `reflection_range: closed`): a learnt flip
        reaches eigenvalue -1 along its key (to 1 - 2.4e-7: c is the logit of beta / 2 clipped to
        [1e-7, 1 - 1e-7], so every scan, the native kernel's included, takes it as it takes b), and
        the gradient is zero once beta is clipped at an end.  Decays and keys pass unchanged."""
        N = self.state_dim
        reflections = raw[..., N:].reshape(*raw.shape[:-1], self.num_reflections, N + 1)
        half_beta = ((1 + 2 * CLOSED_STRETCH) * torch.sigmoid(reflections[..., N:]) - CLOSED_STRETCH).clamp(0, 1)
        closed = torch.cat([reflections[..., :N], torch.logit(half_beta, eps=1e-7)], -1)
        return torch.cat([raw[..., :N], closed.flatten(-2)], -1)

    def hold_decays(self, raw: torch.Tensor) -> torch.Tensor:
        """raw (..., raw_size) -> the same with every decay's raw rate at UNIT_MAGNITUDE_RAW, so d = 1
        (to float precision) in every scan: A_bar_t is the reflections alone and the state forgets only
        what the delta writes replace (the model's `reflection_decay: false`, DeltaProduct without
        its gate).  The rates get no gradient; keys and betas pass unchanged."""
        N = self.state_dim
        return torch.cat([torch.full_like(raw[..., :N], UNIT_MAGNITUDE_RAW), raw[..., N:]], -1)

    def snap_to_grid(self, raw: torch.Tensor, dt: torch.Tensor, grid: int) -> torch.Tensor:
        """raw (..., raw_size), dt (...) -> raw of exact reflections: every H's eigenvalue 1 - beta
        along its key snapped to the grid of 2nd roots of unity, +1 (beta = 0: no reflection) or -1
        (beta = 2: b > 0), and every decay set to 1 (raw rate UNIT_MAGNITUDE_RAW), so A_bar_t is
        orthogonal and a flip along k neither fades nor drifts.  The keys keep their gradients; the
        betas and decays get none while snapped (the decision is b's sign, not a learnt angle).
        Only grid 2 exists for reflections (`model.exact_reflections`); dt is not used (a step of
        dt = 0, the scans' padding, is the identity whatever beta is)."""
        if grid != 2:
            raise ValueError(f"householder reflections snap to the 2nd roots of unity (grid 2), got grid {grid}")
        N = self.state_dim
        reflections = raw[..., N:].reshape(*raw.shape[:-1], self.num_reflections, N + 1)
        exact = torch.where(reflections[..., N:] > 0, EXACT_REFLECTION_LOGIT, -EXACT_REFLECTION_LOGIT).to(raw.dtype)
        return self.hold_decays(torch.cat([raw[..., :N], torch.cat([reflections[..., :N], exact], -1).flatten(-2)], -1))

    def factors(self, A, dt, B, method, alpha=0.5):
        """A = (a, keys, beta), dt (...), B (..., N) -> the factors of A_bar_t = H_r ... H_1 diag(d):
        d (..., N), unit keys (..., r, N), beta (..., r) (0 where dt is 0: a padding step is the
        identity) and B_bar (..., N), the delta writes' sum_i beta_i H_r .. H_{i+1} k_i in it (the module
        docstring); what the Triton kernel takes (`triton/householder.py`)."""
        a, keys, beta = A
        d, B_bar = discretize_diagonal(a, B, dt, method, alpha)
        d = 2 * d - 1 if self.signed else d
        beta = torch.where((dt == 0)[..., None], 0.0, beta)
        keys = torch.nn.functional.normalize(keys, dim=-1)
        if self.reflection_input != "b":
            writes = torch.zeros_like(keys[..., 0, :])
            for k, b in zip(keys.unbind(-2), beta.unbind(-1)):       # w <- H_i w + beta_i k_i
                writes = writes - b[..., None] * k * ((k * writes).sum(-1, keepdim=True) - 1)
            B_bar = writes + B_bar if self.reflection_input == "both" else writes
        return d, keys, beta, B_bar

    def discretize(self, A, dt, B, method, alpha=0.5):
        """A = (a, keys, beta), dt (...), B (..., N) -> ((A_bar (..., 1, N, N),), B_bar (..., N)), each
        reflection applied to the columns of diag(d) as M - beta k (k^T M) with k of unit norm.  A step
        of dt = 0 is the identity (the chunked scan pads chunks with such steps)."""
        d, keys, beta, B_bar = self.factors(A, dt, B, method, alpha)
        M = torch.diag_embed(d)
        for k, b in zip(keys.unbind(-2), beta.unbind(-1)):
            M = M - b[..., None, None] * k[..., :, None] * (k[..., None, :] @ M)
        return (M[..., None, :, :],), B_bar

    def dense_discretize(self, A, dt, B, method, alpha=0.5):
        """The reference: the textbook reflections I - beta k k^T / (k^T k), multiplied as matrices,
        times the dense discretisation (`discretization.discretize`) of diag(a); a delta write is the
        affine map [H_i, beta_i k_i / |k_i|] on [S; x^T], composed as (N + 1) x (N + 1) matrices."""
        a, keys, beta = A
        D_bar, B_bar = discretize(torch.diag_embed(a), B, dt, method, alpha)
        eye = torch.eye(self.state_dim, dtype=a.dtype, device=a.device)
        D_bar = 2 * D_bar - eye if self.signed else D_bar
        affine = torch.zeros(*D_bar.shape[:-2], self.state_dim + 1, self.state_dim + 1, dtype=a.dtype, device=a.device)
        affine[..., :-1, :-1], affine[..., -1, -1] = D_bar, 1
        for i in range(self.num_reflections):
            k = keys[..., i, :, None]
            step = torch.zeros_like(affine)
            step[..., :-1, :-1] = eye - beta[..., i, None, None] * (k @ k.transpose(-1, -2)) / (k.transpose(-1, -2) @ k)
            step[..., :-1, -1] = beta[..., i, None] * k[..., 0] / k[..., 0].norm(dim=-1, keepdim=True)
            step[..., -1, -1] = 1
            affine = step @ affine
        writes = affine[..., :-1, -1]
        B_bar = {"b": B_bar, "delta": writes, "both": B_bar + writes}[self.reflection_input]
        return affine[..., :-1, :-1], B_bar

    def flops_per_token(self, head_dim: int) -> dict:
        """As the kernel runs it: unit keys and betas, the diagonal's discretisation, then per channel
        the decay (N) and each reflection's k^T X and rank-1 update (2 N multiply-adds)."""
        N, r = self.state_dim, self.num_reflections
        return {"build_A": 3 * r * N, "discretize": 6 * N, "apply": (1 + 4 * r) * N * head_dim}
