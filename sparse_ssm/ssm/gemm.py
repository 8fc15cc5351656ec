"""Float32 linear maps of a prompt's or a batch's rows (prefill, evaluation) through oneDNN's GEMM on CPUs.

    linear_rows(x, weight, bias) = F.linear(x, weight, bias)      x (..., in), weight (out, in) -> (..., out)

PyTorch's CPU `F.linear` in float32 calls MKL, which on AMD CPUs takes a path far below the core's
AVX-512 rate: one Zen 5 core ran (256, 768) x (768, 3072) at ~95 GFLOP/s by MKL and ~220 GFLOP/s by
oneDNN (`torch.ops.mkldnn._linear_pointwise`, the same float32 arithmetic in another summation order,
errors of the same size against a float64 product).  Short prompts gain too, whose weights come cold
from memory: the 130 M model's prefill of 16 tokens took 75 ms by MKL and 50 ms by oneDNN, of 2 tokens
60 and 40 ms, of 1 token 41 and 37 ms.  So every float32 CPU product that no gradient needs goes to
oneDNN (decoding steps have their own native products); everything else (and the reference,
`F.linear`) stays as it was.  `SPARSE_SSM_NATIVE=0` (the pure-PyTorch fallback of the project's
kernels) turns it off as well.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

def _onednn_linear():
    """oneDNN's linear operator, or None where this PyTorch has none or it is switched off."""
    if os.environ.get("SPARSE_SSM_NATIVE", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN = _onednn_linear()


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Does `linear_rows` send this product to oneDNN (float32 CPU tensors, neither of them empty, no
    gradient wanted, no autocast (which would run F.linear in its lower dtype), not under torch.compile)?"""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (_ONEDNN is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and weight.dim() == 2 and x.numel() > 0 and weight.numel() > 0
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x (..., in), weight (out, in), bias (out,) or None -> (..., out)."""
    if takes(x, weight, bias):
        return _ONEDNN(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
