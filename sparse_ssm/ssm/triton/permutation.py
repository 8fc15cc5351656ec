"""The permutation-diagonal selective scan on the Triton kernels (`permutation_kernels.py`), with autograd.

    permutation_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z) -> (y, final_state)

the shared scan signature (shapes in `sparse_ssm.ssm.scan`) for `PermutationStructure` (zoh /
bilinear / gbt for the decay).  Every token's selection P (one-hot forward, the column softmax's
gradient backward), decay d and B_bar come from `structure.factors` in PyTorch, in float32 (float64
for float64 inputs) and outside autocast; their gradients flow back through it by autograd.  The
forward kernel reads P as N destination rows per token (its arg-max per column), not N^2 entries;
the backward writes the N x N gradient of A_bar = P diag(d) per token (the straight-through
selection passes it to every logit), from which dP = dA_bar diag(d) and dd = the entries of dA_bar
where P is 1.  The kernels' state is float32 (float64) whatever the inputs' dtype, y has u's dtype
and every gradient its input's dtype.
"""

from __future__ import annotations

import torch
import triton

from .autograd import forward_outputs, run_kernels
from .block import state_and_compute_dtypes, work_operators
from .permutation_kernels import permutation_backward, permutation_forward

CHUNK = 32                 # tokens between the forward's state checkpoints (the backward recomputes a chunk)
STEP_ELEMENTS = 4096       # the per-token one-hot move of a program (BLOCK_N BLOCK_N BLOCK_P), in elements
MIN_TILE = 4               # the fewest channels of a tile


def _blocks(N: int, P: int):
    """(BLOCK_N, BLOCK_P): all states in one tile, channels tiled so a step's move stays STEP_ELEMENTS."""
    block_n = triton.next_power_of_2(N)
    return block_n, min(triton.next_power_of_2(P), max(MIN_TILE, STEP_ELEMENTS // (block_n * block_n)))


def _launch_forward(u, moves, d, B_bar, C, D, h0, z, save):
    f = moves.argmax(-2).to(torch.int32)                # each state's source: the one-hot moves as indices
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    compute = state_and_compute_dtypes(u.dtype)[1]
    block_n, block_p = _blocks(N, P)
    y, hT, n_chunks, ckpt = forward_outputs(u, N, CHUNK, save)
    grid = (b * H, triton.cdiv(P, block_p))
    permutation_forward[grid](f, d, B_bar, C, u, D, u if z is None else z, hT if h0 is None else h0, y, hT, ckpt,
                              L, H, G, N, P, n_chunks, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE=save,
                              CHUNK=CHUNK, BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=compute)
    return y, hT, ckpt


def _launch_backward(u, moves, d, B_bar, C, D, z, ckpt, dout, dhT):
    """The gradients of u, the one-hot moves P and d (through A_bar = P diag(d)), B_bar, C (per group),
    D, the initial state (state dtype) and z (or None)."""
    f = moves.argmax(-2).to(torch.int32)
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    state_dtype, compute = state_and_compute_dtypes(u.dtype)
    block_n, block_p = _blocks(N, P)
    tiles = triton.cdiv(P, block_p)
    du = torch.empty_like(u)
    dz = torch.empty_like(z) if z is not None else None
    dh0 = u.new_empty(b, H, N, P, dtype=state_dtype)
    n_chunks = triton.cdiv(L, CHUNK)
    padded = lambda *shape: torch.zeros(b, n_chunks * CHUNK, H, *shape, dtype=state_dtype, device=u.device)
    dA_bar, dB_bar, dC, dD = padded(N, N), padded(N), padded(N), padded()
    scratch = torch.empty(b * H * tiles * (CHUNK + 1) * block_n * block_p, dtype=state_dtype, device=u.device)
    permutation_backward[(b * H, tiles)](f, d, B_bar, C, u, D, u if z is None else z, ckpt, dout, dhT, scratch,
                                         du, du if dz is None else dz, dh0, dA_bar, dB_bar, dC, dD,
                                         L, H, G, N, P, n_chunks, HAS_Z=z is not None, CHUNK=CHUNK,
                                         BLOCK_N=block_n, BLOCK_P=block_p, COMPUTE=compute)
    dC = dC[:, :L].reshape(b, L, G, H // G, N).sum(3).to(C.dtype)
    dA_bar = dA_bar[:, :L]
    return du, dA_bar * d[..., None, :], (dA_bar * moves).sum(-2), dB_bar[:, :L], dC, dD[:, :L].to(D.dtype), dh0, dz


def permutation_scan(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """The scan of a permutation-diagonal A (see the module docstring); autograd through the Triton
    backward (and PyTorch's, for the factors) whenever an input requires a gradient."""
    P, d, B_bar = work_operators(structure, u, dt, A_raw, B, method, alpha, how="factors")
    return run_kernels((_launch_forward, _launch_backward), (u, P, d, B_bar, C, D), initial_state, z)
