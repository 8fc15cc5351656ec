"""The native few-rows LM head (`kernels.lm_head_rows`, lm_head.cpp) against F.linear, its
reference: rows 1 to 9 (blocks of four x rows and their remainders), odd vocabulary and hidden
sizes (blocks of four weight rows and the masked tail of a row), float32 / float64 / bf16."""

import pytest
import torch
import torch.nn.functional as F

from helpers import requires_native_kernel
from sparse_ssm.ssm.kernels import lm_head_rows

pytestmark = requires_native_kernel()
# relative to the size of the sum's terms (|x| |w| summed): float32 / bf16 products are accumulated in
# float32 (bf16's logits then rounded once to 8 bits); float64 in float64
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 2 ** -8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9])
@pytest.mark.parametrize("vocab, dim", [(50, 768), (37, 19), (5, 1), (3, 0), (1, 33), (9, 16), (6, 47), (7, 150)])
def test_the_head_kernel_gives_f_linear(dtype, rows, vocab, dim):
    g = torch.Generator().manual_seed(rows * 1000 + vocab * 10 + dim)
    x, weight = torch.randn(rows, dim, generator=g).to(dtype), torch.randn(vocab, dim, generator=g).to(dtype)
    got = lm_head_rows(x, weight)
    assert got is not None and got.dtype == dtype and got.shape == (rows, vocab)
    expected = F.linear(x.double(), weight.double())
    scale = F.linear(x.double().abs(), weight.double().abs()) + torch.finfo(torch.float64).tiny
    assert ((got.double() - expected).abs() <= TOLERANCE[dtype] * scale + 1e-300).all()


def test_the_head_kernel_refuses_what_it_does_not_take():
    x, weight = torch.randn(2, 8), torch.randn(5, 8)
    assert lm_head_rows(x.half(), weight.half()) is None                       # another dtype
    assert lm_head_rows(x, weight.double()) is None                            # mixed dtypes
    assert lm_head_rows(x[:, :4], weight) is None                              # sizes that do not fit
    assert lm_head_rows(x.clone().requires_grad_(), weight) is None            # needs a gradient
    with torch.no_grad():
        assert torch.allclose(lm_head_rows(x.clone().requires_grad_(), weight), x @ weight.T, atol=1e-5)
    assert torch.allclose(lm_head_rows(x[:, ::2], weight[:, ::2]), x[:, ::2] @ weight[:, ::2].T,
                          atol=1e-5)                                           # strided inputs are made contiguous
