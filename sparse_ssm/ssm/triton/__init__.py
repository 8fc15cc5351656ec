"""Triton kernels of the selective scan (GPU; on CPU tensors under ``TRITON_INTERPRET=1``).

    selective_scan_triton(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state=None, z=None)
        -> (y, final_state)

the shared scan signature of `sparse_ssm.ssm.scan` (shapes there).  Recurrent kernels, forward and
backward, one per structure:
- diagonal (positive and signed eigenvalues, zoh / bilinear / gbt; the discretisation inlined,
  `diagonal.py`);
- block-diagonal and rotation with blocks of 2, 4 or 8 states, a dense A of that many states
  included (zoh / bilinear / gbt; the per-token blocks discretised in PyTorch, `block.py`);
- householder products, any number of reflections per token (decay, keys and strengths from
  PyTorch, the reflections applied as rank-1 updates, `householder.py`);
- low-rank, diagonal plus U V^T (bilinear / gbt; its Woodbury form from PyTorch applied as two
  low-rank sweeps, `low_rank.py`);
- banded with blocks of 2, 4 or 8 (its two block-diagonal Lie-Trotter factors from PyTorch,
  `banded.py`);
- permutation-diagonal (selection and decay from PyTorch, the forward reading N destination rows
  per token, `permutation.py`).
Larger blocks and dense A run on the PyTorch paths, where `sparse_ssm.ssm.scan.selective_scan`
sends them.  Every structure's module prepares its operators and hands them, with its two launchers,
to the one autograd Function of `autograd.py`.

    selective_state_update(u, dt, A_raw, B, C, D, structure, method, alpha, state, z=None) -> y

is the decoding step (`sparse_ssm.ssm.scan.selective_scan_step`'s signature, the state advanced in
place): the forward kernel specialised to one token, one launch per layer and token, for the
diagonal, rotation, block (2, 4, 8) and householder structures (`state_update_fits`).  `triton` itself is imported on the first call, so importing this package costs
nothing on machines without it.

`use_triton(device, structure)` is the dispatcher's choice on a device: the Triton path on CUDA
where triton is importable and a kernel covers the structure, unless ``SPARSE_SSM_TRITON=0``; the
first time a choice is made for a reason, one line on stderr says which path runs and why.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from ..structures import (BandedStructure, BlockStructure, DiagonalStructure, HouseholderStructure, LowRankStructure,
                          PermutationStructure, RotationStructure)

BLOCK_SIZES = (2, 4, 8)    # the block kernel keeps each b x b block's product in registers


def importable() -> bool:
    """Is the `triton` package installed (the `gpu` extra; the CUDA builds of torch bring it)?"""
    return importlib.util.find_spec("triton") is not None


def supports(structure) -> bool:
    """Does a Triton kernel cover this structure?"""
    if isinstance(structure, (DiagonalStructure, HouseholderStructure, LowRankStructure, PermutationStructure)):
        return True
    blocked = (BlockStructure, RotationStructure, BandedStructure)
    return type(structure) in blocked and structure.block_size in BLOCK_SIZES


def state_update_fits(structure, u: torch.Tensor, state: torch.Tensor) -> bool:
    """Can `selective_state_update` advance this state: the diagonal, rotation, householder or a block
    structure of 2, 4 or 8 states, and a contiguous state in the kernels' state dtype (float32;
    float64 for float64 u)."""
    blocked = type(structure) in (BlockStructure, RotationStructure) and structure.block_size in BLOCK_SIZES
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    return ((isinstance(structure, (DiagonalStructure, HouseholderStructure)) or blocked) and state.is_contiguous()
            and state.dtype == state_dtype)


_announced: set[str] = set()


def _announce(line: str) -> None:
    if line not in _announced:
        _announced.add(line)
        print(f"sparse-ssm: {line}", file=sys.stderr, flush=True)


def use_triton(device: torch.device, structure) -> bool:
    """Does the selective scan on `device` take the Triton kernels?  Only CUDA devices do (CPUs have
    the fused native kernels and the PyTorch paths); announces the choice once per reason."""
    if device.type != "cuda":
        return False
    fallback = "the selective scan on CUDA runs on the pure-PyTorch chunked path"
    if os.environ.get("SPARSE_SSM_TRITON") == "0":
        _announce(f"{fallback} (SPARSE_SSM_TRITON=0)")
        return False
    if not importable():
        _announce(f"{fallback} (triton is not installed: pip install 'sparse-ssm[gpu]' for the Triton kernels)")
        return False
    if not supports(structure):
        _announce(f"{fallback} for the {structure.name!r} structure (its Triton kernel is not written yet)")
        return False
    _announce(f"the selective scan on CUDA runs on the Triton kernel of the {structure.name!r} structure")
    return True


def selective_scan_triton(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """The selective scan on the Triton kernels (the shared signature of `sparse_ssm.ssm.scan`)."""
    if not supports(structure):
        raise NotImplementedError(
            f"the Triton selective scan covers the diagonal, rotation, block ({BLOCK_SIZES}), householder, "
            f"low-rank, banded ({BLOCK_SIZES}) and permutation structures, not "
            f"{structure.name!r}: that structure runs on the PyTorch path (sparse_ssm.ssm.scan.selective_scan sends "
            f"it there)")
    if isinstance(structure, HouseholderStructure):
        from .householder import householder_scan

        return householder_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
    if isinstance(structure, LowRankStructure):
        from .low_rank import low_rank_scan

        return low_rank_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
    if isinstance(structure, PermutationStructure):
        from .permutation import permutation_scan

        return permutation_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
    if isinstance(structure, BandedStructure):
        from .banded import banded_scan

        return banded_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
    if not isinstance(structure, DiagonalStructure):
        from .block import block_scan

        return block_scan(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state, z)
    from .diagonal import diagonal_scan

    a = structure.continuous(A_raw if A_raw.dtype == torch.float64 else A_raw.float())   # not rounded to bf16
    return diagonal_scan(u, dt, a, B, C, D, initial_state, z, method, alpha, structure.signed)


def selective_state_update(u, dt, A_raw, B, C, D, structure, method, alpha, state, z=None):
    """One recurrent step in place on a Triton kernel (mamba_ssm's selective_state_update): the
    arguments of `sparse_ssm.ssm.scan.selective_scan_step` (u, z (b, H, P); dt, D (b, H); A_raw
    (b, H, raw_size); B, C (b, G, N); `state` (b, H, N, P), advanced in place), for the structures
    and states `state_update_fits` takes.  Returns y (b, H, P)."""
    if not state_update_fits(structure, u, state):
        raise NotImplementedError(
            f"the Triton decoding step covers the diagonal, rotation, householder and block ({BLOCK_SIZES}) structures with a "
            f"contiguous float32 state, not {structure.name!r} with a {state.dtype} state: "
            f"sparse_ssm.ssm.scan.selective_scan_step runs the others on the PyTorch path")
    if isinstance(structure, DiagonalStructure):
        from .diagonal import diagonal_state_update

        a = structure.continuous(A_raw if A_raw.dtype == torch.float64 else A_raw.float())
        return diagonal_state_update(u, dt, a, B, C, D, state, z, method, alpha, structure.signed)
    if isinstance(structure, HouseholderStructure):
        from .householder import householder_state_update

        return householder_state_update(u, dt, A_raw, B, C, D, structure, method, alpha, state, z)
    from .block import block_state_update

    return block_state_update(u, dt, A_raw, B, C, D, structure, method, alpha, state, z)
