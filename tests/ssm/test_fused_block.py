"""The fused native scans for block-diagonal (dense included), rotation, banded, low-rank and
Householder-product structures against the dense reference (`selective_scan_ref`): values, gradients of every input (through the kernel's
own solve and parameterisation backward), float64 gradcheck, odd sizes, states, groups, the gate."""

import pytest
import torch

from helpers import requires_native_kernel
from triton_cases import gradients
from sparse_ssm.ssm.fused_block import selective_scan_fused_block, supports
from sparse_ssm.ssm.hippo import hippo
from sparse_ssm.ssm.scan import selective_scan_ref
from sparse_ssm.ssm.structures import (BandedStructure, BlockStructure, HouseholderStructure, LowRankStructure,
                                      PermutationStructure, RotationStructure)

pytestmark = requires_native_kernel()

STRUCTURES = [BlockStructure(8, 2), BlockStructure(8, 4), BlockStructure(8, 8), BlockStructure(9, 3),
              RotationStructure(8), RotationStructure(6), BandedStructure(8, 2), BandedStructure(8, 4),
              BandedStructure(9, 3), LowRankStructure(8, 1), LowRankStructure(8, 2), LowRankStructure(7, 3),
              HouseholderStructure(8, 1), HouseholderStructure(8, 2), HouseholderStructure(7, 3),
              HouseholderStructure(8, 2, signed=True), HouseholderStructure(8, 2, reflection_input="delta"),
              HouseholderStructure(7, 3, signed=True, reflection_input="both")]
METHODS = {"block": [("bilinear", 0.5), ("gbt", 0.3), ("gbt", 1.0)],
           "rotation": [("zoh", 0.5), ("bilinear", 0.5), ("gbt", 0.8)],
           "householder": [("zoh", 0.5), ("bilinear", 0.5), ("gbt", 0.8)]}
SHAPES = [(1, 1, 1, 3, 1), (2, 7, 2, 8, 2), (1, 35, 2, 5, 1)]    # b, L, H, P, G: one token, groups, two chunks


def methods(structure):
    if isinstance(structure, HouseholderStructure):
        return METHODS["householder"]
    return METHODS["rotation" if isinstance(structure, RotationStructure) else "block"]


def inputs(structure, b, L, H, P, G, dtype, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    N = structure.state_dim
    base = structure.raw_from_hippo(hippo("legs", N)[0])
    # reflections of every strength (beta = 2 sigmoid(raw) from ~0 to ~2), not only the weak initial ones
    spread = 2.0 if isinstance(structure, HouseholderStructure) else 0.4
    raw = base + spread * r(b, L, H, structure.raw_size)
    dt = torch.nn.functional.softplus(r(b, L, H) - 1)
    xs = [r(b, L, H, P), dt, raw, r(b, L, G, N), r(b, L, G, N), r(b, L, H), r(b, H, N, P) if with_state else None]
    return [None if x is None else x.to(dtype) for x in xs]


def run(fn, xs, structure, method, alpha, z=None):
    leaves = [None if x is None else x.clone().requires_grad_() for x in xs + [z]]
    y, h = fn(*leaves[:6], structure, method, alpha, leaves[6], leaves[7])
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    return y.detach(), h.detach(), gradients((y * wy).sum() + (h ** 2).sum(), [x for x in leaves if x is not None])


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: f"{s.name}-N{s.state_dim}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_block_scan_matches_the_reference_in_float64(structure, shape):
    for method, alpha in methods(structure):
        xs = inputs(structure, *shape, torch.float64)
        y, h, grads = run(selective_scan_fused_block, xs, structure, method, alpha)
        y_ref, h_ref, grads_ref = run(selective_scan_ref, xs, structure, method, alpha)
        assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-10), method
        assert torch.allclose(h, h_ref, rtol=1e-9, atol=1e-10), method
        for name, a, b in zip(["u", "dt", "raw", "B", "C", "D", "initial_state"], grads, grads_ref):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-9), (method, name)


@pytest.mark.parametrize("structure", [BlockStructure(8, 4), RotationStructure(8), BandedStructure(8, 4),
                                       LowRankStructure(8, 2), HouseholderStructure(8, 2)], ids=lambda s: s.name)
def test_fused_block_scan_in_float32_with_the_gate_and_no_initial_state(structure):
    method, alpha = methods(structure)[0]
    x64 = inputs(structure, 2, 37, 2, 8, 1, torch.float64, with_state=False)
    z64 = torch.randn(2, 37, 2, 8, dtype=torch.float64)
    y, h, grads = run(selective_scan_fused_block, [None if x is None else x.float() for x in x64], structure, method,
                      alpha, z64.float())
    y_ref, h_ref, grads_ref = run(selective_scan_ref, x64, structure, method, alpha, z64)
    scale = lambda t: t.abs().max().item() + 1e-6
    assert (y.double() - y_ref).abs().max() < 2e-5 * scale(y_ref)
    assert (h.double() - h_ref).abs().max() < 2e-5 * scale(h_ref)
    for a, b in zip(grads, grads_ref):
        assert (a.double() - b).abs().max() < 1e-4 * scale(b)


@pytest.mark.parametrize("structure, method", [(BlockStructure(6, 3), "bilinear"), (RotationStructure(4), "zoh"),
                                               (RotationStructure(4), "gbt"), (BandedStructure(6, 2), "bilinear"),
                                               (LowRankStructure(5, 2), "gbt"), (HouseholderStructure(5, 2), "zoh"),
                                               (HouseholderStructure(4, 1), "gbt"),
                                               (HouseholderStructure(4, 2, reflection_input="delta"), "zoh"),
                                               (HouseholderStructure(4, 2, reflection_input="both"), "gbt")],
                         ids=["block3-bilinear", "rotation-zoh", "rotation-gbt", "banded-bilinear", "lowrank-gbt",
                              "householder2-zoh", "householder1-gbt", "householder2-delta-zoh", "householder2-both-gbt"])
def test_fused_block_scan_gradcheck(structure, method):
    xs = [x.requires_grad_() for x in inputs(structure, 1, 34, 2, 3, 1, torch.float64)]
    fn = lambda *t: selective_scan_fused_block(*t[:6], structure, method, 0.3, t[6])
    assert torch.autograd.gradcheck(fn, xs)


def test_what_the_block_kernel_takes():
    assert supports(RotationStructure(4), "zoh") and supports(BlockStructure(8, 4), "bilinear")
    assert supports(BandedStructure(8, 4), "gbt") and supports(LowRankStructure(8, 2), "bilinear")
    assert supports(HouseholderStructure(8, 2), "zoh") and supports(HouseholderStructure(8, 2), "gbt")
    assert not supports(BlockStructure(8, 4), "zoh")          # a general block's ZOH stays on the PyTorch path
    assert not supports(PermutationStructure(8), "zoh")       # PD-SSM's arg-max selection has no kernel


@pytest.mark.parametrize("structure, grid", [(HouseholderStructure(8, 1), 2), (HouseholderStructure(7, 2), 2),
                                             (RotationStructure(8), 12)],
                         ids=["householder1", "householder2", "rotation"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_snapped_transitions_match_the_reference_and_keep_the_norm_of_every_state_column(structure, grid, dtype):
    """Exact reflections / rotations (`snap_to_grid`: saturated logits, decay raw -20) through the
    kernel: values and gradients as the reference's, and with B = 0 (the model's inputs while
    snapped) the orthogonal steps keep the norm of every column of the state over 2,000 tokens."""
    x64 = inputs(structure, 2, 37, 2, 3, 1, torch.float64)
    x64[2] = structure.snap_to_grid(x64[2], x64[1], grid)
    xs = [x.to(dtype) for x in x64]
    y, h, grads = run(selective_scan_fused_block, xs, structure, "zoh", 0.5)
    y_ref, h_ref, grads_ref = run(selective_scan_ref, x64, structure, "zoh", 0.5)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    scale = lambda t: t.abs().max().item() + 1e-6
    assert (y.double() - y_ref).abs().max() < tol * scale(y_ref)
    assert (h.double() - h_ref).abs().max() < tol * scale(h_ref)
    for a, b in zip(grads, grads_ref):
        assert (a.double() - b).abs().max() < 10 * tol * scale(b)
    u, dt, raw, B, C, D, h0 = inputs(structure, 1, 2000, 2, 3, 1, dtype)
    _, hT = selective_scan_fused_block(u, dt, structure.snap_to_grid(raw, dt, grid), torch.zeros_like(B), C, D,
                                       structure, "zoh", 0.5, h0)
    assert torch.allclose(hT.norm(dim=-2), h0.norm(dim=-2), rtol=1e-12 if dtype == torch.float64 else 1e-4)
