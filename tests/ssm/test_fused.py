"""The fused native scan against the dense reference (`selective_scan_ref`): values, gradients,
float64 gradcheck, odd lengths, initial/final state, every discretisation, shared B/C groups, and the
pure-PyTorch fallback when the kernel is forced off."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, requires_native_kernel
from sparse_ssm.ssm import fused
from sparse_ssm.ssm.scan import selective_scan, selective_scan_ref
from sparse_ssm.ssm.structures import DiagonalStructure

pytestmark = requires_native_kernel()

# (batch, length, heads, head_dim, state, groups): P and N below / at / above a vector, lengths across
# the 32-token chunks of the kernel, one group per head and heads sharing B/C
SHAPES = [(1, 1, 1, 1, 1, 1), (2, 7, 2, 3, 5, 1), (1, 33, 2, 8, 16, 2), (2, 70, 4, 16, 4, 2), (1, 65, 3, 9, 17, 3),
          (2, 32, 4, 12, 8, 1)]
METHODS = [("zoh", 0.5), ("bilinear", 0.5), ("gbt", 0.0), ("gbt", 0.8), ("gbt", 1.0)]


def inputs(b, L, H, P, N, G, dtype, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    dt = torch.nn.functional.softplus(r(b, L, H) - 1)
    a = 0.5 * r(b, L, H, N)                                    # raw: A_t = -exp(2 raw)
    h0 = r(b, H, N, P) if with_state else None
    return [r(b, L, H, P), dt, a, r(b, L, G, N), r(b, L, G, N), r(b, L, H), h0]


def both(fn, xs, method, alpha):
    """(y, final state) and the gradients of a random weighting of both, for every input."""
    leaves = [None if x is None else x.clone().requires_grad_() for x in xs]
    y, h = fn(*leaves[:6], DiagonalStructure(xs[2].shape[-1]), method, alpha, leaves[6])
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    wh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    grads = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), [x for x in leaves if x is not None])
    return y.detach(), h.detach(), grads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("method, alpha", METHODS)
def test_fused_scan_matches_the_reference_in_float64(shape, method, alpha):
    xs = inputs(*shape, torch.float64)
    y, h, grads = both(fused.selective_scan_fused, xs, method, alpha)
    y_ref, h_ref, grads_ref = both(selective_scan_ref, xs, method, alpha)
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-11)
    assert torch.allclose(h, h_ref, rtol=1e-10, atol=1e-11)
    for name, g, g_ref in zip(["u", "dt", "a", "B", "C", "D", "initial_state"], grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-10), name


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("method, alpha", METHODS[:2])
def test_fused_scan_matches_the_reference_in_float32(shape, method, alpha):
    x64 = inputs(*shape, torch.float64)
    y, h, grads = both(fused.selective_scan_fused, [None if x is None else x.float() for x in x64], method, alpha)
    y_ref, h_ref, grads_ref = both(selective_scan_ref, x64, method, alpha)
    scale = lambda t: t.abs().max().item() + 1e-6
    assert (y.double() - y_ref).abs().max() < 1e-5 * scale(y_ref)
    assert (h.double() - h_ref).abs().max() < 1e-5 * scale(h_ref)
    for name, g, g_ref in zip(["u", "dt", "a", "B", "C", "D", "initial_state"], grads, grads_ref):
        assert (g.double() - g_ref).abs().max() < 2e-5 * scale(g_ref), name


@pytest.mark.parametrize("method, alpha", METHODS[:3])
def test_fused_scan_gradcheck(method, alpha):
    xs = [x.requires_grad_() for x in inputs(1, 35, 2, 3, 5, 1, torch.float64)]
    fn = lambda *t: fused.selective_scan_fused(*t[:6], DiagonalStructure(5), method, alpha, t[6])
    assert torch.autograd.gradcheck(fn, xs)


def test_without_initial_state_and_with_only_the_output_used():
    xs = inputs(2, 40, 2, 8, 6, 2, torch.float64, with_state=False)
    y, h, grads = both(fused.selective_scan_fused, xs, "zoh", 0.5)
    y_ref, h_ref, grads_ref = both(selective_scan_ref, xs, "zoh", 0.5)
    assert torch.allclose(y, y_ref) and torch.allclose(h, h_ref)
    assert all(torch.allclose(g, r) for g, r in zip(grads, grads_ref))
    leaves = [x.clone().requires_grad_() for x in xs[:6]]
    y, _ = fused.selective_scan_fused(*leaves, DiagonalStructure(6), "zoh")
    y.sum().backward()                                   # the final state's gradient is absent: treated as 0
    y_ref, _ = selective_scan_ref(*[x.detach().requires_grad_() for x in xs[:6]], DiagonalStructure(6), "zoh")
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_the_dispatch_takes_the_fused_path_on_cpu(monkeypatch):
    calls = []
    real = fused.selective_scan_fused
    monkeypatch.setattr(fused, "selective_scan_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs = inputs(1, 9, 2, 8, 4, 1, torch.float32)
    y, h = selective_scan(*xs[:6], DiagonalStructure(4), "zoh", 0.5, xs[6])
    assert calls == [1]
    y_ref, h_ref = selective_scan_ref(*xs[:6], DiagonalStructure(4), "zoh", 0.5, xs[6])
    assert torch.allclose(y, y_ref, atol=1e-5)


@pytest.mark.slow
def test_the_pure_pytorch_fallback_when_the_kernel_is_off(tmp_path):
    """SPARSE_SSM_NATIVE=0 (what a machine without a compiler gets): the same numbers from the
    chunked path, and the reason is known."""
    code = ("import torch; from sparse_ssm.ssm import fused, scan; from sparse_ssm.ssm.structures import "
            "DiagonalStructure; torch.manual_seed(0); s = DiagonalStructure(4);"
            "x = [torch.randn(1, 9, 2, 8), torch.rand(1, 9, 2) * 0.3, torch.randn(1, 9, 2, 4), "
            "torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4), torch.randn(1, 9, 2)];"
            "from sparse_ssm.ssm.kernels import unavailable_reason;"
            "assert not fused.available(x[0], s); print(unavailable_reason());"
            "y = scan.selective_scan(*x, s, 'zoh')[0]; r = scan.selective_scan_ref(*x, s, 'zoh')[0];"
            "print(float((y - r).abs().max()))")
    env = {**os.environ, "SPARSE_SSM_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    reason, err = proc.stdout.split()
    assert reason == "SPARSE_SSM_NATIVE=0" and float(err) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("L", [1, 37])
def test_the_fused_output_gate_matches_the_reference(dtype, tol, L):
    """y * silu(z) in the kernel, z a view into a wider tensor (as the projection produces it)."""
    xs = inputs(2, L, 2, 8, 6, 1, torch.float64)
    z_full = torch.randn(2, L, 2 * 2 * 8, dtype=torch.float64)
    xs = [None if x is None else x.to(dtype) for x in xs]
    z = z_full.to(dtype)[..., 16:].reshape(2, L, 2, 8)
    results = []
    for fn in (fused.selective_scan_fused, selective_scan_ref):
        leaves = [None if x is None else x.clone().requires_grad_() for x in xs + [z]]
        y, h = fn(*leaves[:6], DiagonalStructure(6), "zoh", 0.5, leaves[6], leaves[7])
        w = torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)
        grads = torch.autograd.grad((y * w).sum() + h.sum(), leaves)
        results.append((y.detach(), h.detach(), grads))
    (y, h, grads), (y_ref, h_ref, grads_ref) = results
    assert torch.allclose(y, y_ref, atol=tol, rtol=tol) and torch.allclose(h, h_ref, atol=tol, rtol=tol)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=tol * 10, rtol=tol * 10)


def test_one_step_in_place_with_the_gate():
    from sparse_ssm.ssm.scan import selective_scan_step

    xs = inputs(3, 1, 2, 8, 6, 2, torch.float32)
    z = torch.randn(3, 2, 8)
    state = xs[6].clone()
    y = selective_scan_step(xs[0][:, 0], xs[1][:, 0], xs[2][:, 0], xs[3][:, 0], xs[4][:, 0], xs[5][:, 0],
                            DiagonalStructure(6), "zoh", 0.5, state, z)
    y_ref, h_ref = selective_scan_ref(*xs[:6], DiagonalStructure(6), "zoh", 0.5, xs[6], z[:, None])
    assert torch.allclose(y, y_ref[:, 0], atol=1e-5) and torch.allclose(state, h_ref, atol=1e-5)


@pytest.mark.parametrize("dtype,eps,dim", [(torch.float32, 1e-5, 256), (torch.float32, None, 13),
                                           (torch.float64, 1e-6, 9)])
def test_decode_rms_norm_equals_torch_rms_norm(dtype, eps, dim):
    """The decoding step's native RMSNorm against nn.RMSNorm (eps None: the dtype's epsilon),
    dims below / at / above a vector; tiny rows show whether eps is the same."""
    norm = torch.nn.RMSNorm(dim, eps=eps, dtype=dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.cat([torch.randn(3, dim, dtype=dtype), 1e-4 * torch.randn(1, dim, dtype=dtype)])
    out = fused.decode_rms_norm(x, norm.weight.detach(), eps)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out, norm(x).detach(), atol=tol, rtol=tol)
    assert fused.decode_rms_norm(x.t(), norm.weight.detach(), eps) is None      # not contiguous rows: module


def test_the_kernels_build_with_the_environments_own_ninja(monkeypatch, tmp_path):
    """A system ninja of another version than the `ninja` wheel's reads the other's build log as
    stale: `.venv/bin/python` and an activated venv alternating rebuilt every kernel each time."""
    import shutil

    import ninja
    from torch.utils import cpp_extension

    from sparse_ssm.ssm import kernels

    monkeypatch.setenv("SPARSE_SSM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin" + os.pathsep + "/bin")   # what `make` runs with: no venv on PATH
    used = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, *a, **k: used.append(shutil.which("ninja")) or name)
    kernels._build()
    assert used == [shutil.which("ninja", path=ninja.BIN_DIR)]
