"""The fused loss's PyTorch path (what CUDA runs; forced here on the CPU with native=False): the
plain cross-entropy's values and gradients, without reading a value back to the host."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sparse_ssm.model.loss import linear_cross_entropy

HOST_READS = {torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__,
              torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(41, 16, dtype=dtype, generator=g).requires_grad_()
    W = torch.randn(37, 16, dtype=dtype, generator=g).requires_grad_()
    targets = torch.randint(0, 37, (41,), generator=g)
    targets[[0, 5, 40]] = -100
    return h, W, targets


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_pytorch_path_equals_plain_cross_entropy(dtype, tol):
    h, W, targets = inputs(dtype)
    fused = linear_cross_entropy(h, W, targets, chunk_rows=8, native=False)
    plain = F.cross_entropy(h @ W.T, targets, ignore_index=-100)
    assert torch.allclose(fused, plain, atol=tol, rtol=tol)
    for a, b in zip(torch.autograd.grad(3 * fused, (h, W)), torch.autograd.grad(3 * plain, (h, W))):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_pytorch_path_reads_nothing_back_to_the_host():
    """On CUDA a read-back (the token count as a Python int) would wait for the whole step."""
    h, W, targets = inputs(torch.float32)
    with HostReads() as mode:
        loss = linear_cross_entropy(h, W, targets, chunk_rows=8, native=False)
        loss.backward()
    assert mode.reads == []
