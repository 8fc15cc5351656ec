"""The Householder-product structure (DeltaProduct): each factor is a reflection with the expected
spectrum, the transition never grows the state, two reflections make an exact mod-3 counter over a
long word, and snapped factors are exact reflections.  (Its scans against the dense reference,
values and gradients, are in test_scan.py.)"""

import math

import pytest
import torch

from sparse_ssm.ssm.scan import selective_scan, selective_scan_chunked
from sparse_ssm.ssm.structures import HouseholderStructure
from sparse_ssm.ssm.structures.block import UNIT_MAGNITUDE_RAW
from sparse_ssm.ssm.structures.householder import EXACT_REFLECTION_LOGIT

N = 5


def raw_for(keys: torch.Tensor, logits: torch.Tensor, rate: float = UNIT_MAGNITUDE_RAW) -> torch.Tensor:
    """keys (..., r, N), logits (..., r) -> raw (..., N + r (N + 1))."""
    rates = torch.full((*keys.shape[:-2], keys.shape[-1]), rate, dtype=torch.float64)
    return torch.cat([rates, torch.cat([keys, logits[..., None]], -1).flatten(-2)], -1)


def transition(structure, raw, dt):
    (A_bar,), _ = structure.discretize(structure.continuous(raw), dt, torch.zeros(*dt.shape, N, dtype=raw.dtype), "zoh")
    return A_bar[..., 0, :, :]


def test_one_factor_is_a_reflection_of_strength_beta_along_its_key():
    g = torch.Generator().manual_seed(0)
    s = HouseholderStructure(N, 1)
    keys = torch.randn(4, 1, N, dtype=torch.float64, generator=g)
    logits = torch.randn(4, 1, dtype=torch.float64, generator=g)
    A_bar = transition(s, raw_for(keys, logits), torch.ones(4, dtype=torch.float64))
    beta = 2 * torch.sigmoid(logits[:, 0])
    k = keys[:, 0] / keys[:, 0].norm(dim=-1, keepdim=True)
    assert torch.allclose(A_bar @ k[..., None], (1 - beta)[:, None, None] * k[..., None], atol=1e-12)
    expected = torch.sort(torch.cat([(1 - beta)[:, None], torch.ones(4, N - 1, dtype=torch.float64)], -1)).values
    assert torch.allclose(torch.linalg.eigvalsh(A_bar), expected, atol=1e-12)


def test_the_transition_never_grows_the_state():
    """Spectral norm <= 1 for any raw values, large ones included (both reflections near -1)."""
    s = HouseholderStructure(N, 3)
    g = torch.Generator().manual_seed(1)
    raw = 6 * torch.randn(64, s.raw_size, dtype=torch.float64, generator=g)
    A_bar = transition(s, raw, torch.rand(64, dtype=torch.float64, generator=g) + 0.01)
    norms = torch.linalg.matrix_norm(A_bar, ord=2)
    assert (norms <= 1 + 1e-12).all()
    assert norms.max() > 0.999                                # the unit-norm directions are reached


def test_two_reflections_count_modulo_3_exactly_over_a_long_word():
    """Token k reflects across e_0, then across the line at angle pi k / 3: a rotation by 2 pi k / 3
    of states 0 and 1.  After 6,000 random tokens the state is still exactly at the angle of the
    running sum mod 3 (a rotation learnt to 1e-4 rad would be 0.2 rad off)."""
    s = HouseholderStructure(N, 2)
    L = 6000
    word = torch.randint(0, 3, (L,), generator=torch.Generator().manual_seed(0))
    keys = torch.zeros(L, 2, N, dtype=torch.float64)
    keys[:, 0, 1] = 1.0                                       # normal of the line e_0: e_1
    angle = math.pi * word.double() / 3
    keys[:, 1, 0], keys[:, 1, 1] = -torch.sin(angle), torch.cos(angle)   # normal of the line at angle pi k / 3
    raw = raw_for(keys, torch.full((L, 2), EXACT_REFLECTION_LOGIT, dtype=torch.float64))[None, :, None]
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
    X0 = zeros(1, 1, N, 1)
    X0[0, 0, 0, 0] = 1.0
    C = zeros(1, L, 1, N)
    C[..., 0] = 1.0                                           # read the cosine of the state's angle
    y, X = selective_scan_chunked(zeros(1, L, 1, 1), torch.ones(1, L, 1, dtype=torch.float64), raw, zeros(1, L, 1, N),
                                  C, zeros(1, L, 1), s, "zoh", initial_state=X0, chunk_size=64)
    # (zero input: y is C^T X alone)
    counts = word.cumsum(0) % 3
    assert torch.allclose(y[0, :, 0, 0], torch.cos(2 * math.pi * counts.double() / 3), atol=1e-9)
    final = 2 * math.pi * counts[-1].item() / 3
    assert torch.allclose(X[0, 0, :2, 0], torch.tensor([math.cos(final), math.sin(final)], dtype=torch.float64),
                          atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_snapped_factors_are_the_identity_or_exact_reflections_and_only_the_keys_learn(dtype):
    """`snap_to_grid` (`exact_reflections`): decay 1 and each eigenvalue 1 - beta exactly 1 or -1 by
    the sign of b, in float32 too, so the transition is orthogonal and a one-reflection step is the
    identity (b < 0) or an involution with eigenvalue -1 along its key (b > 0); the keys keep their
    gradients, the decays and betas get none; only the grid 2 exists for reflections."""
    s = HouseholderStructure(N, 1)
    g = torch.Generator().manual_seed(3)
    raw = (4 * torch.randn(6, 7, s.raw_size, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    dt = torch.rand(6, 7, generator=g, dtype=torch.float64).to(dtype) + 0.01
    snapped = s.snap_to_grid(raw, dt, 2)
    a, keys, beta = s.continuous(snapped)
    b = raw[..., -1]
    assert torch.equal(1 - beta[..., 0], torch.where(b > 0, -1.0, 1.0).to(dtype)) and (b > 0).any() and (b < 0).any()
    A_bar = transition(s, snapped.double(), dt.double())
    eye = torch.eye(N, dtype=torch.float64).expand_as(A_bar)
    assert torch.allclose(A_bar @ A_bar.transpose(-1, -2), eye, atol=1e-12)          # orthogonal ...
    assert torch.allclose(A_bar @ A_bar, eye, atol=1e-12)                            # ... an involution
    k = torch.nn.functional.normalize(keys[..., 0, :].double().detach(), dim=-1)[..., None]
    flipped = (b > 0).detach()
    assert torch.allclose((A_bar @ k)[flipped], -k[flipped], atol=1e-12)
    assert torch.allclose(A_bar[~flipped], eye[~flipped], atol=1e-15)                # (beta 8e-18)
    weights = torch.randn(raw.shape, generator=g, dtype=torch.float64).to(dtype)
    grad, = torch.autograd.grad((snapped * weights).sum(), raw)
    assert torch.equal(grad[..., N:-1], weights[..., N:-1])                          # keys
    assert (grad[..., :N] == 0).all() and (grad[..., -1] == 0).all()                # decays, betas
    with pytest.raises(ValueError, match="grid 2"):
        s.snap_to_grid(raw, dt, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_delta_writes_track_parity_exactly_from_a_zero_state_with_the_input_entering(dtype):
    """`reflection_input: delta`, one reflection along a fixed key, beta = 2 on a one and 0 on a zero,
    decay 1, every token's input x = 1: the state along the key is 2 x - s after a one and s after a
    zero, so it stays 0 or 2 (2 times the parity of the prefix; beta 8e-18 for "0") over 6,000
    tokens, to rounding that does not grow, in both scans (the dispatcher's: the kernel where it is
    built; and the chunked one); the same transitions with the input through B ('b') pile the inputs
    up instead (the state along the key reaches beyond 100)."""
    L = 6000
    bits = torch.randint(0, 2, (L,), generator=torch.Generator().manual_seed(0))
    keys = torch.zeros(L, 1, N, dtype=torch.float64)
    keys[:, 0, 2] = 1.0
    logits = torch.where(bits == 1, EXACT_REFLECTION_LOGIT, -EXACT_REFLECTION_LOGIT).double()[:, None]
    raw = raw_for(keys, logits)[None, :, None].to(dtype)
    ones = lambda *shape: torch.ones(*shape, dtype=dtype)
    C = torch.zeros(1, L, 1, N, dtype=dtype)
    C[..., 2] = 1.0                                           # read the state along the key
    args = (ones(1, L, 1, 1), ones(1, L, 1), raw, ones(1, L, 1, N), C, torch.zeros(1, L, 1, dtype=dtype))
    expected = 2 * (bits.cumsum(0) % 2).to(dtype)
    for scan in (selective_scan, lambda *a: selective_scan_chunked(*a, chunk_size=64)):
        y, _ = scan(*args, HouseholderStructure(N, 1, reflection_input="delta"), "zoh")
        assert torch.allclose(y[0, :, 0, 0], expected, atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)
        y_b, _ = scan(*args, HouseholderStructure(N, 1), "zoh")
        assert y_b[0, :, 0, 0].abs().max() > 100


def test_held_decays_leave_the_reflections_alone_and_need_delta_writes():
    """`reflection_decay: false` (`hold_decays`): whatever rates the generator gives, d = 1, so with
    every beta at 0 the transition is the identity (the same raw with decays: diag(d) < 1) and with
    one reflection it is exactly that reflection; without delta writes it is refused (inputs through
    B would add up without bound)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 1, N, dtype=torch.float64, generator=g)
    held, decaying = HouseholderStructure(N, 1, reflection_input="delta", decays=False), HouseholderStructure(N, 1)
    dt = torch.full((3,), 0.5, dtype=torch.float64)
    raw = raw_for(keys, torch.full((3, 1), -EXACT_REFLECTION_LOGIT, dtype=torch.float64), rate=1.0)
    assert torch.allclose(transition(held, held.hold_decays(raw), dt), torch.eye(N, dtype=torch.float64).expand(3, N, N),
                          atol=1e-15, rtol=0)
    assert transition(decaying, raw, dt).diagonal(dim1=-2, dim2=-1).max() < 0.9
    flip = raw_for(keys, torch.full((3, 1), EXACT_REFLECTION_LOGIT, dtype=torch.float64), rate=1.0)
    k = keys[:, 0] / keys[:, 0].norm(dim=-1, keepdim=True)
    reflection = torch.eye(N, dtype=torch.float64) - 2 * k[:, :, None] * k[:, None, :]
    assert torch.allclose(transition(held, held.hold_decays(flip), dt), reflection, atol=1e-12)
    with pytest.raises(ValueError, match="without decays needs reflection_input 'delta'"):
        HouseholderStructure(N, 1, decays=False)
