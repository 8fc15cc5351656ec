"""The Triton kernels of the selective scan, run by Triton's interpreter on CPU tensors, against the
sequential scan: values, gradients (fp64), odd lengths across the kernels' chunks, initial and final
state, the gate, shared B/C groups, channel tiles, every discretisation, low-precision inputs (one
ulp), the dispatcher's choice of path on a CUDA device, and (slow) the real compiler's cubins for an
H100, built without one."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu extra: pip install -e '.[gpu]')")

from helpers import ROOT  # noqa: E402
from triton_cases import (  # noqa: E402
    announcement, assert_both_paths_train_alike, assert_gradcheck, assert_matches_the_sequential_scan,
    assert_within_one_ulp, fresh_dispatcher)
from sparse_ssm.ssm import triton as triton_scan  # noqa: E402
from sparse_ssm.ssm.structures import BlockStructure, DiagonalStructure  # noqa: E402
from sparse_ssm.ssm.triton import diagonal  # noqa: E402


@pytest.fixture(autouse=True)
def _short_chunks(monkeypatch):
    """Checkpoints every 8 tokens: the lengths below cross chunk boundaries at interpreter speed."""
    monkeypatch.setattr(diagonal, "CHUNK", 8)


def inputs(b, L, H, P, N, G, dtype=torch.float64, state=True, gate=True, seed=0):
    """The scan's inputs (triton_cases.NAMES), float64 values cast to `dtype`; dt spans both sides of
    the series threshold of expm1(x) / x.  Not triton_cases.inputs: dt is drawn first here."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(r(b, L, H) - 1.5)
    xs = [r(b, L, H, P), dt, 0.5 * r(b, L, H, N), r(b, L, G, N), r(b, L, G, N), r(b, L, H),
          r(b, H, N, P) if state else None, r(b, L, H, P) if gate else None]
    return [None if x is None else x.to(dtype) for x in xs]


# (b, L, H, P, N, G, method, alpha, signed, state, gate): odd lengths around the 8-token chunks, a
# single token, non-power-of-two N, P over one 16-channel tile, heads sharing B/C and per-head B/C
CASES = [
    (2, 13, 2, 3, 5, 1, "zoh", 0.5, False, True, True),
    (1, 8, 2, 4, 4, 2, "zoh", 0.5, True, False, False),
    (1, 17, 2, 2, 3, 1, "bilinear", 0.5, True, True, True),
    (1, 5, 1, 20, 3, 1, "gbt", 0.25, False, True, False),
    (1, 1, 2, 3, 2, 2, "gbt", 1.0, True, False, True),
]


@pytest.mark.parametrize("b, L, H, P, N, G, method, alpha, signed, state, gate", CASES)
def test_forward_and_gradients_match_the_sequential_scan(b, L, H, P, N, G, method, alpha, signed, state, gate):
    xs = inputs(b, L, H, P, N, G, state=state, gate=gate)
    structure = DiagonalStructure(N, signed=signed)
    assert_matches_the_sequential_scan(xs, structure, method, alpha)


def test_float64_gradcheck():
    structure = DiagonalStructure(2, signed=True)
    assert_gradcheck(inputs(1, 5, 1, 2, 2, 1, state=True, gate=True, seed=3), structure, "zoh", 0.5)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_low_precision_inputs_keep_a_float32_state_within_one_ulp(dtype, ulp):
    """The kernels read bf16/fp16 and compute in fp32: y and every gradient are the fp32 scan's on
    the same values, rounded once (one ulp of the dtype); the state is float32."""
    xs = inputs(1, 11, 2, 3, 4, 1, dtype=dtype)
    structure = DiagonalStructure(4)
    assert_within_one_ulp(xs, structure, "zoh", dtype, ulp)


def test_other_structures_are_left_to_the_pytorch_path():
    xs = inputs(1, 3, 1, 2, 4, 1)
    with pytest.raises(NotImplementedError, match="block16.*PyTorch path"):
        triton_scan.selective_scan_triton(*xs[:6], BlockStructure(32, 16), "zoh", 0.5)


def test_the_dispatcher_takes_triton_on_cuda_for_diagonal_a_and_says_so_once(monkeypatch, capsys):
    fresh_dispatcher(monkeypatch)
    cuda, diag = torch.device("cuda"), DiagonalStructure(4)
    assert triton_scan.use_triton(cuda, diag) and triton_scan.use_triton(cuda, diag)
    announced = capsys.readouterr().err.splitlines()
    assert announced == [announcement("diagonal")]
    assert not triton_scan.use_triton(torch.device("cpu"), diag)        # CPUs keep the fused / PyTorch paths
    assert not triton_scan.use_triton(cuda, BlockStructure(32, 16))
    assert "chunked path for the 'block16' structure" in capsys.readouterr().err
    monkeypatch.setenv("SPARSE_SSM_TRITON", "0")
    assert not triton_scan.use_triton(cuda, diag)
    assert "(SPARSE_SSM_TRITON=0)" in capsys.readouterr().err
    monkeypatch.delenv("SPARSE_SSM_TRITON")
    monkeypatch.setattr(triton_scan, "importable", lambda: False)      # a CUDA machine without the package
    assert not triton_scan.use_triton(cuda, diag)
    assert "triton is not installed: pip install 'sparse-ssm[gpu]'" in capsys.readouterr().err


def test_a_model_trains_through_the_triton_path_as_through_the_pytorch_path(monkeypatch):
    """The layer's real call (z a view of the projection, a learned initial state expanded over the
    batch, signed eigenvalues, two heads sharing B/C): same loss and parameter gradients whichever
    path the dispatcher picks (here told to pick Triton for CPU tensors, the interpreter's)."""
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    config = SparseSSMConfig(vocab_size=40, hidden_dim=16, state_dim=4, ffn_dim=0, num_layers=1, num_heads=2,
                             sparsity_level=0.9, eigenvalue_range="signed", learned_initial_state=True, dropout=0.0)
    model = SparseSSMForCausalLM(config).double()
    ids = torch.randint(0, 40, (2, 11))
    assert_both_paths_train_alike(monkeypatch, model, ids)


COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparse_ssm.ssm.triton.diagonal_kernels import diagonal_backward, diagonal_forward

INTS = {"L", "H", "G", "N", "P", "n_chunks", "rows"}
STEP = ((diagonal_forward, dict(HAS_H0=True, SAVE=False, CHUNK=1)), dict(HAS_H0=True, SAVE=False, CHUNK=1))   # decoding
for dtype, block_n, block_p in (("fp32", 16, 64), ("bf16", 128, 16)):
    for fn, flags in ((diagonal_forward, dict(HAS_H0=True, SAVE=True)), (diagonal_backward, {}), STEP[0]):
        consts = {**dict(HAS_Z=True, GBT=False, SIGNED=True, CHUNK=32, BLOCK_N=block_n, BLOCK_P=block_p,
                         COMPUTE=tl.float32, SMALL=0.1), **flags}
        inputs = {"u_ptr", "dt_ptr", "a_ptr", "B_ptr", "C_ptr", "D_ptr", "z_ptr", "y_ptr", "dout_ptr", "du_ptr",
                  "dz_ptr"}
        types = {n: "constexpr" if n in consts else "fp32" if n == "alpha" else "i32" if n in INTS
                 else "*" + (dtype if n in inputs else "fp32") for n in fn.arg_names}
        src = ASTSource(fn, types, {(fn.arg_names.index(n),): v for n, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__

from sparse_ssm.ssm.triton.block_kernels import block_backward, block_forward

INTS = {"L", "H", "G", "NB", "P", "n_chunks"}
for dtype, bs, block_nb, block_p in (("fp32", 8, 16, 4), ("bf16", 2, 8, 64)):
    for fn, flags in ((block_forward, dict(HAS_H0=True, SAVE=True)), (block_backward, {}), (block_forward, STEP[1])):
        consts = {**dict(HAS_Z=True, CHUNK=32, BS=bs, BLOCK_NB=block_nb, BLOCK_P=block_p, COMPUTE=tl.float32), **flags}
        inputs = {"u_ptr", "C_ptr", "D_ptr", "z_ptr", "y_ptr", "dout_ptr", "du_ptr", "dz_ptr"}
        types = {n: "constexpr" if n in consts else "i32" if n in INTS
                 else "*" + (dtype if n in inputs else "fp32") for n in fn.arg_names}
        src = ASTSource(fn, types, {(fn.arg_names.index(n),): v for n, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__

from sparse_ssm.ssm.triton.householder_kernels import householder_backward, householder_forward

INTS = {"L", "H", "G", "N", "P", "n_chunks"}
for dtype, reflections, block_n, block_p in (("fp32", 2, 128, 16), ("bf16", 4, 16, 64), ("fp16", 1, 64, 32)):
    for fn, flags in ((householder_forward, dict(HAS_H0=True, SAVE=True)), (householder_backward, {}),
                      (householder_forward, STEP[1])):
        consts = {**dict(HAS_Z=True, CHUNK=32, R=reflections, BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=tl.float32),
                  **flags}
        inputs = {"u_ptr", "C_ptr", "D_ptr", "z_ptr", "y_ptr", "dout_ptr", "du_ptr", "dz_ptr"}
        types = {n: "constexpr" if n in consts else "i32" if n in INTS
                 else "*" + (dtype if n in inputs else "fp32") for n in fn.arg_names}
        src = ASTSource(fn, types, {(fn.arg_names.index(n),): v for n, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__

from sparse_ssm.ssm.triton.low_rank_kernels import low_rank_backward, low_rank_forward

for dtype, rank, block_n, block_p in (("fp32", 2, 128, 16), ("bf16", 3, 16, 64)):
    for fn, flags in ((low_rank_forward, dict(HAS_H0=True, SAVE=True)), (low_rank_backward, {})):
        consts = dict(HAS_Z=True, CHUNK=32, SWEEPS=2, RANK=rank, BLOCK_R=triton.next_power_of_2(rank),
                      BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=tl.float32, **flags)
        inputs = {"u_ptr", "C_ptr", "D_ptr", "z_ptr", "y_ptr", "dout_ptr", "du_ptr", "dz_ptr"}
        types = {n: "constexpr" if n in consts else "i32" if n in INTS
                 else "*" + (dtype if n in inputs else "fp32") for n in fn.arg_names}
        src = ASTSource(fn, types, {(fn.arg_names.index(n),): v for n, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__

from sparse_ssm.ssm.triton.banded_kernels import banded_backward, banded_forward

INTS = {"L", "H", "G", "NB0", "NB1", "P", "n_chunks"}
for dtype, bs, block_nb0, block_nb1, block_p in (("fp32", 8, 16, 32, 4), ("bf16", 2, 64, 128, 16)):
    for fn, flags in ((banded_forward, dict(HAS_H0=True, SAVE=True)), (banded_backward, {})):
        consts = dict(HAS_Z=True, CHUNK=32, BS=bs, FRONT=bs - bs // 2, BLOCK_NB0=block_nb0, BLOCK_NB1=block_nb1,
                      BLOCK_P=block_p, COMPUTE=tl.float32, **flags)
        inputs = {"u_ptr", "C_ptr", "D_ptr", "z_ptr", "y_ptr", "dout_ptr", "du_ptr", "dz_ptr"}
        types = {n: "constexpr" if n in consts else "i32" if n in INTS
                 else "*" + (dtype if n in inputs else "fp32") for n in fn.arg_names}
        src = ASTSource(fn, types, {(fn.arg_names.index(n),): v for n, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__

from sparse_ssm.ssm.triton.permutation_kernels import permutation_backward, permutation_forward

INTS = {"L", "H", "G", "N", "P", "n_chunks"}
for dtype, block_n, block_p in (("fp32", 16, 16), ("bf16", 64, 4)):
    for fn, flags in ((permutation_forward, dict(HAS_H0=True, SAVE=True)), (permutation_backward, {})):
        consts = dict(HAS_Z=True, CHUNK=32, BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=tl.float32, **flags)
        inputs = {"u_ptr", "C_ptr", "D_ptr", "z_ptr", "y_ptr", "dout_ptr", "du_ptr", "dz_ptr"}
        types = {n: "constexpr" if n in consts else "i32" if n in INTS
                 else "*i32" if n == "f_ptr" else "*" + (dtype if n in inputs else "fp32") for n in fn.arg_names}
        src = ASTSource(fn, types, {(fn.arg_names.index(n),): v for n, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert kernel.asm["cubin"], fn.__name__
print("compiled")
"""


@pytest.mark.slow
def test_the_kernels_compile_for_an_h100_without_one(tmp_path):
    """The real backend (TTIR -> PTX -> cubin for sm_90), which the interpreter never runs: forward and
    backward (and the forward of one token, the decoding step's, for the diagonal, block and householder
    kernels), fp32 and bf16 inputs, the diagonal kernels at the shapes of N = 16 and 128, the block
    kernels at those of block 8 and block 2 at N = 128, the householder kernels with 2 reflections at
    N = 128, 4 at N = 16 and 1 at N = 64 (fp16), the low-rank kernels of rank 2 at N = 128 and rank 3
    at N = 16, the banded kernels of blocks of 8 and 2 at N = 128, the permutation kernels at N = 16
    and 64."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
