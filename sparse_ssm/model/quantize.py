"""Weight-only int8 for inference: the linear maps' weights as int8 rows with one float32 scale per
output channel; activations, the conv, the scan and its state stay float.

    W (out, in) ~ scales[:, None] * q,   q = round(W / scales[:, None]) in [-127, 127],
    scales = max_j |W[:, j]| / 127                         (the error of each weight <= scales / 2)
    y = x W^T ~ (x q^T) * scales

Below 64 rows (decoding, short prompts) the matmul is the native int8 product
(`sparse_ssm.ssm.quantized.int8_linear`: int8 activations, exact integer sums; ~2x PyTorch's kernel at
1-63 rows; bench/results/weights.md has the times).  Without the native
kernels it is PyTorch's weight-only int8 kernel (`torch._weight_int8pack_mm`: bf16 activations,
int8 weights, float accumulation) on CPUs where the inner size is a multiple of 16 (its kernel's
requirement; other sizes give wrong numbers), else an int8 -> float cast of the weight and
`F.linear` (small maps of tiny models, other devices); from 64 rows on (prefill, evaluation) the
weight is cast to bf16 for one bf16 GEMM (a transient copy of one map at a time).  Quantised: every block's in/out projection,
the generator's maps (`proj`, `a_up`), the FFN and the LM head; the embedding's rows too (one
scale per token), sharing the head's int8 tensor when the two are tied.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm.quantized import int8_linear

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
_KERNEL_INNER_MULTIPLE = 16          # torch._weight_int8pack_mm's inner size must be a multiple of it
# from this many rows on, the weight is cast to bf16 (|q| <= 127: exact) for a bf16 GEMM, 2-5x faster than
# the int8 kernel on 512 rows (bench/results/weights.md); below it the int8 kernel, up to 5x a float32 GEMV
_MANY_ROWS = 64


def quantize_rows(weight: torch.Tensor | Callable[[int, int], torch.Tensor], shape: tuple[int, int] | None = None,
                  elements_at_once: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float -> (q (out, in) int8, scales (out,) float32), per row symmetric; a
    block of rows (~1 MB) at a time, so that the float temporaries stay small and are reused (large
    ones, freed between the int8 tensors kept, would fragment the heap: +40 % peak RSS at 130 M).
    `weight` may also be a function (start, stop) -> rows [start, stop) of a weight of `shape`,
    read from a file block by block: then no float copy of the whole weight exists."""
    rows_of = weight if callable(weight) else (lambda start, stop: weight.detach()[start:stop])
    shape = tuple(weight.shape) if shape is None else shape
    rows_at_once = max(1, elements_at_once // max(1, shape[1]))
    q = torch.empty(shape, dtype=torch.int8)
    scales = torch.empty(shape[0], dtype=torch.float32)
    for start in range(0, shape[0], rows_at_once):
        block = rows_of(start, min(start + rows_at_once, shape[0])).float()
        scale = block.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q[start:start + rows_at_once] = torch.round(block / scale[:, None]).clamp_(-127, 127)
        scales[start:start + rows_at_once] = scale
    return q, scales


class Int8Linear(nn.Module):
    """x (..., in) -> (..., out) with an int8 weight (out, in) and per-output-channel scales (out,);
    answers in x's dtype."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("unit_scales", torch.ones(qweight.shape[0], dtype=torch.bfloat16,
                                                       device=qweight.device), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        return cls(*quantize_rows(weight), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if rows.shape[0] < _MANY_ROWS:                   # decoding: the native int8 product
            y = int8_linear(rows, self.qweight, self.scales, self.bias)
            if y is not None:
                return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        if rows.shape[0] >= _MANY_ROWS:                  # a prompt, a batch of windows: bf16 GEMM
            unscaled = F.linear(rows.to(torch.bfloat16), self.qweight.to(torch.bfloat16)).to(x.dtype)
        elif x.device.type == "cpu" and self.in_features % _KERNEL_INNER_MULTIPLE == 0:
            unscaled = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.qweight,
                                                 self.unit_scales).to(x.dtype)
        else:
            unscaled = F.linear(rows, self.qweight.to(x.dtype))
        y = unscaled * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """ids (...) -> rows (..., dim) float32 of an int8 table (num, dim) with one scale per row (the
    tied LM head's tensors when it shares them)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scales[ids, None]


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The names of the linear maps that int8 weights replace (see the module docstring)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def quantize_model(model: nn.Module, float_rows: Callable[[str, int, int], torch.Tensor] | None = None) -> nn.Module:
    """Replace, in place and one map at a time, the model's linear maps by `Int8Linear` and its
    embedding by `Int8Embedding` (sharing the LM head's tensors when tied); returns the model (on
    the CPU).

    float_rows(name, start, stop) gives rows [start, stop) of the float parameter `name` (e.g.
    "lm_head.weight"): by default the model's own; a loader passes one that reads them from the
    checkpoint, so that a model built on the meta device never holds a float copy of a quantised
    weight (what it gives need only stay valid until its next call)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    read = float_rows or (lambda name, start, stop: params[name].detach()[start:stop])
    tied = model.lm_head.weight is model.embed.weight
    for name in quantized_linear_names(model):
        linear = model.get_submodule(name)
        q, scales = quantize_rows(lambda start, stop: read(f"{name}.weight", start, stop), tuple(linear.weight.shape))
        bias = None if linear.bias is None else read(f"{name}.bias", 0, linear.bias.shape[0]).clone()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, Int8Linear(q, scales, bias))
    head, table = model.lm_head, model.embed.weight
    model.embed = (Int8Embedding(head.qweight, head.scales) if tied else Int8Embedding(
        *quantize_rows(lambda start, stop: read("embed.weight", start, stop), tuple(table.shape))))
    return model
