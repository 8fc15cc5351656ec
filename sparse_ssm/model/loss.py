"""Fused LM head + cross-entropy, computed in row chunks.

    loss = mean over tokens with target != ignore_index of  -log softmax(h W^T)[target]

`linear_cross_entropy(h, W, targets)` equals `F.cross_entropy(h @ W.T, targets)` (the slow,
obvious reference) without ever holding the (tokens, vocab) logits: each chunk of rows computes
its logits, log-sum-exp and loss, and - when a gradient is needed - the gradients of h and W
right away (softmax - one_hot is all the backward of cross-entropy needs).  The backward pass
then only scales the stored gradients.  The matmul work equals that of forward + backward of
the plain form; the memory for logits drops from tokens x vocab to chunk x vocab, and with it the
page faults that a fresh 32 MB logits buffer costs on every step.

On CPU tensors a native kernel does each chunk's softmax and gradient; elsewhere (CUDA) the same
chunks go through PyTorch ops, with the softmax written into the chunk's logits buffer (one
chunk x vocab buffer, not two) and the token count kept on the device (no host sync per step).
"""

from __future__ import annotations

import torch

from ..ssm.kernels import cross_entropy_rows_


def _chunk_loss(logits, targets, valid, scale, grad: bool, native: bool):
    """(summed loss of the valid rows, gradient scale * (softmax - onehot) or None) of a chunk of
    logits (rows, vocab), whose buffer the gradient reuses.  `native`: the CPU kernel (scale a
    float); else PyTorch ops (any device; scale a float or a 0-dim tensor: no host sync)."""
    losses = cross_entropy_rows_(logits, torch.where(valid, targets, -1), scale, grad) if native else None
    if losses is not None:
        return losses.sum(), (logits if grad else None)
    t = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, t)
    total = ((lse - picked[:, 0]) * valid).sum()
    if not grad:
        return total, None
    g = logits.sub_(lse[:, None]).exp_()                               # softmax, in the logits' buffer
    g.scatter_add_(1, t, torch.full_like(picked, -1.0))
    g *= (valid.to(g.dtype) * scale)[:, None]
    return total, g


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, targets, ignore_index, chunk_rows, native):
        """In (at least) float32 whatever the autocast dtype: logits, softmax and the gradients."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            return _LinearCrossEntropy._forward(ctx, h, W, targets, ignore_index, chunk_rows, native)

    @staticmethod
    def _forward(ctx, h, W, targets, ignore_index, chunk_rows, native):
        needs_grad = h.requires_grad or W.requires_grad
        dtype = torch.promote_types(h.dtype, torch.float32)
        hf, Wf = h.to(dtype), W.to(dtype)
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        count = int(count) if native else count.to(dtype)              # the kernel takes a float
        total = hf.new_zeros(())
        grad_h = torch.empty_like(hf) if needs_grad else None
        grad_W = torch.zeros_like(Wf) if needs_grad else None
        for start in range(0, hf.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = hf[rows] @ Wf.T                                   # (chunk, vocab)
            loss, g = _chunk_loss(logits, targets[rows], valid[rows], 1.0 / count, needs_grad, native)
            total = total + loss
            if needs_grad:
                torch.mm(g, Wf, out=grad_h[rows])
                grad_W.addmm_(g.T, hf[rows])
        ctx.save_for_backward(grad_h, grad_W)
        ctx.dtypes = (h.dtype, W.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_W = ctx.saved_tensors
        return ((grad_h * grad_out).to(ctx.dtypes[0]), (grad_W * grad_out).to(ctx.dtypes[1]), None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = 256, native: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits h @ W.T.  h (tokens, hidden), W (vocab, hidden), targets (tokens,).
    `native` (None: on CPU tensors): the CPU kernel; else the PyTorch ops that every device runs
    (CUDA's path), with no host synchronisation."""
    native = h.device.type == "cpu" if native is None else native
    return _LinearCrossEntropy.apply(h, W, targets, ignore_index, chunk_rows, native)
