"""The Householder-product selective scan on the Triton kernels (`householder_kernels.py`), with autograd.

    householder_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z) -> (y, final_state)

the shared scan signature (shapes in `sparse_ssm.ssm.scan`) for `HouseholderStructure` with any
number R of reflections per token.  Every token's factors come from `structure.factors` in PyTorch
(the decay d and B_bar of the diagonal's discretisation, zoh / bilinear / gbt; the unit keys and the
strengths beta), in float32 (float64 for float64 inputs) and outside autocast; their gradients flow
back through it by autograd.  The kernels never form the N x N A_bar: per token and channel they
apply diag(d) and then the R rank-1 reflections to the state, O((1 + 2 R) N).  That costs
4 ((R + 2) N + R) bytes per token and head of factors, kept for the backward; the kernels' state is
float32 (float64) whatever the inputs' dtype, y has u's dtype and every gradient its input's dtype.
"""

from __future__ import annotations

import torch
import triton

from .autograd import forward_outputs, run_kernels
from .block import state_and_compute_dtypes, work_operators
from .householder_kernels import householder_backward, householder_forward

CHUNK = 32                 # tokens between the forward's state checkpoints (the backward recomputes a chunk)
STATE_ELEMENTS = 2048      # a program's state tile (BLOCK_N BLOCK_P), in elements
MIN_TILE = 16              # the fewest channels of a tile


def _blocks(N: int, P: int):
    """(BLOCK_N, BLOCK_P): all states in one tile, channels tiled so the state stays STATE_ELEMENTS."""
    block_n = triton.next_power_of_2(N)
    return block_n, min(triton.next_power_of_2(P), max(MIN_TILE, STATE_ELEMENTS // block_n))


def _launch_forward(u, d, keys, beta, B_bar, C, D, h0, z, save, chunk=None, out_state=None):
    """y, the final state (written into `out_state` when given: h0 itself for a step in place) and the
    checkpoints every `chunk` tokens (None: CHUNK) when `save`."""
    chunk = CHUNK if chunk is None else chunk
    b, L, H, P = u.shape
    G, N, R = C.shape[2], C.shape[3], keys.shape[3]
    compute = state_and_compute_dtypes(u.dtype)[1]
    block_n, block_p = _blocks(N, P)
    y, hT, n_chunks, ckpt = forward_outputs(u, N, chunk, save, out_state)
    grid = (b * H, triton.cdiv(P, block_p))
    householder_forward[grid](d, keys, beta, B_bar, C, u, D, u if z is None else z, hT if h0 is None else h0, y, hT,
                              ckpt, L, H, G, N, P, n_chunks, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE=save,
                              CHUNK=chunk, R=R, BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=compute)
    return y, hT, ckpt


def _launch_backward(u, d, keys, beta, B_bar, C, D, z, ckpt, dout, dhT):
    """The gradients of u, d, keys, beta, B_bar, C (per group), D, the initial state (state dtype) and
    z (or None)."""
    b, L, H, P = u.shape
    G, N, R = C.shape[2], C.shape[3], keys.shape[3]
    state_dtype, compute = state_and_compute_dtypes(u.dtype)
    block_n, block_p = _blocks(N, P)
    tiles = triton.cdiv(P, block_p)
    du = torch.empty_like(u)
    dz = torch.empty_like(z) if z is not None else None
    dh0 = u.new_empty(b, H, N, P, dtype=state_dtype)
    n_chunks = triton.cdiv(L, CHUNK)
    padded = dict(dtype=state_dtype, device=u.device)
    Lp = n_chunks * CHUNK
    dd, dB_bar, dC = (torch.zeros(b, Lp, H, N, **padded) for _ in range(3))
    dkeys, dbeta, dD = torch.zeros(b, Lp, H, R, N, **padded), torch.zeros(b, Lp, H, R, **padded), \
        torch.zeros(b, Lp, H, **padded)
    scratch = torch.empty(b * H * tiles * (CHUNK + 1) * block_n * block_p, **padded)
    householder_backward[(b * H, tiles)](d, keys, beta, B_bar, C, u, D, u if z is None else z, ckpt, dout, dhT,
                                         scratch, du, du if dz is None else dz, dh0, dd, dkeys, dbeta, dB_bar, dC, dD,
                                         L, H, G, N, P, n_chunks, HAS_Z=z is not None, CHUNK=CHUNK, R=R,
                                         BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=compute)
    dC = dC[:, :L].reshape(b, L, G, H // G, N).sum(3).to(C.dtype)
    return du, dd[:, :L], dkeys[:, :L], dbeta[:, :L], dB_bar[:, :L], dC, dD[:, :L].to(D.dtype), dh0, dz


def householder_scan(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """The scan of a Householder product (see the module docstring); autograd through the Triton
    backward (and PyTorch's, for the factors) whenever an input requires a gradient."""
    factors = work_operators(structure, u, dt, A_raw, B, method, alpha, how="factors")
    return run_kernels((_launch_forward, _launch_backward), (u, *factors, C, D), initial_state, z)


def householder_state_update(u, dt, A_raw, B, C, D, structure, method, alpha, state, z=None):
    """One token in place (decoding, no autograd): u, z (b, H, P) or None; dt, D (b, H); A_raw
    (b, H, raw_size); B, C (b, G, N); `state` (b, H, N, P), contiguous, in the state dtype.  The
    token's factors come from PyTorch (as for the scan), then one launch of the forward kernel
    specialised to one token (CHUNK 1) advances the state in place.  Returns y (b, H, P)."""
    token = lambda x: None if x is None else x.contiguous().unsqueeze(1)
    factors = work_operators(structure, token(u), token(dt), token(A_raw), token(B), method, alpha, how="factors")
    y, _, _ = _launch_forward(token(u), *(f.contiguous() for f in factors), token(C), token(D), state, token(z),
                              save=False, chunk=1, out_state=state)
    return y[:, 0]
