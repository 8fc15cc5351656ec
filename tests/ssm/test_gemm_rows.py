"""gemm.linear_rows (oneDNN's float32 GEMM for a prompt's rows) against F.linear, the reference."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_ssm.ssm import gemm
from sparse_ssm.ssm.selective import apply_linear


@pytest.mark.parametrize("shape,out_features,bias", [((64, 48), 40, False), ((2, 33, 48), 96, True),
                                                     ((5, 48), 24, True), ((300, 16), 70, False),
                                                     ((1, 48), 33, True), ((1, 1, 7), 5, False)])
def test_linear_rows_matches_f_linear(shape, out_features, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = torch.randn(out_features, shape[-1])
    b = torch.randn(out_features) if bias else None
    with torch.no_grad():
        got = gemm.linear_rows(x, w, b)
    assert got.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert gemm.takes(x, w, b) == (gemm._ONEDNN is not None)
    assert not gemm.takes(x[..., :0, :], w, b)                   # no rows: F.linear


def test_linear_rows_of_a_strided_view():
    """The projection's outputs are chunked into views: a view with a row stride wider than its width."""
    torch.manual_seed(1)
    xz = torch.randn(3, 40, 64)
    x = xz[..., :32]
    w = torch.randn(20, 32)
    with torch.no_grad():
        torch.testing.assert_close(gemm.linear_rows(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_gradients_and_other_dtypes_take_f_linear():
    torch.manual_seed(2)
    x = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    assert not gemm.takes(x, w)                        # autograd: the reference path
    gemm.linear_rows(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(64, 16))
    assert not gemm.takes(x.detach().double(), w.detach().double())
    with torch.no_grad():
        got = gemm.linear_rows(x.double(), w.double())
    torch.testing.assert_close(got, F.linear(x.double(), w.double()))


def test_apply_linear_uses_it_with_the_module_result():
    torch.manual_seed(3)
    linear = nn.Linear(24, 12, bias=True)
    x = torch.randn(2, 50, 24)
    with torch.no_grad():
        torch.testing.assert_close(apply_linear(linear, x), linear(x), rtol=1e-5, atol=1e-5)
        assert apply_linear(linear, x.double()).dtype == torch.float32      # cast to the weight's dtype


def test_autocast_and_hooks_keep_the_module_call():
    """Under autocast F.linear runs in bf16 (oneDNN's operator would not); a hooked module is called."""
    torch.manual_seed(4)
    linear = nn.Linear(16, 8, bias=False)
    x = torch.randn(64, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.takes(x, linear.weight)
        assert apply_linear(linear, x).dtype == torch.bfloat16
    seen = []
    linear.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        apply_linear(linear, x)
    assert seen == [(64, 8)]
