"""The fast chunked scan and the sequential scan against the dense reference (values and gradients)."""

import pytest
import torch

from sparse_ssm.ssm.hippo import hippo
from sparse_ssm.ssm.scan import (selective_scan, selective_scan_chunked, selective_scan_ref,
                                 selective_scan_sequential)
from sparse_ssm.ssm.structures import (BandedStructure, BlockStructure, DiagonalStructure, HouseholderStructure,
                                       LowRankStructure, PermutationStructure, RotationStructure)
from triton_cases import assert_within_one_ulp, gradients, inputs

STRUCTURES = [DiagonalStructure(6), BlockStructure(6, 2), BlockStructure(6, 3), BlockStructure(6, 6),
              BandedStructure(6, 2), BandedStructure(6, 3), LowRankStructure(6, 1), LowRankStructure(6, 2),
              PermutationStructure(6), HouseholderStructure(6, 1), HouseholderStructure(6, 3),
              HouseholderStructure(6, 2, signed=True), HouseholderStructure(6, 2, reflection_input="delta"),
              HouseholderStructure(6, 1, signed=True, reflection_input="both")]


def make_inputs(structure, batch, length, heads=2, head_dim=3, dtype=torch.float64, dt_scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = structure.state_dim
    base = structure.raw_from_hippo(hippo("legs", N)[0])
    raw = (base + 0.3 * torch.randn(batch, length, heads, structure.raw_size, dtype=torch.float64, generator=g))
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).to(dtype)
    return dict(
        u=rnd(batch, length, heads, head_dim),
        dt=(dt_scale * torch.rand(batch, length, heads, dtype=torch.float64, generator=g) + 1e-3).to(dtype),
        raw=raw.to(dtype), B=rnd(batch, length, heads, N), C=rnd(batch, length, heads, N), D=rnd(batch, length, heads),
        initial_state=rnd(batch, heads, N, head_dim))


def run(fn, structure, inputs, method, **kw):
    x = dict(inputs)
    return fn(x["u"], x["dt"], x["raw"], x["B"], x["C"], x["D"], structure, method, 0.3, x["initial_state"], **kw)


def methods_for(structure):
    return ["zoh", "bilinear", "gbt"] if structure.supports_zoh else ["bilinear", "gbt"]


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
@pytest.mark.parametrize("batch, length, chunk", [(1, 1, 4), (2, 7, 4), (1, 13, 8), (3, 16, 4), (2, 5, 16)])
def test_fast_paths_match_reference(structure, batch, length, chunk):
    for method in methods_for(structure):
        inputs = make_inputs(structure, batch, length)
        y_ref, s_ref = run(selective_scan_ref, structure, inputs, method)
        y_seq, s_seq = run(selective_scan_sequential, structure, inputs, method)
        y_fast, s_fast = run(selective_scan_chunked, structure, inputs, method, chunk_size=chunk)
        for y, s in ((y_seq, s_seq), (y_fast, s_fast)):
            assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-10), method
            assert torch.allclose(s, s_ref, rtol=1e-9, atol=1e-10), method


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
def test_gradients_match_reference(structure):
    method = methods_for(structure)[0]
    inputs = make_inputs(structure, 2, 11)
    grads = []
    for fn, kw in ((selective_scan_ref, {}), (selective_scan_chunked, {"chunk_size": 4})):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, s = run(fn, structure, leaves, method, **kw)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        grads.append(dict(zip(leaves, gradients((y * w).sum() + (s ** 2).sum(), list(leaves.values())))))
    for k in inputs:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-8, atol=1e-9), k


@pytest.mark.parametrize("structure", [DiagonalStructure(3), BlockStructure(4, 2), BandedStructure(4, 2),
                                       LowRankStructure(3, 1), HouseholderStructure(3, 2)],
                         ids=lambda s: s.name)
def test_gradcheck_chunked(structure):
    method = methods_for(structure)[-1]
    inputs = make_inputs(structure, 1, 5, heads=1, head_dim=2)
    names = list(inputs)

    def f(*tensors):
        y, s = run(selective_scan_chunked, structure, dict(zip(names, tensors)), method, chunk_size=2)
        return y, s
    assert torch.autograd.gradcheck(f, tuple(v.clone().requires_grad_() for v in inputs.values()))


def test_negative_diagonal_decays_of_the_bilinear_transform():
    """dt |a| > 2 makes the bilinear A_bar negative: signs go through the parity path."""
    structure = DiagonalStructure(4)
    inputs = make_inputs(structure, 2, 9, dt_scale=20.0)
    dt, a = inputs["dt"], structure.continuous(inputs["raw"])
    assert ((1 + 0.35 * dt[..., None] * a) < 0).any()
    y_ref, s_ref = run(selective_scan_ref, structure, inputs, "gbt")
    y_fast, s_fast = run(selective_scan_chunked, structure, inputs, "gbt", chunk_size=4)
    assert torch.allclose(y_fast, y_ref, rtol=1e-9, atol=1e-10) and torch.allclose(s_fast, s_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
def test_state_carries_across_calls(structure):
    """Scanning a sequence in two calls (passing the final state) equals one call."""
    method = methods_for(structure)[0]
    inputs = make_inputs(structure, 2, 12)
    y_full, s_full = run(selective_scan_chunked, structure, inputs, method, chunk_size=4)
    first = {k: (v if k == "initial_state" else v[:, :5]) for k, v in inputs.items()}
    y1, s1 = run(selective_scan_chunked, structure, first, method, chunk_size=4)
    second = {k: (s1 if k == "initial_state" else v[:, 5:]) for k, v in inputs.items()}
    y2, s2 = run(selective_scan_chunked, structure, second, method, chunk_size=4)
    assert torch.allclose(torch.cat([y1, y2], 1), y_full, atol=1e-10) and torch.allclose(s2, s_full, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_low_precision_inputs_follow_float64(dtype, tol):
    structure = DiagonalStructure(8)
    inputs = make_inputs(structure, 2, 40, heads=2, head_dim=4)
    y64, _ = run(selective_scan_chunked, structure, inputs, "zoh")
    low = {k: v.to(dtype) for k, v in inputs.items()}
    y, _ = run(selective_scan_chunked, structure, low, "zoh")
    assert y.dtype == dtype
    assert ((y.double() - y64).abs().max() / y64.abs().max()) < tol


@pytest.mark.parametrize("structure", [*STRUCTURES, RotationStructure(6), DiagonalStructure(6, signed=True)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_low_precision_inputs_of_every_structure_keep_a_float32_state(structure, dtype, ulp):
    """bf16 / fp16 inputs to the chunked scan (10 chunks: the tree over the boundaries): y and every
    gradient are the fp32 sequential scan's on the same values within one ulp of the dtype, the final
    state float32 (the structured path once gave NaN: matrix_exp in bf16)."""
    xs = inputs(2, 37, 2, 3, structure, 1, dtype=dtype)
    chunked = lambda *a: selective_scan_chunked(*a, chunk_size=4)
    assert_within_one_ulp(xs, structure, "zoh" if structure.supports_zoh else "bilinear", dtype, ulp, scan=chunked)


@pytest.mark.parametrize("structure, method", [(BlockStructure(6, 2), "zoh"), (DiagonalStructure(6), "zoh")],
                         ids=["block-zoh", "diagonal"])
def test_dispatch_follows_use_parallel_scan(structure, method, monkeypatch):
    """use_parallel_scan=False runs the sequential scan; True runs a fast path (fused when the kernel
    takes the structure, else chunked) - checked by which function ran, and the values agree."""
    import sparse_ssm.ssm.scan as scan_module

    ran = []
    for name in ("selective_scan_sequential", "selective_scan_chunked"):
        real = getattr(scan_module, name)
        monkeypatch.setattr(scan_module, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    real_fused = scan_module.fused.selective_scan_fused
    monkeypatch.setattr(scan_module.fused, "selective_scan_fused",
                        lambda *a, **k: ran.append("fused") or real_fused(*a, **k))
    inputs = make_inputs(structure, 1, 6)
    x = dict(inputs)
    args = (x["u"], x["dt"], x["raw"], x["B"], x["C"], x["D"], structure, method, 0.5, x["initial_state"])
    y_seq, _ = selective_scan(*args, use_parallel_scan=False)
    assert ran == ["selective_scan_sequential"]
    ran.clear()
    y_par, _ = selective_scan(*args, use_parallel_scan=True, chunk_size=4)
    fast = "fused" if scan_module.fused.available(x["u"], structure, method) else "selective_scan_chunked"
    assert ran == [fast]
    assert torch.allclose(y_par, y_seq, atol=1e-10)
