"""The native product of a few float rows with a weight-only int8 matrix (`kernels/int8_gemv.h`):

    int8_linear(x, qweight, scales, bias) = x @ (scales[:, None] * qweight)^T + bias

x (b, I) float32/64, qweight (O, I) int8, scales (O,) float32, bias (O,) or None.  Each row of x is
quantised to int8 values with its own scale (max |x| / 127, an error of at most half that per element)
and the products summed exactly in integers, so a row's answer does not depend on the rows beside it.  The
decoding step's projections and LM head (1-8 rows) read each weight byte once for all rows;
`sparse_ssm.model.quantize.Int8Linear` calls it below its many-rows threshold.
"""

from __future__ import annotations

import torch

from .kernels import native_library

_KERNELS: dict = {}        # x's dtype -> the library's entry point, once the library is loaded


def _kernels() -> dict:
    lib = native_library()
    if lib is not None and not _KERNELS:
        _KERNELS.update({torch.float32: lib.ssm_int8_linear_f32, torch.float64: lib.ssm_int8_linear_f64})
    return _KERNELS


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """(b, O) in x's dtype, or None when the kernel cannot take these (no native library, not CPU
    float32/64 rows, a weight or scale of another dtype or layout).  Its checks are kept to what a
    decoding step can afford (a map of the step costs ~20 microseconds of arithmetic)."""
    fn = (_KERNELS or _kernels()).get(x.dtype)
    if (fn is None or x.dim() != 2 or not x.is_cpu or qweight.dtype != torch.int8 or scales.dtype != torch.float32
            or not (qweight.is_cpu and qweight.is_contiguous() and scales.is_contiguous())
            or x.shape[1] != qweight.shape[1] or scales.shape[0] != qweight.shape[0] or scales.dim() != 1):
        return None
    x = x.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    out = x.new_empty(x.shape[0], qweight.shape[0])
    if fn(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr(),
          out.data_ptr(), x.shape[0], qweight.shape[0], x.shape[1], torch.get_num_threads()):
        raise ValueError("int8 linear: invalid shapes")
    return out


def decode_weight(linear) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """A linear map's weight as the native decoding steps take it: a float map's `weight` (out, in),
    or (qweight (out, in) int8, scales (out,)) of a weight-only int8 map (`model.quantize.Int8Linear`);
    None for any other map.  A bias is the caller's to pass (or to refuse)."""
    weight = getattr(linear, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    q, scales = getattr(linear, "qweight", None), getattr(linear, "scales", None)
    return (q, scales) if isinstance(q, torch.Tensor) and isinstance(scales, torch.Tensor) else None


def kernel_operands(weight, dtype) -> tuple | None:
    """The tensors the kernels take for a `decode_weight`: (W,) for a contiguous CPU float W of `dtype`,
    (q, s) for a contiguous CPU int8 q with float32 scales s; None when the kernels cannot take it."""
    pair = isinstance(weight, tuple)
    tensors = weight if pair else (weight,)
    ok = (tensors[0].dtype == torch.int8 and tensors[1].dtype == torch.float32) if pair else weight.dtype == dtype
    return tensors if ok and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) else None
