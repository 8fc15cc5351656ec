"""The diagonal-plus-low-rank selective scan on the Triton kernels (`low_rank_kernels.py`), with autograd.

    low_rank_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z) -> (y, final_state)

the shared scan signature (shapes in `sparse_ssm.ssm.scan`) for `LowRankStructure` (A = diag(lam) +
U V^T, bilinear / gbt: the structure has no zoh).  Every token's operator comes from
`structure.discretize` in PyTorch (its Woodbury form, O(N r) per token) as two diagonal-plus-low-rank
sweeps (`LowRankStructure.sweeps`), in float32 (float64 for float64 inputs) and outside autocast;
their gradients flow back through it by autograd.  The kernels never form the N x N A_bar: per
token and channel they apply the two sweeps to the state, O((2 + 4 r) N).  That costs
4 (3 + 4 r) N bytes per token and head of operators, kept for the backward; the kernels' state is
float32 (float64) whatever the inputs' dtype, y has u's dtype and every gradient its input's dtype.
"""

from __future__ import annotations

import torch
import triton

from .autograd import forward_outputs, run_kernels
from .block import state_and_compute_dtypes, work_operators
from .low_rank_kernels import low_rank_backward, low_rank_forward

CHUNK = 32                 # tokens between the forward's state checkpoints (the backward recomputes a chunk)
STATE_ELEMENTS = 2048      # a program's state tile (BLOCK_N BLOCK_P), in elements
MIN_TILE = 16              # the fewest channels of a tile


def _blocks(N: int, P: int):
    """(BLOCK_N, BLOCK_P): all states in one tile, channels tiled so the state stays STATE_ELEMENTS."""
    block_n = triton.next_power_of_2(N)
    return block_n, min(triton.next_power_of_2(P), max(MIN_TILE, STATE_ELEMENTS // block_n))


def _constants(u, Pm, z):
    """The kernels' compile-time arguments for these operators."""
    sweeps, N, rank = Pm.shape[3], Pm.shape[4], Pm.shape[5]
    block_n, block_p = _blocks(N, u.shape[3])
    return dict(HAS_Z=z is not None, CHUNK=CHUNK, SWEEPS=sweeps, RANK=rank, BLOCK_R=triton.next_power_of_2(rank),
                BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=state_and_compute_dtypes(u.dtype)[1])


def _launch_forward(u, s, Pm, Qm, B_bar, C, D, h0, z, save):
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    consts = _constants(u, Pm, z)
    y, hT, n_chunks, ckpt = forward_outputs(u, N, CHUNK, save)
    grid = (b * H, triton.cdiv(P, consts["BLOCK_P"]))
    low_rank_forward[grid](s, Pm, Qm, B_bar, C, u, D, u if z is None else z, hT if h0 is None else h0, y, hT, ckpt,
                           L, H, G, N, P, n_chunks, HAS_H0=h0 is not None, SAVE=save, **consts)
    return y, hT, ckpt


def _launch_backward(u, s, Pm, Qm, B_bar, C, D, z, ckpt, dout, dhT):
    """The gradients of u, s, P, Q, B_bar, C (per group), D, the initial state (state dtype) and z (or None)."""
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    state_dtype = state_and_compute_dtypes(u.dtype)[0]
    consts = _constants(u, Pm, z)
    tiles = triton.cdiv(P, consts["BLOCK_P"])
    du = torch.empty_like(u)
    dz = torch.empty_like(z) if z is not None else None
    dh0 = u.new_empty(b, H, N, P, dtype=state_dtype)
    n_chunks = triton.cdiv(L, CHUNK)
    padded = lambda *shape: torch.zeros(b, n_chunks * CHUNK, H, *shape, dtype=state_dtype, device=u.device)
    ds, dP, dQ = padded(*s.shape[3:]), padded(*Pm.shape[3:]), padded(*Qm.shape[3:])
    dB_bar, dC, dD = padded(N), padded(N), padded()
    scratch = torch.empty(b * H * tiles * (CHUNK + 1) * consts["BLOCK_N"] * consts["BLOCK_P"], dtype=state_dtype,
                          device=u.device)
    low_rank_backward[(b * H, tiles)](s, Pm, Qm, B_bar, C, u, D, u if z is None else z, ckpt, dout, dhT, scratch,
                                      du, du if dz is None else dz, dh0, ds, dP, dQ, dB_bar, dC, dD,
                                      L, H, G, N, P, n_chunks, **consts)
    dC = dC[:, :L].reshape(b, L, G, H // G, N).sum(3).to(C.dtype)
    return du, ds[:, :L], dP[:, :L], dQ[:, :L], dB_bar[:, :L], dC, dD[:, :L].to(D.dtype), dh0, dz


def low_rank_scan(u, dt, A_raw, B, C, D, structure, method="bilinear", alpha=0.5, initial_state=None, z=None):
    """The scan of a diagonal-plus-low-rank A (see the module docstring); autograd through the Triton
    backward (and PyTorch's, for the discretisation) whenever an input requires a gradient."""
    op, B_bar = work_operators(structure, u, dt, A_raw, B, method, alpha)
    return run_kernels((_launch_forward, _launch_backward), (u, *structure.sweeps(op), B_bar, C, D), initial_state, z)
