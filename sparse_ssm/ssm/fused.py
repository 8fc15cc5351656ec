"""The fused CPU selective scan (native kernel) behind the common scan signature.

    selective_scan_fused(u, dt, a, B, C, D, structure, method, alpha, initial_state) -> (y, final_state)

Diagonal structure only: one pass over the sequence per (batch row, head) with the state in
registers and L1 (`kernels/selective_scan.cpp` states the exact equations); the backward pass
recomputes the states of one chunk of 32 tokens at a time from chunk-start states saved by the
forward (1/32 of a (batch, length, channels, state) tensor) instead of storing per-token tensors.
B and C may be given per group (b, L, G, N) with G dividing the number of heads.  It is a
`torch.library` custom op with its own autograd formula, so it also runs under torch.compile.
`available(...)` says whether a call can take this path (CPU tensors, float32/float64, the
library built); `sparse_ssm.ssm.scan.selective_scan` dispatches to it.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .discretization import alpha_for
from .kernels import native_library, unavailable_reason  # noqa: F401 - part of this module's interface
from .structures import DiagonalStructure

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _method(method: str, alpha: float) -> tuple[int, float]:
    return (0, 0.0) if method == "zoh" else (1, alpha_for(method, alpha))


def available(u: torch.Tensor, structure) -> bool:
    return (isinstance(structure, DiagonalStructure) and u.device.type == "cpu" and u.dtype in _SUFFIX
            and native_library() is not None)


def _dims(u, B, method_id, alpha):
    b, L, H, P = u.shape
    return [b, L, H, P, B.shape[-1], B.shape[2], method_id, alpha, torch.get_num_threads()]


def _forward(u, dt, a, B, C, D, h0, method_id: int, alpha: float, save: bool):
    b, L, H, P = u.shape
    N = B.shape[-1]
    y = torch.empty_like(u)
    hT = u.new_empty(b, H, N, P)
    chunks = -(-L // 32)
    saved = u.new_empty(b, H, chunks, N, P) if save else u.new_empty(0)
    fn = getattr(native_library(), f"ssm_diag_forward_{_SUFFIX[u.dtype]}")
    err = fn(*map(_ptr, (u, dt, a, B, C, D, h0, y, hT, saved if save else None)), *_dims(u, B, method_id, alpha))
    if err:
        raise ValueError(f"fused scan: invalid shapes (code {err})")
    return y, hT, saved


@torch.library.custom_op("sparse_ssm::diag_scan", mutates_args=())
def diag_scan(u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
              h0: Optional[torch.Tensor], method_id: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (b, L, H, P), final state (b, H, N, P), chunk-start states for the backward)."""
    return _forward(u, dt, a, B, C, D, h0, method_id, alpha, save=True)


@diag_scan.register_fake
def _(u, dt, a, B, C, D, h0, method_id, alpha):
    b, L, H, P = u.shape
    N = B.shape[-1]
    return torch.empty_like(u), u.new_empty(b, H, N, P), u.new_empty(b, H, -(-L // 32), N, P)


@torch.library.custom_op("sparse_ssm::diag_scan_backward", mutates_args=())
def diag_scan_backward(u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor, saved: torch.Tensor, dy: torch.Tensor, dhT: Optional[torch.Tensor],
                       method_id: int, alpha: float) -> list[torch.Tensor]:
    """Gradients of u, dt, a, B, C (per group), D and of the initial state."""
    b, L, H, P = u.shape
    G, N = B.shape[2], B.shape[3]
    du, ddt, da, dD = torch.empty_like(u), torch.empty_like(dt), torch.empty_like(a), torch.empty_like(D)
    dB_head, dC_head = u.new_empty(b, L, H, N), u.new_empty(b, L, H, N)
    dh0 = u.new_empty(b, H, N, P)
    fn = getattr(native_library(), f"ssm_diag_backward_{_SUFFIX[u.dtype]}")
    err = fn(*map(_ptr, (u, dt, a, B, C, D, saved, dy, dhT, du, ddt, da, dB_head, dC_head, dD, dh0)),
             *_dims(u, B, method_id, alpha))
    if err:
        raise ValueError(f"fused scan backward: invalid shapes (code {err})")
    per_group = lambda g: g.view(b, L, G, H // G, N).sum(3)
    return [du, ddt, da, per_group(dB_head), per_group(dC_head), dD, dh0]


@diag_scan_backward.register_fake
def _(u, dt, a, B, C, D, saved, dy, dhT, method_id, alpha):
    b, L, H, P = u.shape
    return [torch.empty_like(u), torch.empty_like(dt), torch.empty_like(a), torch.empty_like(B), torch.empty_like(C),
            torch.empty_like(D), u.new_empty(b, H, B.shape[-1], P)]


def _setup_context(ctx, inputs, output):
    u, dt, a, B, C, D, h0, method_id, alpha = inputs
    ctx.save_for_backward(u, dt, a, B, C, D, output[2])
    ctx.method = (method_id, alpha)
    ctx.has_h0 = h0 is not None


def _backward(ctx, dy, dhT, _saved_grad):
    u, dt, a, B, C, D, saved = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy.contiguous()
    dhT = None if dhT is None else dhT.contiguous()
    du, ddt, da, dB, dC, dD, dh0 = diag_scan_backward(u, dt, a, B, C, D, saved, dy, dhT, *ctx.method)
    return du, ddt, da, dB, dC, dD, (dh0 if ctx.has_h0 else None), None, None


diag_scan.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fused(u, dt, A, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None):
    """The common scan signature (see `scan.py`); A is the diagonal (b, L, H, N); B, C (b, L, G, N)."""
    method_id, al = _method(method, alpha)
    args = [t.contiguous() for t in (u, dt, A, B, C, D)]
    h0 = None if initial_state is None else initial_state.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*args, h0) if t is not None)
    if needs_grad or torch.compiler.is_compiling():
        y, hT, _ = diag_scan(*args, h0, method_id, al)
    else:                                # inference: the kernel directly, no saved states, no dispatch
        y, hT, _ = _forward(*args, h0, method_id, al, save=False)
    return y, hT
