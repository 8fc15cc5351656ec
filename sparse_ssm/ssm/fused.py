"""The fused CPU selective scan (native kernel) behind the common scan signature.

    selective_scan_fused(u, dt, a, B, C, D, structure, method, alpha, initial_state, z) -> (y, final_state)

Diagonal structure only: one pass over the sequence per (batch row, head) with the state in
registers and L1 (`kernels/selective_scan.cpp` states the exact equations); the backward pass
recomputes the states of one chunk of tokens (32) at a time from chunk-start states saved by the
forward (1/32 of a (batch, length, channels, state) tensor) instead of storing per-token tensors.
B and C may be given per group (b, L, G, N) with G dividing the number of heads; the output gate
y * silu(z) is applied in the same pass (z may be a view into a wider tensor).  It is a
`torch.library` operator with its own autograd formula, so it also runs under torch.compile.
`available(...)` says whether a call can take this path (CPU tensors, float32/float64, the
library built); `sparse_ssm.ssm.scan.selective_scan` dispatches to it.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .fused_block import kernel_kind, selective_scan_fused_block, supports
from .quantized import kernel_operands
from .kernels import (cpu_op, gradient_buffers, method_id, native_library, ptr, register_scan_autograd,
                      scan_buffers, suffix, sum_heads_per_group, token_rows)
from .structures import DiagonalStructure


def available(u: torch.Tensor, structure, method: str = "zoh") -> bool:
    """Can the native kernels run this scan (CPU tensors, float32/64, a supported structure and
    discretisation, the library built)?"""
    if u.device.type != "cpu" or suffix(u.dtype) is None or native_library() is None:
        return False
    return isinstance(structure, DiagonalStructure) or supports(structure, method)


def _dims(u, B, z_stride, code, alpha):
    b, L, H, P = u.shape
    return [b, L, H, P, B.shape[-1], B.shape[2], z_stride, code, alpha, torch.get_num_threads()]


def _forward(u, dt, a, B, C, D, h0, z, code: int, alpha: float, save: bool, hT=None):
    """(y, final state, chunk-start states, ungated output) from the kernel; the last two only with save."""
    y, hT, saved, ypre = scan_buffers(u, B, z, save, hT)
    z, z_stride = token_rows(z) if z is not None else (None, 0)
    fn = getattr(native_library(), f"ssm_diag_forward_{suffix(u.dtype)}")
    err = fn(*map(ptr, (u, dt, a, B, C, D, h0, z, y, hT, saved if save else None, ypre if ypre.numel() else None)),
             *_dims(u, B, z_stride, code, alpha))
    if err:
        raise ValueError(f"fused scan: invalid shapes (code {err})")
    return y, hT, saved, ypre


@cpu_op("sparse_ssm::diag_scan")
def diag_scan(u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
              h0: Optional[torch.Tensor], z: Optional[torch.Tensor], code: int,
              alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (b, L, H, P), final state (b, H, N, P), chunk-start states and ungated y for the backward)."""
    return _forward(u, dt, a, B, C, D, h0, z, code, alpha, save=True)


@diag_scan.register_fake
def _(u, dt, a, B, C, D, h0, z, code, alpha):
    return scan_buffers(u, B, z, save=True)


@cpu_op("sparse_ssm::diag_scan_backward")
def diag_scan_backward(u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor, saved: torch.Tensor, z: Optional[torch.Tensor], ypre: torch.Tensor,
                       dy: torch.Tensor, dhT: Optional[torch.Tensor], code: int,
                       alpha: float) -> list[torch.Tensor]:
    """Gradients of u, dt, a, B, C (per group), D, the initial state and z (empty without a gate)."""
    du, ddt, da, dB_head, dC_head, dD, dh0, dz = gradient_buffers(u, dt, a, B, D, z)
    z, z_stride = token_rows(z) if z is not None else (None, 0)
    fn = getattr(native_library(), f"ssm_diag_backward_{suffix(u.dtype)}")
    err = fn(*map(ptr, (u, dt, a, B, C, D, saved, z, ypre if z is not None else None, dy, dhT, du, ddt, da, dB_head,
                         dC_head, dD, dh0, dz if z is not None else None)), *_dims(u, B, z_stride, code, alpha))
    if err:
        raise ValueError(f"fused scan backward: invalid shapes (code {err})")
    G = B.shape[2]
    return [du, ddt, da, sum_heads_per_group(dB_head, G), sum_heads_per_group(dC_head, G), dD, dh0, dz]


@diag_scan_backward.register_fake
def _(u, dt, a, B, C, D, saved, z, ypre, dy, dhT, code, alpha):
    return gradient_buffers(u, dt, a, B, D, z, per_head=False)


register_scan_autograd(diag_scan, diag_scan_backward)


def step_in_place(u, dt, A, B, C, D, method, alpha, state, z=None, structure=None):
    """One token per row without autograd: u (b, H, P), dt (b, H), A (b, H, N), B/C (b, G, N),
    D (b, H), z (b, H, P) or None; `state` (b, H, N, P), contiguous, is advanced in place.
    Returns y (b, H, P)."""
    code, al = method_id(method, alpha, structure)
    args = [t.contiguous().unsqueeze(1) for t in (u, dt, A, B, C, D)]
    z = None if z is None else z.unsqueeze(1)
    return _forward(*args, state, z, code, al, save=False, hT=state)[0][:, 0]


def selective_scan_fused(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """The common scan signature (see `scan.py`); B, C (b, L, G, N); z (b, L, H, P) or None: the
    output gate.  Block-diagonal and rotation structures go to `fused_block`."""
    if not isinstance(structure, DiagonalStructure):
        return selective_scan_fused_block(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
    code, al = method_id(method, alpha, structure)
    args = [t.contiguous() for t in (u, dt, structure.continuous(A_raw), B, C, D)]
    h0 = None if initial_state is None else initial_state.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*args, h0, z) if t is not None)
    if needs_grad or torch.compiler.is_compiling():
        y, hT, _, _ = diag_scan(*args, h0, z, code, al)
    else:                                # inference: the kernel directly, no saved states, no dispatch
        y, hT, _, _ = _forward(*args, h0, z, code, al, save=False)
    return y, hT


def _step_inputs_ok(lib, dtype, tensors, states) -> bool:
    """Can the native decoding step take these: the library built, a float32/64 dtype shared by every
    tensor, CPU tensors, contiguous inputs and states."""
    return (lib is not None and suffix(dtype) is not None
            and all(t.device.type == "cpu" and t.dtype == dtype for t in (*tensors, *states))
            and all(t.is_contiguous() for t in states))


def step_code(method: str, alpha: float, structure) -> tuple[int, float] | None:
    """The decoding step's method code and alpha (`kernels/layer_step.cpp`): the scans' discretisation
    code (`method_id`), with a structure of the block family (block, dense, rotation, banded) in bits 2-7
    (1 + its block-scan kind) and its block size in bits 8 and up; None where the step does not take the
    structure or its discretisation (ZOH of a block or banded A, as the block scan)."""
    code, al = method_id(method, alpha, structure)
    if isinstance(structure, DiagonalStructure):
        return code, al
    kind = kernel_kind(structure)
    if kind not in (0, 1, 2) or not supports(structure, method):
        return None
    return code | (kind + 1) << 2 | structure.block_size << 8, al


def decode_layer_step(xz, conv_weight, conv_bias, weights: dict, conv_state, ssm_state, method, alpha):
    """A whole decoding step of a layer between its projections (`kernels/layer_step.cpp`; diagonal A
    and the block family, `step_code`):
    xz (b, 2E) = in_proj(x); conv_state (b, K - 1, E) and ssm_state (b, H, N, P) advanced in place;
    `weights` from `SelectiveParameterGenerator.decode_weights()` (parameters: contiguous, of the
    layer's dtype).  Returns y (b, E), gated; None when the kernel cannot take it (then the caller
    runs the step operation by operation)."""
    lib = native_library()
    found = step_code(method, alpha, weights["structure"])
    if (found is None or isinstance(weights["Wg"], tuple) or isinstance(weights["Wa"], tuple)   # (int8: the block step only)
            or not _step_inputs_ok(lib, xz.dtype, (conv_weight,), (xz, conv_state, ssm_state))):
        return None
    dtype = xz.dtype
    b, H, N, P = ssm_state.shape
    E, K = conv_weight.shape
    y = xz.new_empty(b, E)
    code, al = found
    Wa = weights["Wa"]
    err = getattr(lib, f"ssm_layer_step_{suffix(dtype)}")(
        xz.data_ptr(), conv_state.data_ptr(), conv_weight.data_ptr(), conv_bias.data_ptr(), weights["Wg"].data_ptr(),
        weights["dt_bias"].data_ptr(), Wa.data_ptr(), weights["A_base"].data_ptr(), weights["D_base"].data_ptr(),
        None if weights["lti"] is None else weights["lti"].data_ptr(), ssm_state.data_ptr(), y.data_ptr(),
        b, E, H, P, N, weights["groups"], Wa.shape[1], K, code, al, torch.get_num_threads())
    if err:
        raise ValueError(f"fused layer step: invalid shapes (code {err})")
    return y


def _rms_eps(eps: float | None, dtype) -> float:
    """nn.RMSNorm's epsilon: the given one, or the dtype's machine epsilon for None."""
    return torch.finfo(dtype).eps if eps is None else eps


def decode_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor | None:
    """RMSNorm of the rows of x (b, D) by the native kernel (`nn.RMSNorm`'s result: eps None means
    the dtype's machine epsilon), for the decoding step; None when the kernel cannot take it."""
    lib = native_library()
    if x.dim() != 2 or not _step_inputs_ok(lib, x.dtype, (weight,), (x,)):
        return None
    out = torch.empty_like(x)
    if getattr(lib, f"ssm_rms_norm_{suffix(x.dtype)}")(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0],
                                                       x.shape[1], _rms_eps(eps, x.dtype)):
        raise ValueError("rms norm: invalid shapes")
    return out


FFN_ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}   # the kernel's codes


def _projections(dtype, *weights) -> list[tuple] | None:
    """The kernels' tensors of each projection weight (`quantized.kernel_operands`), all float or all
    int8; None when one cannot be taken or they mix."""
    operands = [None if w is None else kernel_operands(w, dtype) for w in weights]
    return None if any(o is None for o in operands) or len({len(o) for o in operands}) != 1 else operands


def decode_ffn(x, norm_weight, eps, up_weight, up_bias, down_weight, down_bias, activation: str):
    """x + down(act(up(rms_norm(x)))) for one token a row x (b, D) by the native kernel: up_weight
    (F, D), down_weight (D, F) (float, or both (int8 weight, scales): `quantized.decode_weight`), biases
    (F,) and (D,), `activation` a key of FFN_ACTIVATIONS.  At several rows its products reuse each
    weight tile for all rows (torch's addmm ran at ~1/2 the rate at 8 rows).  None when the kernel
    cannot take them (then the caller runs the module)."""
    lib = native_library()
    params = (norm_weight, up_bias, down_bias)
    projections = _projections(x.dtype, up_weight, down_weight)
    if (x.dim() != 2 or activation not in FFN_ACTIVATIONS or any(p is None for p in params) or projections is None
            or not _step_inputs_ok(lib, x.dtype, params, (x, *params))):
        return None
    (up, down), out = projections, torch.empty_like(x)
    name = "ssm_ffn_step_q8" if len(up) == 2 else "ssm_ffn_step"
    if getattr(lib, f"{name}_{suffix(x.dtype)}")(
            x.data_ptr(), out.data_ptr(), norm_weight.data_ptr(), _rms_eps(eps, x.dtype), *map(ptr, up),
            up_bias.data_ptr(), *map(ptr, down), down_bias.data_ptr(), x.shape[0], x.shape[1],
            up[0].shape[0], FFN_ACTIVATIONS[activation], torch.get_num_threads()):
        raise ValueError("ffn step: invalid shapes")
    return out


class BlockStepPlan:
    """The native decoding step of one residual block (`kernels/layer_step.cpp`) with its arguments
    bound: plan(x) = x + out_proj(layer step(in_proj(rms_norm(x)))) for one token a row x (b, D),
    the two states advanced in place.  Binding the ~25 arguments once saves what the Python side of
    a step costs (~200 of ~300 microseconds a layer on a small CPU).  The kernel reads the weights and
    states through the pointers taken here: their values may change in place, not their storage
    (`fits` checks the states and x; a new plan is needed for weights replaced or moved)."""

    def __init__(self, fn, x_like: torch.Tensor, conv_state, ssm_state, bound: tuple, keep: tuple):
        # the bound arguments as ctypes values of the argument types (x and out first): converted once,
        # not at every call (~0.5 us); keep: the tensors the pointers point into
        types = fn.argtypes[2:]
        self.fn, self.keep = fn, keep
        self.bound = tuple(v if v is None or isinstance(v, ctypes.c_void_p) else kind(v) for v, kind in zip(bound, types))
        self.dtype, self.shape = x_like.dtype, x_like.shape
        self.conv_state, self.ssm_state = conv_state, ssm_state

    def fits(self, x: torch.Tensor, conv_state, ssm_state) -> bool:
        return (conv_state is self.conv_state and ssm_state is self.ssm_state and x.dtype == self.dtype
                and x.shape == self.shape and x.device.type == "cpu" and x.is_contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        if self.fn(x.data_ptr(), out.data_ptr(), *self.bound, torch.get_num_threads()):
            raise ValueError("fused block step: invalid shapes")
        return out


def block_step_plan(x, norm_weight, eps, in_weight, out_weight, conv_weight, conv_bias, weights: dict,
                    conv_state, ssm_state, method, alpha) -> BlockStepPlan | None:
    """The bound native step of a residual block for rows like x (b, D): in_weight (2E, D),
    out_weight (D, E) and the generator's Wg all float, or all (int8 weight, scales)
    (`quantized.decode_weight`: weight-only int8), the generator's Wa (H R, r) either with int8 ones
    (float with float ones), the rest as `decode_layer_step`; None when the kernel cannot take them."""
    lib = native_library()
    lti = weights["lti"]
    projections = _projections(x.dtype, in_weight, out_weight, weights["Wg"])
    Wa = kernel_operands(weights["Wa"], x.dtype)
    found = step_code(method, alpha, weights["structure"])
    if (found is None or projections is None or Wa is None or len(Wa) > len(projections[0])
            or not _step_inputs_ok(lib, x.dtype, (norm_weight, conv_weight), (x, conv_state, ssm_state))):
        return None
    (W_in, W_out, Wg), r = projections, Wa[0].shape[1]              # Wa[0]: the (H R, r) weight, float or int8
    if len(Wg) == 2:                                                  # the int8 step: Wa float or int8
        Wa = (Wa[0], None, None) if len(Wa) == 1 else (None, Wa[0].t().contiguous(), Wa[1])   # int8 transposed
    b, H, N, P = ssm_state.shape
    E, K = conv_weight.shape
    code, al = found
    tensors = (conv_state, conv_weight, conv_bias, *Wg, weights["dt_bias"], *Wa, weights["A_base"], weights["D_base"],
               lti, ssm_state)
    bound = (ptr(norm_weight), _rms_eps(eps, x.dtype), *map(ptr, W_in), *map(ptr, W_out), x.shape[1],
             *map(ptr, tensors), b, E, H, P, N, weights["groups"], r, K, code, al)
    fn = getattr(lib, f"ssm_block_step{'_q8' if len(Wg) == 2 else ''}_{suffix(x.dtype)}")
    return BlockStepPlan(fn, x, conv_state, ssm_state, bound, (norm_weight, *W_in, *W_out, *tensors))
