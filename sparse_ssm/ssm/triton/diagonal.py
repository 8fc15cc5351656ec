"""The diagonal selective scan on the Triton kernels (`diagonal_kernels.py`), with autograd.

    diagonal_scan(u, dt, a, B, C, D, initial_state, z, method, alpha, signed) -> (y, final_state)

u, z (b, L, H, P); dt, D (b, L, H); a = structure.continuous(A_raw) (b, L, H, N); B, C (b, L, G, N);
initial_state (b, H, N, P) or None.  The state is float32 (float64 for float64 inputs) whatever the
inputs' dtype; y has u's dtype and every gradient its input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..discretization import alpha_for
from .autograd import forward_outputs, run_kernels
from .diagonal_kernels import diagonal_backward, diagonal_forward

CHUNK = 32                 # tokens between the forward's state checkpoints (the backward recomputes a chunk)


def state_and_compute_dtypes(dtype: torch.dtype):
    """(torch dtype of the state, the kernels' compute dtype, the series threshold of expm1(x) / x)."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, 1e-3
    return torch.float32, tl.float32, 0.1


def _blocks(N: int, P: int):
    """(BLOCK_N, BLOCK_P): all states in one tile, channels tiled so the state stays ~2k elements."""
    block_n = triton.next_power_of_2(N)
    return block_n, min(triton.next_power_of_2(P), max(16, 2048 // block_n))


def _launch_forward(u, dt, a, B, C, D, h0, z, gbt, signed, alpha, save, chunk=None, out_state=None):
    """y, the final state (written into `out_state` when given: h0 itself for a step in place) and the
    checkpoints every `chunk` tokens (None: CHUNK) when `save`."""
    chunk = CHUNK if chunk is None else chunk
    b, L, H, P = u.shape
    G, N = B.shape[2], B.shape[3]
    _, compute, small = state_and_compute_dtypes(u.dtype)
    block_n, block_p = _blocks(N, P)
    y, hT, n_chunks, ckpt = forward_outputs(u, N, chunk, save, out_state)
    grid = (b * H, triton.cdiv(P, block_p))
    diagonal_forward[grid](u, dt, a, B, C, D, u if z is None else z, hT if h0 is None else h0, y, hT, ckpt,
                           L, H, G, N, P, n_chunks, alpha, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE=save,
                           GBT=gbt, SIGNED=signed, CHUNK=chunk, BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=compute,
                           SMALL=small)
    return y, hT, ckpt


def _launch_backward(u, dt, a, B, C, D, z, ckpt, dout, dhT, gbt, signed, alpha):
    """The gradients of u, dt, a, B, C (per group), D, the initial state (state dtype) and z (or None)."""
    b, L, H, P = u.shape
    G, N = B.shape[2], B.shape[3]
    state_dtype, compute, small = state_and_compute_dtypes(u.dtype)
    block_n, block_p = _blocks(N, P)
    tiles = triton.cdiv(P, block_p)
    du = torch.empty_like(u)
    dz = torch.empty_like(z) if z is not None else None
    dh0 = u.new_empty(b, H, N, P, dtype=state_dtype)
    per_tile = dict(dtype=state_dtype, device=u.device)
    n_chunks = triton.cdiv(L, CHUNK)
    padded = n_chunks * CHUNK
    ddt, dD = (torch.empty(tiles, b, padded, H, **per_tile) for _ in range(2))
    da, dB, dC = (torch.empty(tiles, b, padded, H, N, **per_tile) for _ in range(3))
    scratch = torch.empty(b * H * tiles * (CHUNK + 1) * block_n * block_p, **per_tile)
    diagonal_backward[(b * H, tiles)](u, dt, a, B, C, D, u if z is None else z, ckpt, dout, dhT, scratch,
                                      du, du if dz is None else dz, dh0, ddt, da, dB, dC, dD,
                                      L, H, G, N, P, n_chunks, alpha, b, HAS_Z=z is not None, GBT=gbt,
                                      SIGNED=signed, CHUNK=CHUNK, BLOCK_N=block_n, BLOCK_P=block_p,
                                      COMPUTE=compute, SMALL=small)
    ddt, dD, da, dB, dC = (x[:, :, :L].sum(0) for x in (ddt, dD, da, dB, dC))
    per_group = lambda x, like: x.reshape(b, L, G, H // G, N).sum(3).to(like.dtype)
    return du, ddt.to(dt.dtype), da.to(a.dtype), per_group(dB, B), per_group(dC, C), dD.to(D.dtype), dh0, dz


def diagonal_scan(u, dt, a, B, C, D, initial_state=None, z=None, method="zoh", alpha=0.5, signed=False):
    """The scan of a diagonal A (see the module docstring); autograd through the Triton backward
    whenever an input requires a gradient."""
    gbt = method != "zoh"
    al = alpha_for(method, alpha) if gbt else 0.0
    return run_kernels((_launch_forward, _launch_backward), (u, dt, a, B, C, D), initial_state, z, gbt, signed, al)


def diagonal_state_update(u, dt, a, B, C, D, state, z=None, method="zoh", alpha=0.5, signed=False):
    """One token in place (decoding, no autograd): u, z (b, H, P) or None; dt, D (b, H); a (b, H, N);
    B, C (b, G, N); `state` (b, H, N, P), contiguous, in the state dtype, advanced in place by one
    launch of the forward kernel specialised to one token (CHUNK 1).  Returns y (b, H, P)."""
    gbt = method != "zoh"
    al = alpha_for(method, alpha) if gbt else 0.0
    token = lambda x: None if x is None else x.contiguous().unsqueeze(1)
    y, _, _ = _launch_forward(*map(token, (u, dt, a, B, C, D)), state, token(z), gbt, signed, al, save=False,
                              chunk=1, out_state=state)
    return y[:, 0]
