"""The Householder-product structure (DeltaProduct): each factor is a reflection with the expected
spectrum, the transition never grows the state, and two reflections make an exact mod-3 counter
over a long word.  (Its scans against the dense reference, values and gradients, are in
test_scan.py.)"""

import math

import torch

from sparse_ssm.ssm.scan import selective_scan_chunked
from sparse_ssm.ssm.structures import HouseholderStructure

N = 5
UNIT_DECAY = -20.0          # rate exp(2 * -20) = e^-40: d = exp(-dt e^-40) = 1 to double precision
FULL_REFLECTION = 40.0      # beta = 2 sigmoid(40) = 2 to double precision


def raw_for(keys: torch.Tensor, logits: torch.Tensor, rate: float = UNIT_DECAY) -> torch.Tensor:
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
    raw = raw_for(keys, torch.full((L, 2), FULL_REFLECTION, dtype=torch.float64))[None, :, None]
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
