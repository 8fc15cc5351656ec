"""The banded selective scan on the Triton kernels (`banded_kernels.py`), with autograd.

    banded_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z) -> (y, final_state)

the shared scan signature (shapes in `sparse_ssm.ssm.scan`) for `BandedStructure` with blocks of 2,
4 or 8 states (zoh / bilinear / gbt).  Every token's two block-diagonal operators (the Lie-Trotter
factors D(A0), D(A1)) and B_bar come from `structure.discretize` in PyTorch, in float32 (float64 for
float64 inputs) and outside autocast; their gradients flow back through it by autograd.  That costs
4 ((2 N + bs) bs + N) bytes per token and head of operators, kept for the backward; the kernels'
state is float32 (float64) whatever the inputs' dtype, y has u's dtype and every gradient its
input's dtype.
"""

from __future__ import annotations

import torch
import triton

from .banded_kernels import banded_backward, banded_forward
from .autograd import forward_outputs, run_kernels
from .block import state_and_compute_dtypes, work_operators

CHUNK = 32                 # tokens between the forward's state checkpoints (the backward recomputes a chunk)
STEP_ELEMENTS = 4096       # the per-token block product of a program (BLOCK_NB1 BS BS BLOCK_P), in elements


def _constants(u, structure, z):
    """The kernels' compile-time arguments."""
    NB0, NB1, BS = structure.n0, structure.n1, structure.block_size
    block_nb1 = triton.next_power_of_2(NB1)
    block_p = min(triton.next_power_of_2(u.shape[3]), max(4, STEP_ELEMENTS // (block_nb1 * BS * BS)))
    return dict(HAS_Z=z is not None, CHUNK=CHUNK, BS=BS, FRONT=structure.front,
                BLOCK_NB0=triton.next_power_of_2(NB0), BLOCK_NB1=block_nb1, BLOCK_P=block_p,
                COMPUTE=state_and_compute_dtypes(u.dtype)[1])


def _shuffle(u, consts, programs):
    """Every program's zeroed buffer for moving the state between the two partitions."""
    return torch.zeros(programs * consts["BLOCK_NB1"] * consts["BS"] * consts["BLOCK_P"],
                       dtype=state_and_compute_dtypes(u.dtype)[0], device=u.device)


def _launch_forward(u, A0_bar, A1_bar, B_bar, C, D, h0, z, structure, save):
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    consts = _constants(u, structure, z)
    y, hT, n_chunks, ckpt = forward_outputs(u, N, CHUNK, save)
    grid = (b * H, triton.cdiv(P, consts["BLOCK_P"]))
    banded_forward[grid](A0_bar, A1_bar, B_bar, C, u, D, u if z is None else z, hT if h0 is None else h0, y, hT,
                         ckpt, _shuffle(u, consts, grid[0] * grid[1]), L, H, G, structure.n0, structure.n1, P,
                         n_chunks, HAS_H0=h0 is not None, SAVE=save, **consts)
    return y, hT, ckpt


def _launch_backward(u, A0_bar, A1_bar, B_bar, C, D, z, ckpt, dout, dhT, structure):
    """The gradients of u, A0_bar, A1_bar, B_bar, C (per group), D, the initial state (state dtype)
    and z (or None)."""
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    state_dtype = state_and_compute_dtypes(u.dtype)[0]
    consts = _constants(u, structure, z)
    tiles = triton.cdiv(P, consts["BLOCK_P"])
    du = torch.empty_like(u)
    dz = torch.empty_like(z) if z is not None else None
    dh0 = u.new_empty(b, H, N, P, dtype=state_dtype)
    n_chunks = triton.cdiv(L, CHUNK)
    padded = lambda *shape: torch.zeros(b, n_chunks * CHUNK, H, *shape, dtype=state_dtype, device=u.device)
    dA0, dA1, dB_bar, dC, dD = padded(*A0_bar.shape[3:]), padded(*A1_bar.shape[3:]), padded(N), padded(N), padded()
    scratch = torch.empty(b * H * tiles * (CHUNK + 1) * consts["BLOCK_NB0"] * consts["BS"] * consts["BLOCK_P"],
                          dtype=state_dtype, device=u.device)
    banded_backward[(b * H, tiles)](A0_bar, A1_bar, B_bar, C, u, D, u if z is None else z, ckpt, dout, dhT, scratch,
                                    _shuffle(u, consts, b * H * tiles), du, du if dz is None else dz, dh0, dA0, dA1,
                                    dB_bar, dC, dD, L, H, G, structure.n0, structure.n1, P, n_chunks, **consts)
    dC = dC[:, :L].reshape(b, L, G, H // G, N).sum(3).to(C.dtype)
    return du, dA0[:, :L], dA1[:, :L], dB_bar[:, :L], dC, dD[:, :L].to(D.dtype), dh0, dz


def banded_scan(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """The scan of a banded A (see the module docstring); autograd through the Triton backward (and
    PyTorch's, for the discretisation) whenever an input requires a gradient."""
    (A0_bar, A1_bar), B_bar = work_operators(structure, u, dt, A_raw, B, method, alpha)
    return run_kernels((_launch_forward, _launch_backward), (u, A0_bar, A1_bar, B_bar, C, D), initial_state, z,
                       structure)
