"""The block-diagonal selective scan on the Triton kernels (`block_kernels.py`), with autograd.

    block_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z) -> (y, final_state)

the shared scan signature (shapes in `sparse_ssm.ssm.scan`) for `BlockStructure` and
`RotationStructure` with blocks of 2, 4 or 8 states.  Every token's discretised blocks come from
`structure.discretize` in PyTorch (zoh: the matrix exponential of the augmented block; bilinear /
gbt: a batched solve), exactly what the PyTorch paths compute, in float32 (float64 for float64
inputs) and outside autocast; their gradients flow back through it by autograd.  That costs one
float32 A_bar (b, L, H, N/bs, bs, bs) and B_bar (b, L, H, N) per call, kept for the backward:
4 (bs + 1) N bytes per token and head (4.6 KiB at N = 128, bs = 8), with the discretisation's own
autograd buffers of the same order; the kernels' state is float32 (float64) whatever the inputs'
dtype, y has u's dtype and every gradient its input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autograd import forward_outputs, run_kernels
from .block_kernels import block_backward, block_forward

CHUNK = 32                 # tokens between the forward's state checkpoints (the backward recomputes a chunk)
STEP_ELEMENTS = 4096       # the per-token block product of a program (BLOCK_NB BS BS BLOCK_P), in elements


def state_and_compute_dtypes(dtype: torch.dtype):
    """(torch dtype of the state and the operators, the kernels' compute dtype)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def work_operators(structure, u, dt, A_raw, B, method, alpha, how="discretize"):
    """`structure.<how>` (discretize or factors) of A_raw, dt and B repeated to one group per head, in
    the state dtype and outside autocast: the per-token operators the kernels of a structure read."""
    work, _ = state_and_compute_dtypes(u.dtype)
    with torch.autocast(u.device.type, enabled=False):
        B_heads = B.to(work).repeat_interleave(u.shape[2] // B.shape[2], dim=2)
        return getattr(structure, how)(structure.continuous(A_raw.to(work)), dt.to(work), B_heads, method, alpha)


def _blocks(NB: int, BS: int, P: int):
    """(BLOCK_NB, BLOCK_P): all blocks in one tile; channels tiled (4 at least) so that a step's
    block product stays about STEP_ELEMENTS."""
    block_nb = triton.next_power_of_2(NB)
    return block_nb, min(triton.next_power_of_2(P), max(4, STEP_ELEMENTS // (block_nb * BS * BS)))


def _launch_forward(u, A_bar, B_bar, C, D, h0, z, save, chunk=None, out_state=None):
    """y, the final state (written into `out_state` when given: h0 itself for a step in place) and the
    checkpoints every `chunk` tokens (None: CHUNK) when `save`."""
    chunk = CHUNK if chunk is None else chunk
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    NB, BS = A_bar.shape[3], A_bar.shape[4]
    compute = state_and_compute_dtypes(u.dtype)[1]
    block_nb, block_p = _blocks(NB, BS, P)
    y, hT, n_chunks, ckpt = forward_outputs(u, N, chunk, save, out_state)
    grid = (b * H, triton.cdiv(P, block_p))
    block_forward[grid](A_bar, B_bar, C, u, D, u if z is None else z, hT if h0 is None else h0, y, hT, ckpt,
                        L, H, G, NB, P, n_chunks, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE=save,
                        CHUNK=chunk, BS=BS, BLOCK_NB=block_nb, BLOCK_P=block_p, COMPUTE=compute)
    return y, hT, ckpt


def _launch_backward(u, A_bar, B_bar, C, D, z, ckpt, dout, dhT):
    """The gradients of u, A_bar, B_bar, C (per group), D, the initial state (state dtype) and z (or None)."""
    b, L, H, P = u.shape
    G, N = C.shape[2], C.shape[3]
    NB, BS = A_bar.shape[3], A_bar.shape[4]
    state_dtype, compute = state_and_compute_dtypes(u.dtype)
    block_nb, block_p = _blocks(NB, BS, P)
    tiles = triton.cdiv(P, block_p)
    du = torch.empty_like(u)
    dz = torch.empty_like(z) if z is not None else None
    dh0 = u.new_empty(b, H, N, P, dtype=state_dtype)
    n_chunks = triton.cdiv(L, CHUNK)
    padded = dict(dtype=state_dtype, device=u.device)
    dA_bar = torch.zeros(b, n_chunks * CHUNK, H, NB, BS, BS, **padded)
    dB_bar, dC = (torch.zeros(b, n_chunks * CHUNK, H, N, **padded) for _ in range(2))
    dD = torch.zeros(b, n_chunks * CHUNK, H, **padded)
    scratch = torch.empty(b * H * tiles * (CHUNK + 1) * block_nb * BS * block_p, **padded)
    block_backward[(b * H, tiles)](A_bar, B_bar, C, u, D, u if z is None else z, ckpt, dout, dhT, scratch,
                                   du, du if dz is None else dz, dh0, dA_bar, dB_bar, dC, dD,
                                   L, H, G, NB, P, n_chunks, HAS_Z=z is not None, CHUNK=CHUNK, BS=BS,
                                   BLOCK_NB=block_nb, BLOCK_P=block_p, COMPUTE=compute)
    dC = dC[:, :L].reshape(b, L, G, H // G, N).sum(3).to(C.dtype)
    return du, dA_bar[:, :L], dB_bar[:, :L], dC, dD[:, :L].to(D.dtype), dh0, dz


def block_scan(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """The scan of a block-diagonal A (see the module docstring); autograd through the Triton
    backward (and PyTorch's, for the discretisation) whenever an input requires a gradient."""
    (A_bar,), B_bar = work_operators(structure, u, dt, A_raw, B, method, alpha)
    return run_kernels((_launch_forward, _launch_backward), (u, A_bar, B_bar, C, D), initial_state, z)


def block_state_update(u, dt, A_raw, B, C, D, structure, method, alpha, state, z=None):
    """One token in place (decoding, no autograd): u, z (b, H, P) or None; dt, D (b, H); A_raw
    (b, H, raw_size); B, C (b, G, N); `state` (b, H, N, P), contiguous, in the state dtype.  The
    token's blocks are discretised in PyTorch (as for the scan), then one launch of the forward kernel
    specialised to one token (CHUNK 1) advances the state in place.  Returns y (b, H, P)."""
    token = lambda x: None if x is None else x.contiguous().unsqueeze(1)
    (A_bar,), B_bar = work_operators(structure, token(u), token(dt), token(A_raw), token(B), method, alpha)
    y, _, _ = _launch_forward(token(u), A_bar.contiguous(), B_bar.contiguous(), token(C), token(D), state, token(z),
                              save=False, chunk=1, out_state=state)
    return y[:, 0]
