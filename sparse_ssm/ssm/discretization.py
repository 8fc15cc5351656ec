"""Discretisation of the continuous system x'(t) = A x(t) + B u(t) with step dt.

- ``zoh`` (zero-order hold, u constant over the step):
      A_bar = exp(dt A),  B_bar = (integral_0^dt exp(s A) ds) B = A^{-1} (exp(dt A) - I) B.
  Computed for dense matrices from one matrix exponential of the augmented matrix
  [[A, B], [0, 0]] * dt, whose top blocks are (A_bar, B_bar); no inverse of A is needed.
- ``gbt`` (generalised bilinear transform with parameter alpha):
      A_bar = (I - alpha dt A)^{-1} (I + (1 - alpha) dt A),  B_bar = (I - alpha dt A)^{-1} dt B.
  alpha = 0 is forward Euler, 1/2 is ``bilinear`` (Tustin), 1 is backward Euler.  For a stable A
  (every eigenvalue with negative real part) alpha >= 1/2 keeps A_bar inside the unit circle for
  every dt > 0; forward Euler needs dt small enough.

`discretize` is the dense reference (batched over leading dimensions).  The structured forms
that the layers use are the methods ``discretize`` of the structures in
`sparse_ssm.ssm.structures`; the closed forms for the diagonal case are here too
(`discretize_diagonal`), the block-diagonal form runs the dense formulas batched over small
blocks, and the diagonal-plus-low-rank form applies the bilinear inverse through the Woodbury
identity in O(N r).
"""

from __future__ import annotations

import torch

METHODS = ("zoh", "bilinear", "gbt")


def alpha_for(method: str, alpha: float) -> float:
    """The GBT parameter of a method: 0.5 for bilinear, `alpha` (checked) for gbt."""
    if method == "bilinear":
        return 0.5
    if method == "gbt":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"gbt alpha must be in [0, 1], got {alpha}")
        return alpha
    raise ValueError(f"unknown discretization {method!r}; expected one of {METHODS}")


def discretize(A: torch.Tensor, B: torch.Tensor, dt, method: str = "zoh", alpha: float = 0.5):
    """Dense discretisation.

    A: (..., N, N);  B: (..., N) or (..., N, M);  dt: a float or a tensor broadcastable to the
    leading dimensions of A.  Returns (A_bar (..., N, N), B_bar shaped like B).
    """
    vector_input = B.dim() == A.dim() - 1
    Bm = B.unsqueeze(-1) if vector_input else B
    dt = torch.as_tensor(dt, dtype=A.dtype, device=A.device)
    dt_mat = dt[..., None, None]
    N, M = A.shape[-1], Bm.shape[-1]
    lead = torch.broadcast_shapes(A.shape[:-2], Bm.shape[:-2], dt.shape)
    A = A.expand(*lead, N, N)
    Bm = Bm.expand(*lead, N, M)
    dt_mat = dt_mat.expand(*lead, 1, 1)
    if method == "zoh":
        top = torch.cat([A, Bm], dim=-1) * dt_mat
        aug = torch.cat([top, torch.zeros(*lead, M, N + M, dtype=A.dtype, device=A.device)], dim=-2)
        E = torch.linalg.matrix_exp(aug)
        A_bar, B_bar = E[..., :N, :N], E[..., :N, N:]
    else:
        a = alpha_for(method, alpha)
        eye = torch.eye(N, dtype=A.dtype, device=A.device)
        lhs = eye - a * dt_mat * A
        A_bar = torch.linalg.solve(lhs, eye + (1 - a) * dt_mat * A)
        B_bar = torch.linalg.solve(lhs, dt_mat * Bm)
    return A_bar, (B_bar.squeeze(-1) if vector_input else B_bar)


def discretize_state_matrix(A: torch.Tensor, dt, method: str = "zoh", alpha: float = 0.5) -> torch.Tensor:
    """A_bar alone (no input matrix): exp(dt A) or (I - a dt A)^{-1} (I + (1 - a) dt A).  A: (..., N, N)."""
    dt_mat = torch.as_tensor(dt, dtype=A.dtype, device=A.device)[..., None, None]
    if method == "zoh":
        return torch.linalg.matrix_exp(dt_mat * A)
    a = alpha_for(method, alpha)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - a * dt_mat * A, eye + (1 - a) * dt_mat * A)


def expm1_ratio(x: torch.Tensor) -> torch.Tensor:
    """expm1(x) / x, ZOH's input gain over dt (B_bar = dt expm1_ratio(dt a) B), finite in value and
    gradient everywhere.  Near 0 (|x| < 0.1 in float32, 1e-3 in float64, as in the kernels' phi) it
    is the series 1 + x/2 + x^2/6 + x^3/24 + x^4/120: the quotient's gradient, e^x/x - expm1(x)/x^2,
    is inf - inf there once x^2 underflows (a decay rate exp(2 r) ~ 1e-30 times dt ~ 1e-10)."""
    small = x.abs() < (1e-3 if x.dtype == torch.float64 else 0.1)
    safe = torch.where(small, torch.ones_like(x), x)
    series = 1 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x / 120)))
    return torch.where(small, series, torch.expm1(safe) / safe)


def discretize_diagonal(a: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str = "zoh",
                        alpha: float = 0.5):
    """Closed form for a diagonal A = diag(a).

    a, B: (..., N);  dt: (...) (one step per leading index).  Returns (A_bar (..., N), B_bar (..., N)).
    ZOH: A_bar = exp(dt a), B_bar = expm1(dt a) / a * B = dt expm1_ratio(dt a) B  (a <= 0).
    """
    dta = dt[..., None] * a
    if method == "zoh":
        return torch.exp(dta), dt[..., None] * expm1_ratio(dta) * B
    al = alpha_for(method, alpha)
    inv = 1.0 / (1.0 - al * dta)
    return (1.0 + (1.0 - al) * dta) * inv, dt[..., None] * inv * B
