"""The chunked scan's tree over the chunk boundaries (on every device): values and gradients against
the sequential scan, long sequences in a number of Python steps that grows with log L (on a CPU
too: the fallback without the native kernels), and the chunk size chosen per device."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sparse_ssm import SparseSSMConfig
from sparse_ssm.ssm.hippo import hippo
from sparse_ssm.ssm.scan import chunk_size_for, selective_scan_chunked, selective_scan_sequential
from sparse_ssm.ssm.structures import (BandedStructure, BlockStructure, DiagonalStructure, HouseholderStructure,
                                       LowRankStructure, PermutationStructure, RotationStructure)

STRUCTURES = [DiagonalStructure(4), DiagonalStructure(4, signed=True), BlockStructure(4, 2), RotationStructure(4),
              BandedStructure(4, 2), LowRankStructure(4, 1), PermutationStructure(4), HouseholderStructure(4, 2)]


def make_inputs(structure, length, batch=2, heads=2, head_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = structure.state_dim
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)
    raw = structure.raw_from_hippo(hippo("legs", N)[0]) + 0.3 * rnd(batch, length, heads, structure.raw_size)
    return dict(u=rnd(batch, length, heads, head_dim), dt=0.5 * torch.rand(batch, length, heads, dtype=torch.float64,
                                                                            generator=g) + 1e-3,
                raw=raw, B=rnd(batch, length, 1, N), C=rnd(batch, length, 1, N), D=rnd(batch, length, heads),
                initial_state=rnd(batch, heads, N, head_dim))


def run(fn, structure, x, **kw):
    method = "zoh" if structure.supports_zoh else "bilinear"
    return fn(x["u"], x["dt"], x["raw"], x["B"], x["C"], x["D"], structure, method, 0.3, x["initial_state"], **kw)


def values_and_grads(fn, structure, inputs, **kw):
    leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
    y, s = run(fn, structure, leaves, **kw)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    ((y * w).sum() + (s ** 2).sum()).backward()
    return y.detach(), s.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_same(a, b, tol=1e-9):
    for x, y in zip(a[:2], b[:2]):
        assert torch.allclose(x, y, rtol=tol, atol=tol)
    for k in a[2]:
        assert torch.allclose(a[2][k], b[2][k], rtol=tol, atol=tol), k


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
@pytest.mark.parametrize("length, chunk", [(4, 4), (13, 4), (37, 4), (16, 2)])
@pytest.mark.parametrize("with_state", [True, False])
def test_the_tree_matches_the_sequential_scan(structure, length, chunk, with_state):
    """1, 4, 10 (not a power of two) and 8 chunks, with and without an initial state, down to
    single chunks (leaf 1) and with the default leaf."""
    inputs = make_inputs(structure, length)
    if not with_state:
        inputs["initial_state"] = None
    ref = values_and_grads(selective_scan_sequential, structure, inputs)
    for leaf in (1, None):
        fast = values_and_grads(selective_scan_chunked, structure, inputs, chunk_size=chunk, leaf=leaf)
        assert_same(fast, ref)


class CountOps(TorchFunctionMode):
    """Counts the torch calls made (a Python step is a handful of them)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def torch_calls(structure, length):
    x = make_inputs(structure, length, batch=1, heads=1, head_dim=2)
    with CountOps() as count:
        run(selective_scan_chunked, structure, x, chunk_size=8)
    return count.calls


@pytest.mark.parametrize("structure", [DiagonalStructure(4), BlockStructure(4, 2)], ids=lambda s: s.name)
def test_long_sequences_take_log_depth_python_steps(structure):
    """On a CPU (the fallback without the native kernels), 4x the length (384 more chunks of 8) adds
    two levels of the tree, not hundreds of steps."""
    short, long = torch_calls(structure, 1024), torch_calls(structure, 4096)
    assert long - short <= 2 * 30, (short, long)
    assert short < 500, short


@pytest.mark.parametrize("structure", [DiagonalStructure(4), BlockStructure(4, 2), HouseholderStructure(4, 1)],
                         ids=lambda s: s.name)
def test_long_sequence_values_and_gradients(structure):
    """1,000+ tokens (126 chunks, 5 levels above leaves of 4 chunks) against the one-step-per-token scan."""
    inputs = make_inputs(structure, 1003, batch=1, heads=1, head_dim=2)
    ref = values_and_grads(selective_scan_sequential, structure, inputs)
    fast = values_and_grads(selective_scan_chunked, structure, inputs, chunk_size=8)
    assert_same(fast, ref, tol=1e-8)


def test_chunk_size_is_chosen_per_device():
    """The model config leaves it unset: 8 on a CPU, larger chunks on an accelerator."""
    assert SparseSSMConfig().scan_chunk_size is None
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_size_for(cpu, DiagonalStructure(16)) == chunk_size_for(cpu, BlockStructure(16, 8)) == 8
    assert chunk_size_for(cuda, DiagonalStructure(16)) == 32 and chunk_size_for(cuda, BlockStructure(16, 8)) == 16
