"""The causal depthwise conv + SiLU: the native kernel against the F.conv1d reference (values,
gradients, gradcheck, every kernel size, with and without a state, strided inputs), and the
one-token decoding update against the full convolution."""

import pytest
import torch

from helpers import requires_native_kernel
from sparse_ssm.ssm.conv import causal_conv_silu, causal_conv_silu_ref, conv_step

native = requires_native_kernel()


def inputs(b, L, E, K, dtype, with_state, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    x = r(b, L, 2 * E)[..., :E] if strided else r(b, L, E)        # a view into a wider projection output
    return x, r(E, K), r(E), r(b, K - 1, E) if with_state else None


def values_and_grads(fn, x, w, bias, state):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, bias, state)]
    out, final = fn(*leaves)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), [t for t in leaves if t is not None])
    return out.detach(), final.detach(), grads


@native
@pytest.mark.parametrize("K", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("b, L, strided", [(1, 1, False), (2, 5, True), (3, 40, False)])
def test_fused_conv_matches_the_reference(K, with_state, b, L, strided):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        args = inputs(b, L, 16, K, dtype, with_state, strided=strided)
        out, final, grads = values_and_grads(causal_conv_silu, *args)
        out_ref, final_ref, grads_ref = values_and_grads(causal_conv_silu_ref, *args)
        assert torch.allclose(out, out_ref, atol=tol, rtol=tol)
        assert torch.equal(final, final_ref)
        for g, g_ref in zip(grads, grads_ref):
            assert torch.allclose(g, g_ref, atol=tol * 10, rtol=tol * 10)


@native
def test_fused_conv_gradcheck():
    x, w, bias, state = (t.requires_grad_() for t in inputs(2, 7, 8, 3, torch.float64, True))
    assert torch.autograd.gradcheck(lambda *t: causal_conv_silu(*t)[0], (x, w, bias, state))


def test_steps_equal_the_full_convolution():
    x, w, bias, state = inputs(2, 6, 8, 4, torch.float64, True)
    full, final = causal_conv_silu_ref(x, w, bias, state)
    running = state.clone()
    for t in range(6):
        assert torch.allclose(conv_step(x[:, t], w, bias, running), full[:, t])
    assert torch.equal(running, final)
