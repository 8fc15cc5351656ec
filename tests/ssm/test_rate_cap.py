"""The cap on decay rates (`structures.block.rate_exp`): raw rate parameters far above it give finite
outputs and gradients on every scan path (uncapped, a float32 rate overflows to inf and its gradient
is NaN), and the native kernels cap at the same place as the pure-PyTorch references."""

import math

import pytest
import torch

from sparse_ssm.ssm import fused
from sparse_ssm.ssm.discretization import expm1_ratio
from sparse_ssm.ssm.hippo import hippo
from sparse_ssm.ssm.scan import selective_scan_chunked, selective_scan_ref, selective_scan_sequential
from sparse_ssm.ssm.structures import (BlockStructure, DiagonalStructure, LowRankStructure, PermutationStructure,
                                       RotationStructure)
from sparse_ssm.ssm.structures.block import RATE_EXP_MAX

# structure, method, which raw entries set a rate through rate_exp and how (see the structures'
# `continuous`): the raw value r enters as exp(scale * r); the largest rate of A is exp(power * cap)
CASES = [(DiagonalStructure(8), "zoh"), (DiagonalStructure(8), "bilinear"), (DiagonalStructure(8, signed=True), "zoh"),
         (RotationStructure(8), "zoh"), (BlockStructure(8, 4), "bilinear"), (LowRankStructure(8, 2), "bilinear")]


def rate_entries(structure):
    """(mask over the raw vector of the entries that go through rate_exp, scale, power)."""
    N = structure.state_dim
    mask = torch.zeros(structure.raw_size, dtype=torch.bool)
    if isinstance(structure, RotationStructure):
        mask[0::2] = True                                   # r0 of each pair: lam = exp(2 r0)
        return mask, 2, 1
    if isinstance(structure, (DiagonalStructure, PermutationStructure)):
        mask[:N] = True                                     # a = -exp(2 r) (then the permutation's logits)
        return mask, 2, 1
    if isinstance(structure, BlockStructure):
        b = structure.block_size
        mask.view(-1, b, b).diagonal(dim1=-2, dim2=-1).fill_(True)   # L_ii = exp(R_ii); A = -L L^T + skew
        return mask, 1, 2
    mask[:N] = True                                         # low rank: lam = -exp(d) - |U| |V|
    return mask, 1, 1


def inputs(structure, argument, dtype, b=2, L=10, H=2, P=3):
    """Every other token drives the rate arguments to `argument` (above the cap) with a step dt
    that makes the capped rate decay by exp(-1.5) per token (zoh), so capping at another place changes
    the outputs; the other tokens are ordinary."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    N = structure.state_dim
    mask, scale, power = rate_entries(structure)
    raw = structure.raw_from_hippo(hippo("legs", N)[0]) + 0.3 * r(b, L, H, structure.raw_size)
    dt = torch.nn.functional.softplus(r(b, L, H) - 1)
    big = raw[:, ::2]
    big[..., mask] = argument / scale
    raw[:, ::2] = big
    dt[:, ::2] = 1.5 * math.exp(-power * RATE_EXP_MAX)
    xs = [r(b, L, H, P), dt, raw, r(b, L, 1, N), r(b, L, 1, N), r(b, L, H), r(b, H, N, P)]
    return [x.to(dtype) for x in xs]


def run(scan, xs, structure, method):
    leaves = [x.clone().requires_grad_() for x in xs]
    y, h = scan(*leaves[:6], structure, method, 0.5, leaves[6])
    grads = torch.autograd.grad(y.sum() + (h ** 2).sum(), leaves)
    return y.detach(), h.detach(), grads


def paths(structure, method, dtype):
    out = {"sequential": selective_scan_sequential, "chunked": selective_scan_chunked}
    if fused.available(torch.zeros(1, dtype=dtype), structure, method):
        out["native"] = fused.selective_scan_fused
    return out


@pytest.mark.parametrize("structure, method", CASES, ids=lambda c: getattr(c, "name", c))
def test_native_and_pytorch_paths_cap_the_rates_where_the_reference_does(structure, method):
    xs = inputs(structure, argument=RATE_EXP_MAX + 10, dtype=torch.float64)
    y_ref, h_ref, grads_ref = run(selective_scan_ref, xs, structure, method)
    assert h_ref.abs().max() > 1e-3
    for name, scan in paths(structure, method, torch.float64).items():
        y, h, grads = run(scan, xs, structure, method)
        assert torch.allclose(y, y_ref, rtol=1e-8, atol=1e-10), name
        assert torch.allclose(h, h_ref, rtol=1e-8, atol=1e-10), name
        for what, a, b in zip(["u", "dt", "raw", "B", "C", "D", "h0"], grads, grads_ref):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), (name, what)


@pytest.mark.parametrize("structure, method", CASES, ids=lambda c: getattr(c, "name", c))
def test_rates_that_would_overflow_float32_give_finite_values_and_gradients(structure, method):
    xs = inputs(structure, argument=200.0, dtype=torch.float32)       # exp(200) is inf in float32
    for name, scan in {"reference": selective_scan_ref, **paths(structure, method, torch.float32)}.items():
        y, h, grads = run(scan, xs, structure, method)
        assert torch.isfinite(y).all() and torch.isfinite(h).all(), name
        assert all(torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize("structure", [DiagonalStructure(8), DiagonalStructure(8, signed=True), PermutationStructure(8)],
                         ids=lambda s: s.name)
def test_rates_that_underflow_to_zero_give_the_zoh_limit_on_every_path(structure):
    """exp(2 r) is 0 in float32 below r ~ -52: ZOH's input gain expm1(dt a) / a must then be its limit
    dt (the kernels' phi), not 0 / 0 — a trained PD-SSM drives its decays to 1 and died with NaN."""
    xs = inputs(structure, argument=0.0, dtype=torch.float32)
    raw = xs[2]
    raw[..., :structure.state_dim] = -60.0                               # a = -exp(-120) = -0 in float32
    limit = [x.double() for x in xs]
    limit[2][..., :structure.state_dim] = -30.0                          # a = -exp(-60): dt a ~ 1e-27, the same limit
    y_lim, h_lim, _ = run(selective_scan_ref, limit, structure, "zoh")
    for name, scan in {"reference": selective_scan_ref, **paths(structure, "zoh", torch.float32)}.items():
        y, h, grads = run(scan, xs, structure, "zoh")
        assert all(torch.isfinite(g).all() for g in grads), name
        assert torch.allclose(y.double(), y_lim, rtol=1e-4, atol=1e-4), name
        assert torch.allclose(h.double(), h_lim, rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zoh_input_gain_and_its_gradient_match_the_closed_form_down_to_rates_whose_square_underflows(dtype):
    """expm1(x)/x and its derivative against the float64 closed form (computed where it is exact:
    every x here squares to a normal float64).  x = dt a ~ -6.6e-40 is what a trained PD-SSM gave
    (dt 8e-11, a -8e-30): x^2 underflows in float32 and the plain quotient's gradient was inf - inf,
    which clip_grad_norm_ turned into NaN weights."""
    xs = [-30.0, -3.0, -0.5, -0.09, -0.011, -1e-3, -1e-6, -1e-12, -1e-30, -6.6e-40, 0.0, 1e-6, 0.05, 0.5]
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    value = expm1_ratio(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    exact = x.detach().double()                                         # what x holds, in float64
    nonzero = exact != 0
    q = torch.where(nonzero, exact, torch.ones_like(exact))
    ref_value = torch.where(nonzero, torch.expm1(q) / q, torch.ones_like(q))
    ref_grad = torch.where(nonzero, (q * torch.exp(q) - torch.expm1(q)) / q ** 2, torch.full_like(q, 0.5))
    # the closed-form derivative cancels for |x| < 1e-4 even in float64: there, its Taylor series
    # sum_k (k + 1) x^k / (k + 2)!
    taylor = 1 / 2 + exact * (1 / 3 + exact * (1 / 8 + exact / 30))
    ref_grad = torch.where(exact.abs() < 1e-4, taylor, ref_grad)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.isfinite(grad).all()
    assert torch.allclose(value.double(), ref_value, rtol=tol, atol=0)
    assert torch.allclose(grad.double(), ref_grad, rtol=10 * tol, atol=0)
