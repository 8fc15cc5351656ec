"""The fused CPU scan for block-diagonal (and dense) and rotation structures, behind the common
scan signature.

    selective_scan_fused_block(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)

The kernel (`kernels/block_scan.cpp`, which states the exact equations) builds every token's
operator from its raw parameters in registers — the block's A = -L L^T + (K - K^T) and its
bilinear / gbt discretisation by a small LU solve, or a rotation pair's closed-form exponential
(ZOH) or Cayley transform — applies it to the state, and in the backward pass recomputes states
and operators chunk by chunk and walks back through the solve and the parameterisation.  No
per-token operator tensor is stored, so the memory is that of the diagonal scan.  Supported:
`RotationStructure` with zoh, bilinear or gbt; `BlockStructure` (block sizes up to the whole
state: the dense class), `BandedStructure` (two partitions of blocks, the Lie-Trotter product) and
`LowRankStructure` (`kernels/lowrank_scan.cpp`: the bilinear inverse by Woodbury, O(N r) per
channel) with bilinear or gbt (ZOH of a general block needs a matrix exponential per token: that
stays on the pure-PyTorch path, as does `PermutationStructure`, whose arg-max selection has no
kernel), and `HouseholderStructure` with any discretisation of its diagonal
(`kernels/householder_scan.cpp`: the reflections applied to the state one rank-1 update at a time,
O(r N) per channel).
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import (cpu_op, gradient_buffers, method_id, native_library, ptr, register_scan_autograd,
                      scan_buffers, suffix, sum_heads_per_group, token_rows)
from .structures import (BandedStructure, BlockStructure, DiagonalStructure, HouseholderStructure, LowRankStructure,
                         PermutationStructure, RotationStructure)


def kernel_kind(structure) -> int | None:
    """The kernels' structure code: 0 block (and dense), 1 rotation, 2 banded, 3 low-rank, 4 householder; None
    for a structure no kernel takes."""
    if isinstance(structure, RotationStructure):
        return 1
    if isinstance(structure, HouseholderStructure):
        return 4
    if isinstance(structure, BlockStructure) and not isinstance(structure, (DiagonalStructure, PermutationStructure)):
        return 0
    if isinstance(structure, BandedStructure):
        return 2
    if isinstance(structure, LowRankStructure):
        return 3
    return None


def supports(structure, method: str) -> bool:
    kind = kernel_kind(structure)
    return kind in (1, 4) or (kind in (0, 2, 3) and method != "zoh")


def _size(structure) -> int:
    """The kernels' size parameter: the block size, the rank of a low-rank structure, or the number
    of reflections."""
    if isinstance(structure, HouseholderStructure):
        return structure.num_reflections
    return structure.rank if isinstance(structure, LowRankStructure) else structure.block_size


def _kernel(kind: int, direction: str, dtype):
    family = {3: "lowrank", 4: "householder"}.get(kind, "block")
    return getattr(native_library(), f"ssm_{family}_{direction}_{suffix(dtype)}")


def _dims(u, B, bs, z_stride, kind, code, alpha):
    b, L, H, P = u.shape
    if kind == 3:                                         # the low-rank kernel: gbt only, by alpha
        return [b, L, H, P, B.shape[-1], B.shape[2], bs, z_stride, alpha, torch.get_num_threads()]
    if kind == 4:
        return [b, L, H, P, B.shape[-1], B.shape[2], bs, z_stride, code, alpha, torch.get_num_threads()]
    return [b, L, H, P, B.shape[-1], B.shape[2], bs, z_stride, kind, code, alpha, torch.get_num_threads()]


def _forward(u, dt, raw, B, C, D, h0, z, bs, kind, code, alpha, save):
    y, hT, saved, ypre = scan_buffers(u, B, z, save)
    z, z_stride = token_rows(z) if z is not None else (None, 0)
    fn = _kernel(kind, "forward", u.dtype)
    err = fn(*map(ptr, (u, dt, raw, B, C, D, h0, z, y, hT, saved if save else None, ypre if ypre.numel() else None)),
             *_dims(u, B, bs, z_stride, kind, code, alpha))
    if err:
        raise ValueError(f"fused block scan: unsupported shapes or discretisation (code {err})")
    return y, hT, saved, ypre


@cpu_op("sparse_ssm::block_scan")
def block_scan(u: torch.Tensor, dt: torch.Tensor, raw: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor, h0: Optional[torch.Tensor], z: Optional[torch.Tensor], bs: int, kind: int, code: int,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, final state, chunk-start states and ungated y for the backward)."""
    return _forward(u, dt, raw, B, C, D, h0, z, bs, kind, code, alpha, save=True)


@block_scan.register_fake
def _(u, dt, raw, B, C, D, h0, z, bs, kind, code, alpha):
    return scan_buffers(u, B, z, save=True)


@cpu_op("sparse_ssm::block_scan_backward")
def block_scan_backward(u: torch.Tensor, dt: torch.Tensor, raw: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: torch.Tensor, saved: torch.Tensor, z: Optional[torch.Tensor], ypre: torch.Tensor,
                        dy: torch.Tensor, dhT: Optional[torch.Tensor], bs: int, kind: int, code: int,
                        alpha: float) -> list[torch.Tensor]:
    """Gradients of u, dt, raw, B, C (per group), D, the initial state and z (empty without a gate)."""
    du, ddt, draw, dB_head, dC_head, dD, dh0, dz = gradient_buffers(u, dt, raw, B, D, z)
    z, z_stride = token_rows(z) if z is not None else (None, 0)
    fn = _kernel(kind, "backward", u.dtype)
    err = fn(*map(ptr, (u, dt, raw, B, C, D, saved, z, ypre if z is not None else None, dy, dhT, du, ddt, draw,
                         dB_head, dC_head, dD, dh0, dz if z is not None else None)),
             *_dims(u, B, bs, z_stride, kind, code, alpha))
    if err:
        raise ValueError(f"fused block scan backward: unsupported shapes (code {err})")
    G = B.shape[2]
    return [du, ddt, draw, sum_heads_per_group(dB_head, G), sum_heads_per_group(dC_head, G), dD, dh0, dz]


@block_scan_backward.register_fake
def _(u, dt, raw, B, C, D, saved, z, ypre, dy, dhT, bs, kind, code, alpha):
    return gradient_buffers(u, dt, raw, B, D, z, per_head=False)


register_scan_autograd(block_scan, block_scan_backward)


def selective_scan_fused_block(u, dt, A_raw, B, C, D, structure, method="bilinear", alpha=0.5, initial_state=None,
                               z=None):
    """The common scan signature (see `scan.py`) for `supports(structure, method)`."""
    code, al = method_id(method, alpha, structure)           # householder's signed decay: bit 1
    kind = kernel_kind(structure)
    args = [t.contiguous() for t in (u, dt, A_raw, B, C, D)]
    h0 = None if initial_state is None else initial_state.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*args, h0, z) if t is not None)
    if needs_grad or torch.compiler.is_compiling():
        y, hT, _, _ = block_scan(*args, h0, z, _size(structure), kind, code, al)
    else:
        y, hT, _, _ = _forward(*args, h0, z, _size(structure), kind, code, al, save=False)
    return y, hT
