"""Triton kernels of the selective scan (GPU; on CPU tensors under ``TRITON_INTERPRET=1``).

    selective_scan_triton(u, dt, A_raw, B, C, D, structure, method, alpha, initial_state=None, z=None)
        -> (y, final_state)

the shared scan signature of `sparse_ssm.ssm.scan` (shapes there).  The diagonal structure (positive
and signed eigenvalues, zoh / bilinear / gbt) runs a recurrent kernel, forward and backward
(`diagonal.py`); the other structures are not here yet and run on the PyTorch paths, where
`sparse_ssm.ssm.scan.selective_scan` sends them.  `triton` itself is imported on the first call,
so importing this package costs nothing on machines without it.
"""

from __future__ import annotations

import importlib.util

from ..structures import DiagonalStructure


def importable() -> bool:
    """Is the `triton` package installed (the `gpu` extra; the CUDA builds of torch bring it)?"""
    return importlib.util.find_spec("triton") is not None


def supports(structure) -> bool:
    """Does a Triton kernel cover this structure?"""
    return isinstance(structure, DiagonalStructure)


def selective_scan_triton(u, dt, A_raw, B, C, D, structure, method="zoh", alpha=0.5, initial_state=None, z=None):
    """The selective scan on the Triton kernels (the shared signature of `sparse_ssm.ssm.scan`)."""
    if not supports(structure):
        raise NotImplementedError(
            f"the Triton selective scan covers the diagonal structure only, not {structure.name!r}: that "
            f"structure runs on the PyTorch path (sparse_ssm.ssm.scan.selective_scan sends it there)")
    from .diagonal import diagonal_scan

    return diagonal_scan(u, dt, structure.continuous(A_raw), B, C, D, initial_state, z, method, alpha,
                         structure.signed)
