"""The native int8 weight product (`ssm.quantized.int8_linear`, kernels/int8_gemv.h) against the float
product of the dequantised weight, within the error of its int8 activations; its other builds (a plain
x86-64, AVX-512 without VNNI) against the native one."""

import ctypes
import platform
import shutil
import subprocess

import pytest
import torch

from helpers import requires_native_kernel
from sparse_ssm.model.quantize import quantize_rows
from sparse_ssm.ssm.kernels import HERE, cpu_flags
from sparse_ssm.ssm.quantized import int8_linear

pytestmark = requires_native_kernel()


def operands(rows, O, I, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scales = quantize_rows(torch.randn(O, I, generator=g))
    return torch.randn(rows, I, generator=g, dtype=dtype) * 3, q, scales, torch.randn(O, generator=g, dtype=dtype)


def error_bound(x, q, scales, reference):
    """|x W^T - ours| <= sum_i |W[o, i]| a / 2 with a = max|x| / 127 (each activation off by at most a / 2),
    plus the float rounding of the sum and the scales (relative 1e-5 in float32)."""
    W = q.double() * scales.double()[:, None]
    a = x.double().abs().amax(1, keepdim=True) / 127
    return a / 2 * W.abs().sum(1) + 1e-5 * (x.double().abs() @ W.abs().T + reference.abs()) + 1e-12


def largest_sums(inner: int = 9000):
    """Operands whose every product is the largest the kernel forms (|q| = 127, |xq| = 127, one sign):
    the integer sums as large as they can be, over several int32 chunks (4,096 inner elements)."""
    q, scales = quantize_rows(torch.ones(5, inner))
    return torch.ones(2, inner), q, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("O, I", [(40, 64), (13, 77), (6, 33), (5, 4100)], ids=["64", "77", "33", "4100"])
def test_the_int8_product_is_within_the_activation_rounding(rows, O, I, dtype):
    """Inner sizes not a multiple of 32 (a masked tail), over the int32 chunk (4,096), output sizes not a
    multiple of 4; rows 1, 3 (a tile of 3) and 8 (two of 4); with and without a bias."""
    x, q, scales, bias = operands(rows, O, I, dtype)
    for b in (None, bias):
        y = int8_linear(x, q, scales, b)
        reference = x.double() @ (q.double() * scales.double()[:, None]).T + (0 if b is None else b.double())
        assert y.dtype == dtype and y.shape == (rows, O)
        assert ((y.double() - reference).abs() <= error_bound(x, q, scales, reference)).all()


def test_a_row_does_not_depend_on_the_rows_beside_it_nor_on_the_threads():
    """Each row has its own activation scale and exact integer sums; the LM head's columns split over
    threads give the same numbers."""
    x, q, scales, _ = operands(9, 11000, 768, torch.float32)              # 8.4 M weights: split
    together = int8_linear(x, q, scales)
    assert torch.equal(torch.cat([int8_linear(x[i:i + 1], q, scales) for i in range(9)]), together)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert torch.equal(int8_linear(x, q, scales), together)
    finally:
        torch.set_num_threads(threads)


def test_a_row_with_a_nan_gives_nan_and_the_others_their_products():
    x, q, scales, _ = operands(3, 10, 50, torch.float32)
    x[1, 7] = float("nan")
    y = int8_linear(x, q, scales)
    reference = x.double() @ (q.double() * scales.double()[:, None]).T
    assert y[1].isnan().all() and torch.allclose(y[[0, 2]].double(), reference[[0, 2]], rtol=1e-5, atol=1e-5)


def test_a_row_of_subnormal_values_gets_its_products():
    """127 / max|x| would overflow for such a row: the kernel takes the float path instead."""
    x, q, scales, _ = operands(2, 10, 50, torch.float32)
    x[1] = torch.linspace(-1e-40, 1e-40, 50)
    reference = x.double() @ (q.double() * scales.double()[:, None]).T
    assert torch.allclose(int8_linear(x, q, scales).double(), reference, rtol=1e-5, atol=1e-45)


def test_what_the_kernel_cannot_take_is_refused():
    x, q, scales, _ = operands(2, 8, 32, torch.float32)
    assert int8_linear(x.bfloat16(), q, scales) is None
    assert int8_linear(x, q.float(), scales) is None
    assert int8_linear(x[:, :16], q, scales) is None
    assert int8_linear(x, q[:, ::2], scales) is None                        # a strided weight: refused


X86 = platform.machine() in ("x86_64", "AMD64")
# other builds of the kernel than the native one: a plain x86-64 (no AVX-512: the scalar loop) and, where
# the CPU runs it, AVX-512 without VNNI (the int16-held loop with vpmaddwd for every row count)
BUILDS = {"plain": ["-march=x86-64-v2"] if X86 else [], "avx512-no-vnni": ["-march=skylake-avx512"]}


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the portable path")
@pytest.mark.parametrize("build", list(BUILDS))
def test_the_other_builds_give_the_native_numbers(tmp_path, build):
    """int8_gemv.cpp built for another target: the same integer sums as the native build's loops (one
    row: int16-held activations; several rows, where the CPU has AVX512-VNNI: unsigned bytes) and the
    same epilogue, so the same answers."""
    if build == "avx512-no-vnni" and not (X86 and {"avx512bw", "avx512vl", "avx512dq"} <= set(cpu_flags().split())):
        pytest.skip("this CPU does not run AVX-512 (BW, VL, DQ)")
    library = tmp_path / f"{build}.so"
    subprocess.run(["g++", "-O2", *BUILDS[build], "-shared", "-fPIC", "-pthread", f"-I{HERE}",
                    str(HERE / "int8_gemv.cpp"), "-o", str(library)], check=True, capture_output=True)
    fn = ctypes.CDLL(str(library)).ssm_int8_linear_f32
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    for rows, O, I in [(1, 9, 77), (5, 12, 4100), (8, 7, 130)]:
        x, q, scales, bias = operands(rows, O, I, torch.float32, seed=rows)
        out = torch.empty(rows, O)
        assert fn(x.data_ptr(), q.data_ptr(), scales.data_ptr(), bias.data_ptr(), out.data_ptr(), rows, O, I, 1) == 0
        assert torch.allclose(out, int8_linear(x, q, scales, bias), rtol=1e-6, atol=1e-6)
    x, q, scales = largest_sums()
    out = torch.empty(2, 5)
    assert fn(x.data_ptr(), q.data_ptr(), scales.data_ptr(), None, out.data_ptr(), 2, 5, x.shape[1], 1) == 0
    assert torch.allclose(out, torch.full((2, 5), float(x.shape[1])), rtol=1e-6)


def test_the_largest_sums_do_not_overflow():
    x, q, scales = largest_sums()
    assert torch.allclose(int8_linear(x, q, scales), torch.full((2, 5), float(x.shape[1])), rtol=1e-6)
