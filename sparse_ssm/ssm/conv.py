"""The causal depthwise convolution of the selective layer, with its SiLU, and its recurrent state.

    out, final_state = causal_conv_silu(x, weight, bias, state)

    x        (b, L, E)      inputs (may be a view into a wider projection output)
    weight   (E, K)         one filter per channel (a Conv1d(E, E, K, groups=E) weight, squeezed)
    bias     (E,)
    state    (b, K - 1, E)  the K - 1 inputs before x, oldest first; None: zeros
    out      (b, L, E)      silu(bias + sum_k weight[:, k] * x[t - K + 1 + k])
    final_state (b, K - 1, E): the last K - 1 inputs (the state after x)

`causal_conv_silu_ref` is the obvious implementation (zero/state padding and `F.conv1d`); on CPUs
the native kernel (`kernels/causal_conv.cpp`, forward and backward, the window in registers)
computes the same in the (b, L, E) layout without copies or transposes, as a torch.library
operator (`kernels.cpu_op`) with its own autograd formula.  `conv_step` is the one-token update of decoding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .kernels import cpu_op, native_library, ptr, suffix, token_rows

_LANES = {torch.float32: 8, torch.float64: 4}


def causal_conv_silu_ref(x, weight, bias, state=None):
    """The reference: pad with the state (or zeros), depthwise F.conv1d, SiLU."""
    b, L, E = x.shape
    K = weight.shape[1]
    past = x.new_zeros(b, K - 1, E) if state is None else state.to(x.dtype)
    full = torch.cat([past, x], 1)                                       # (b, K - 1 + L, E)
    out = F.silu(F.conv1d(full.transpose(1, 2), weight[:, None, :], bias, groups=E).transpose(1, 2))
    return out, full[:, L:].clone() if K > 1 else x.new_zeros(b, 0, E)


@cpu_op("sparse_ssm::causal_conv_silu")
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
          state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    b, L, E = x.shape
    K = weight.shape[1]
    x, stride = token_rows(x)
    out, final = x.new_empty(b, L, E), x.new_empty(b, K - 1, E)
    fn = getattr(native_library(), f"ssm_conv_forward_{suffix(x.dtype)}")
    err = fn(*map(ptr, (x, weight, bias, state, out, final)), b, L, E, K, stride, torch.get_num_threads())
    if err:
        raise ValueError(f"fused causal conv: unsupported shapes (code {err})")
    return out, final


@_conv.register_fake
def _(x, weight, bias, state):
    b, L, E = x.shape
    return x.new_empty(b, L, E), x.new_empty(b, weight.shape[1] - 1, E)


@cpu_op("sparse_ssm::causal_conv_silu_backward")
def _conv_backward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, state: Optional[torch.Tensor],
                   dout: torch.Tensor) -> list[torch.Tensor]:
    b, L, E = x.shape
    K = weight.shape[1]
    x, stride = token_rows(x)
    dx, dw, dbias, dstate = torch.empty_like(dout), torch.empty_like(weight), torch.empty_like(bias), x.new_empty(b, K - 1, E)
    fn = getattr(native_library(), f"ssm_conv_backward_{suffix(x.dtype)}")
    err = fn(*map(ptr, (x, weight, bias, state, dout, dx, dw, dbias, dstate)), b, L, E, K, stride,
             torch.get_num_threads())
    if err:
        raise ValueError(f"fused causal conv backward: unsupported shapes (code {err})")
    return [dx, dw, dbias, dstate]


@_conv_backward.register_fake
def _(x, weight, bias, state, dout):
    b, L, E = x.shape
    return [torch.empty_like(dout), torch.empty_like(weight), torch.empty_like(bias),
            x.new_empty(b, weight.shape[1] - 1, E)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, state = inputs
    ctx.save_for_backward(x, weight, bias, state)


def _backward(ctx, dout, _dfinal):
    x, weight, bias, state = ctx.saved_tensors
    dx, dw, dbias, dstate = _conv_backward(x, weight, bias, state, dout.contiguous())
    return dx, dw, dbias, (dstate if state is not None else None)


_conv.register_autograd(_backward, setup_context=_setup_context)


def causal_conv_silu(x, weight, bias, state=None):
    """See the module docstring; the native kernel on CPUs, else the reference.  A final state whose
    gradient is needed takes the reference path (the kernel's backward covers out and the inputs)."""
    E, K = weight.shape
    if (x.device.type == "cpu" and suffix(x.dtype) is not None and weight.dtype == x.dtype and bias is not None
            and E % _LANES[x.dtype] == 0 and 1 <= K <= 8 and native_library() is not None):
        weight, bias = weight.contiguous(), bias.contiguous()
        state = None if state is None else state.to(x.dtype).contiguous()
        out, final = _conv(x, weight, bias, state)
        return out, final.detach()
    return causal_conv_silu_ref(x, weight, bias, state)


def conv_step(x, weight, bias, state):
    """One token per row: x (b, E), `state` (b, K - 1, E) advanced in place; silu(conv) (b, E)."""
    pre = torch.addcmul(bias, x, weight[:, -1])
    if weight.shape[1] > 1:
        pre = pre + (state * weight[:, :-1].T).sum(1)
        state.copy_(torch.cat([state[:, 1:], x[:, None].to(state.dtype)], 1))
    return F.silu(pre)
