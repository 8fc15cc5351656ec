"""Discretisation against scipy.signal.cont2discrete, and each structured form against dense."""

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from sparse_ssm.ssm.discretization import discretize, discretize_diagonal, discretize_state_matrix
from sparse_ssm.ssm.hippo import hippo
from sparse_ssm.ssm.structures import BandedStructure, BlockStructure, DiagonalStructure, LowRankStructure

SCIPY = {"zoh": ("zoh", None), "bilinear": ("bilinear", None), "gbt0": ("gbt", 0.0), "gbt03": ("gbt", 0.3),
         "gbt1": ("gbt", 1.0)}


def scipy_discretize(A, B, dt, method, alpha):
    N = A.shape[0]
    C, D = np.eye(N), np.zeros((N, B.shape[1]))
    if method == "gbt":
        Ad, Bd, *_ = cont2discrete((A, B, C, D), dt, method="gbt", alpha=alpha)
    else:
        Ad, Bd, *_ = cont2discrete((A, B, C, D), dt, method=method)
    return Ad, Bd


@pytest.mark.parametrize("name", list(SCIPY))
@pytest.mark.parametrize("kind", ["legs", "legt", "fourier", "random"])
@pytest.mark.parametrize("dt", [1e-3, 0.05, 0.7])
def test_dense_matches_scipy(name, kind, dt):
    method, alpha = SCIPY[name]
    A, B = hippo(kind, 8, generator=torch.Generator().manual_seed(0))
    Ad, Bd = discretize(A, B, dt, method, alpha if alpha is not None else 0.5)
    Ad_ref, Bd_ref = scipy_discretize(A.numpy(), B.numpy()[:, None], dt, method, alpha)
    np.testing.assert_allclose(Ad.numpy(), Ad_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(discretize_state_matrix(A, dt, method, alpha if alpha is not None else 0.5).numpy(),
                               Ad_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(Bd.numpy(), Bd_ref[:, 0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["zoh", "bilinear", "gbt"])
def test_dense_is_batched_with_matrix_B_and_tensor_dt(method):
    g = torch.Generator().manual_seed(1)
    A = torch.stack([hippo(k, 6)[0] for k in ("legs", "legt", "fourier")])       # (3, 6, 6)
    B = torch.randn(3, 6, 2, dtype=torch.float64, generator=g)
    dt = torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64)
    Ad, Bd = discretize(A, B, dt, method, alpha=0.25)
    for i in range(3):
        ref = scipy_discretize(A[i].numpy(), B[i].numpy(), dt[i].item(), "gbt" if method == "gbt" else method,
                               0.25 if method == "gbt" else None)
        np.testing.assert_allclose(Ad[i].numpy(), ref[0], rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(Bd[i].numpy(), ref[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["bilinear", "gbt"])
def test_a_stable_methods_keep_the_spectrum_in_the_unit_disc(method):
    A, _ = hippo("legs", 16)
    for dt in (1e-3, 0.1, 10.0, 1000.0):
        Ad, _ = discretize(A, torch.ones(16, dtype=torch.float64), dt, method, alpha=0.75)
        assert torch.linalg.eigvals(Ad).abs().max() < 1


def _random_inputs(structure, lead=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = 0.5 * torch.randn(*lead, structure.raw_size, dtype=torch.float64, generator=g)
    dt = 0.02 + torch.rand(*lead, dtype=torch.float64, generator=g)
    B = torch.randn(*lead, structure.state_dim, dtype=torch.float64, generator=g)
    return structure.continuous(raw), dt, B


STRUCTURES = [DiagonalStructure(8), BlockStructure(8, 2), BlockStructure(8, 4), BlockStructure(8, 8),
              BandedStructure(8, 2), BandedStructure(8, 4), LowRankStructure(8, 1), LowRankStructure(8, 3)]


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
@pytest.mark.parametrize("method", ["zoh", "bilinear", "gbt"])
def test_structured_discretization_matches_dense(structure, method):
    if method == "zoh" and not structure.supports_zoh:
        with pytest.raises(ValueError, match="bilinear"):
            structure.discretize(*_random_inputs(structure), method)
        return
    A, dt, B = _random_inputs(structure)
    op, B_bar = structure.discretize(A, dt, B, method, alpha=0.3)
    A_dense_bar, B_dense_bar = structure.dense_discretize(A, dt, B, method, alpha=0.3)
    if not isinstance(structure, BandedStructure):   # dense_discretize is plain dense discretisation
        ref = discretize(structure.to_dense(A), B, dt, method, alpha=0.3)
        assert torch.allclose(A_dense_bar, ref[0]) and torch.allclose(B_dense_bar, ref[1])
    assert torch.allclose(B_bar, B_dense_bar, rtol=1e-10, atol=1e-12)
    X = torch.randn(3, 5, structure.state_dim, 4, dtype=torch.float64)
    assert torch.allclose(structure.apply(op, X), A_dense_bar @ X, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["zoh", "bilinear", "gbt"])
def test_diagonal_closed_form(method):
    a = -torch.rand(4, 6, dtype=torch.float64) * 5 - 0.01
    B = torch.randn(4, 6, dtype=torch.float64)
    dt = torch.rand(4, dtype=torch.float64)
    Ad, Bd = discretize_diagonal(a, B, dt, method, alpha=0.9)
    Ad_ref, Bd_ref = discretize(torch.diag_embed(a), B, dt, method, alpha=0.9)
    assert torch.allclose(torch.diag_embed(Ad), Ad_ref, atol=1e-12)
    assert torch.allclose(Bd, Bd_ref, atol=1e-12)


def test_bad_method_and_alpha():
    A, B = hippo("legs", 4)
    with pytest.raises(ValueError, match="unknown discretization"):
        discretize(A, B, 0.1, "euler")
    with pytest.raises(ValueError, match="alpha"):
        discretize(A, B, 0.1, "gbt", alpha=1.5)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_banded_splitting_is_first_order_accurate(method):
    """The banded operator D(A1) D(A0) differs from the exact discretisation of A0 + A1 by O(dt^2)."""
    structure = BandedStructure(8, 4)
    A, _, _ = _random_inputs(structure, lead=(1,), seed=3)
    dense = structure.to_dense(A)
    B = torch.randn(1, 8, dtype=torch.float64)
    errors = []
    for dt in (0.1, 0.05, 0.025):
        dt_t = torch.full((1,), dt, dtype=torch.float64)
        split, _ = structure.dense_discretize(A, dt_t, B, method)
        exact, _ = discretize(dense, B, dt_t, method)
        errors.append(torch.linalg.norm(split - exact).item())
    assert errors[0] > 0
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0      # halving dt quarters the error
