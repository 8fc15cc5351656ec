"""The Triton decoding step (`selective_state_update`: one launch per layer and token on CUDA), run on
CPU tensors under Triton's interpreter: the state advanced in place and y equal to the PyTorch step's
over several tokens, for the diagonal (both eigenvalue ranges), rotation, blocks of 2, 4, 8 and
Householder products, every discretisation, shared B/C groups, with and without the gate; and the
step's dispatch."""

import pytest
import torch
from triton_cases import fresh_dispatcher

from sparse_ssm.ssm import fused, scan
from sparse_ssm.ssm import triton as triton_scan
from sparse_ssm.ssm.structures import BlockStructure, DiagonalStructure, HouseholderStructure, PermutationStructure, RotationStructure

STRUCTURES = [DiagonalStructure(8), DiagonalStructure(8, signed=True), RotationStructure(8), BlockStructure(8, 2),
              BlockStructure(8, 4), BlockStructure(8, 8), HouseholderStructure(8, 1), HouseholderStructure(8, 3)]


def step_inputs(structure, b, H, P, G, dtype, gate, seed):
    """One token's (u, dt, A_raw, B, C, D, z) of `selective_scan_step`."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    N = structure.state_dim
    return (r(b, H, P), torch.nn.functional.softplus(r(b, H) - 1), 0.5 * r(b, H, structure.raw_size), r(b, G, N),
            r(b, G, N), r(b, H), r(b, H, P) if gate else None)


def decode(step, structure, method, b, H, P, G, dtype, gate, tokens=3):
    """y of `tokens` steps and the state after them, from the same random start."""
    state = torch.randn(b, H, structure.state_dim, P, generator=torch.Generator().manual_seed(9),
                        dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)
    ys = []
    for t in range(tokens):
        u, dt, A_raw, B, C, D, z = step_inputs(structure, b, H, P, G, dtype, gate, seed=t)
        ys.append(step(u, dt, A_raw, B, C, D, structure, method, 0.3, state, z))
    return torch.stack(ys), state


def pytorch_step(u, dt, A_raw, B, C, D, structure, method, alpha, state, z):
    """The sequential scan's step (the path off the kernels)."""
    y, new = scan.selective_scan_sequential(u[:, None], dt[:, None], A_raw[:, None], B[:, None], C[:, None],
                                            D[:, None], structure, method, alpha, state,
                                            None if z is None else z[:, None])
    state.copy_(new)
    return y[:, 0]


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
@pytest.mark.parametrize("method", ["zoh", "bilinear", "gbt"])
@pytest.mark.parametrize("b, H, P, G, gate", [(2, 2, 3, 1, True), (1, 4, 5, 2, False), (3, 2, 32, 2, True)])
def test_the_step_matches_the_pytorch_step(structure, method, b, H, P, G, gate):
    """fp32 inputs and state: y and the state after 3 tokens within fp32 round-off of the PyTorch step."""
    got = decode(triton_scan.selective_state_update, structure, method, b, H, P, G, torch.float32, gate)
    ref = decode(pytorch_step, structure, method, b, H, P, G, torch.float32, gate)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", [DiagonalStructure(8), BlockStructure(8, 4)], ids=lambda s: s.name)
def test_float64_steps_agree_to_round_off(structure):
    got = decode(triton_scan.selective_state_update, structure, "zoh", 2, 2, 3, 1, torch.float64, True)
    ref = decode(pytorch_step, structure, "zoh", 2, 2, 3, 1, torch.float64, True)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_the_decoding_step_dispatches_to_the_kernel(monkeypatch):
    """Where the scan dispatch picks Triton (CUDA; here told to for CPU tensors), `selective_scan_step`
    runs one `selective_state_update` for a covered structure with a float32 state, and the PyTorch
    step for the others (permutation) or for a state it cannot update in place (float64, not contiguous)."""
    fresh_dispatcher(monkeypatch)
    monkeypatch.setattr(fused, "available", lambda *a: False)
    monkeypatch.setattr(triton_scan, "use_triton", lambda device, structure: True)
    ran = []
    real = triton_scan.selective_state_update
    monkeypatch.setattr(triton_scan, "selective_state_update", lambda *a, **k: ran.append(a[6].name) or real(*a, **k))
    for structure in (BlockStructure(16, 8), PermutationStructure(8)):
        got = decode(scan.selective_scan_step, structure, "zoh", 2, 2, 3, 1, torch.float32, True)
        ref = decode(pytorch_step, structure, "zoh", 2, 2, 3, 1, torch.float32, True)
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert ran == ["block8"] * 3
    u, dt, A_raw, B, C, D, z = step_inputs(DiagonalStructure(8), 2, 2, 3, 1, torch.float32, True, seed=0)
    for state in (torch.zeros(2, 2, 8, 3, dtype=torch.float64), torch.zeros(2, 2, 3, 8).transpose(-1, -2)):
        scan.selective_scan_step(u, dt, A_raw, B, C, D, DiagonalStructure(8), "zoh", 0.5, state, z)
    assert ran == ["block8"] * 3
