"""The one autograd Function of the Triton scans, over any structure's pair of launchers.

    run_kernels((launch_forward, launch_backward), tensors, initial_state, z, *options) -> (y, final_state)

A structure's module (`diagonal.py`, `block.py`, ...) prepares its per-token operators in PyTorch and
hands them here with its two launchers, which follow one convention:

    launch_forward(*tensors, h0, z, *options, save) -> (y, hT, checkpoints)
    launch_backward(*tensors, z, checkpoints, dy, dhT, *options) -> (*d tensors, dh0, dz)

tensors: the kernel's inputs, u first (b, L, H, P); h0 / hT the states (b, H, N, P) or None; z the
gate or None; options: anything else the kernels need (flags, the structure).  The forward keeps the
chunk checkpoints only; gradients flow back to the tensors, the initial state (in its dtype) and z.
`forward_outputs` allocates what every forward launcher returns.
"""

from __future__ import annotations

import torch


class KernelScan(torch.autograd.Function):
    """Forward and backward on one structure's Triton kernels (`kernels`: its two launchers)."""

    @staticmethod
    def forward(ctx, kernels, options, h0, z, *tensors):
        y, hT, ckpt = kernels[0](*tensors, h0, z, *options, save=True)
        ctx.save_for_backward(*tensors, z, ckpt)
        ctx.kernels, ctx.options, ctx.h0_dtype = kernels, options, None if h0 is None else h0.dtype
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        *tensors, z, ckpt = ctx.saved_tensors
        *grads, dh0, dz = ctx.kernels[1](*tensors, z, ckpt, dy.contiguous(), dhT.contiguous(), *ctx.options)
        return None, None, None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype), dz, *grads


def forward_outputs(u, N: int, chunk: int, save: bool, out_state=None):
    """A forward launcher's outputs for u (b, L, H, P): (y like u, the final state (b, H, N, P) in the
    state dtype (float32; float64 for float64 u) or `out_state` (h0 itself for a step in place), the
    number of chunks of `chunk` tokens, the checkpoints (b, H, n_chunks, N, P) when `save`, else the
    final state (the kernels then never write it))."""
    b, L, H, P = u.shape
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    hT = u.new_empty(b, H, N, P, dtype=state_dtype) if out_state is None else out_state
    n_chunks = -(-L // chunk)
    return torch.empty_like(u), hT, n_chunks, u.new_empty(b, H, n_chunks, N, P, dtype=state_dtype) if save else hT


def run_kernels(kernels, tensors, initial_state, z, *options):
    """The scan on a structure's launchers (module docstring): the inputs made contiguous; through
    `KernelScan` when grad mode is on and some input requires a gradient, else the forward alone
    (no checkpoints)."""
    tensors = [t.contiguous() for t in tensors]
    h0 = None if initial_state is None else initial_state.contiguous()
    z = None if z is None else z.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, h0, z) if t is not None):
        return KernelScan.apply(kernels, options, h0, z, *tensors)
    y, hT, _ = kernels[0](*tensors, h0, z, *options, save=False)
    return y, hT
