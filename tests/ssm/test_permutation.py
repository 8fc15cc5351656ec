"""The permutation-diagonal structure (PD-SSM): one-hot columns, l1 stability, the straight-through
gradient of its arg-max, and an automaton followed exactly over a long word.  (Its scans against the
dense reference, values and gradients, are in test_scan.py.)"""

import torch

from sparse_ssm.ssm.scan import selective_scan_chunked, selective_scan_sequential
from sparse_ssm.ssm.structures import PermutationStructure

N = 5


def random_raw(structure, *lead, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*lead, structure.raw_size, dtype=torch.float64, generator=g)


def test_each_column_holds_one_entry_the_diagonal_decay():
    s = PermutationStructure(N)
    raw = random_raw(s, 4, 3)
    dt = torch.rand(4, 3, dtype=torch.float64) + 0.01
    (A_bar,), _ = s.discretize(s.continuous(raw), dt, torch.zeros(4, 3, N, dtype=torch.float64), "zoh")
    A_bar = A_bar[..., 0, :, :]
    a, logits = s.continuous(raw)
    rows = logits.argmax(-1)                                             # the row each column moves to
    expected = torch.zeros_like(A_bar).scatter(-2, rows[..., None, :], torch.exp(dt[..., None] * a)[..., None, :])
    assert torch.equal(A_bar, expected)
    assert ((A_bar != 0).sum(-2) == 1).all()


def test_the_state_l1_norm_never_grows_without_input():
    s = PermutationStructure(N)
    b, L, H, P = 2, 40, 2, 3
    raw = random_raw(s, b, L, H, scale=3.0, seed=1)
    raw[..., :N] -= 4                                                    # slow decays: P dominates
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
    X0 = torch.randn(b, H, N, P, dtype=torch.float64)
    X = X0
    for t in range(L):
        _, X = selective_scan_sequential(zeros(b, 1, H, P), torch.full((b, 1, H), 0.1, dtype=torch.float64),
                                         raw[:, t:t + 1], zeros(b, 1, H, N), zeros(b, 1, H, N), zeros(b, 1, H), s,
                                         "zoh", initial_state=X)
        assert (X.abs().sum(-2) <= X0.abs().sum(-2) * (1 + 1e-12)).all()
    assert not torch.allclose(X.abs().sum(-2), X0.abs().sum(-2))         # merged states were added, not lost


def test_the_selection_gradient_is_the_column_softmax_chained_to_the_one_hot_forward():
    """Straight-through: d loss / d logits = J_softmax^T (d loss / d P at the hard P)."""
    s = PermutationStructure(N)
    logits = random_raw(s, 6)[:, N:].reshape(6, N, N).requires_grad_()
    weight = torch.randn(6, N, N, dtype=torch.float64)
    P = s.selection(logits)
    (P * weight).sum().backward()
    leaf = logits.detach().clone().requires_grad_()
    expected, = torch.autograd.grad(leaf.softmax(-1).transpose(-1, -2), leaf, grad_outputs=weight)
    assert torch.allclose(logits.grad, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(P.detach(), torch.nn.functional.one_hot(logits.argmax(-1), N).transpose(-1, -2).double())


def counter_raw(structure, word, m):
    """Raw parameters that count the word's sum modulo m: token k moves state j < m to (j + k) mod m,
    the rest stay; decay rates of e^-40 (|d| = 1 to double precision)."""
    n = structure.state_dim
    logits = torch.zeros(len(word), n, n, dtype=torch.float64)
    for t, k in enumerate(word.tolist()):
        target = [(j + k) % m if j < m else j for j in range(n)]
        logits[t, range(n), target] = 5.0
    rates = torch.full((len(word), n), -20.0, dtype=torch.float64)
    return torch.cat([rates, logits.reshape(len(word), -1)], -1)


def test_a_counter_modulo_3_stays_exact_over_a_long_word():
    """The structure follows an automaton exactly: after 6,000 random tokens the state is still the
    one-hot code of the running sum mod 3 (a rotation by 2 pi / 3 learnt to 1e-4 would be 0.6 rad off)."""
    s = PermutationStructure(N)
    g = torch.Generator().manual_seed(0)
    L = 6000
    word = torch.randint(0, 3, (L,), generator=g)
    raw = counter_raw(s, word, 3)[None, :, None]                         # (1, L, 1, raw)
    u = torch.zeros(1, L, 1, 1, dtype=torch.float64)
    u[0, 0] = 1.0                                                         # inject e_0 at the first token only
    B = torch.zeros(1, L, 1, N, dtype=torch.float64)
    B[0, 0, 0, 0] = 1.0
    C = torch.zeros(1, L, 1, N, dtype=torch.float64)
    C[..., 1] = 1.0                                                      # read: is the count 1 (mod 3)?
    dt = torch.ones(1, L, 1, dtype=torch.float64)
    y, X = selective_scan_chunked(u, dt, raw, B, C, torch.zeros(1, L, 1, dtype=torch.float64), s, "zoh",
                                  chunk_size=64)
    counts = (word.cumsum(0) - word[0]) % 3                               # the first token's B_bar u enters after its move
    # ZOH: B_bar = expm1(dt a) / a B = dt B for a -> 0, so the injected mass is 1
    assert torch.equal(y[0, :, 0, 0].round(), (counts == 1).double())
    assert torch.allclose(X[0, 0, :3, 0], torch.nn.functional.one_hot(counts[-1], 3).double(), atol=1e-12)
