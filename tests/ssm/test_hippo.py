"""HiPPO matrices against independent element-wise formulas, and the structure projections."""

import math

import numpy as np
import pytest
import torch

from sparse_ssm.ssm.hippo import (block_size_for, hippo, project_block_diagonal, project_contractive,
                                  project_diagonal, project_low_rank)


def legs_reference(N):
    """HiPPO-LegS as S4's `transition('legs', N)` builds it: A = T M T^-1 with M the LegS
    measure matrix (M[n, k] = -(2k+1) for n > k, -(n+1) on the diagonal), T = diag(sqrt(2n+1))."""
    M = np.zeros((N, N))
    for n in range(N):
        for k in range(N):
            if n > k:
                M[n, k] = -(2 * k + 1)
            elif n == k:
                M[n, k] = -(n + 1)
    T = np.diag(np.sqrt(2 * np.arange(N) + 1.0))
    return T @ M @ np.linalg.inv(T), np.sqrt(2 * np.arange(N) + 1.0)


def legt_reference(N):
    A = np.zeros((N, N))
    for n in range(N):
        for k in range(N):
            A[n, k] = -0.5 * math.sqrt((2 * n + 1) * (2 * k + 1)) * (1.0 if n >= k else (-1.0) ** (n - k))
    return A, 0.5 * np.sqrt(2 * np.arange(N) + 1.0)


def fourier_reference(N):
    freqs = np.arange(N // 2)
    d = np.stack([np.zeros(N // 2), freqs], axis=-1).reshape(-1)[1:]
    A = np.pi * (-np.diag(d, 1) + np.diag(d, -1))
    B = np.zeros(N)
    B[0::2] = math.sqrt(2)
    B[0] = 1.0
    return A - np.outer(B, B), B


@pytest.mark.parametrize("N", [1, 2, 5, 16, 64])
def test_legs_matches_reference_and_spectrum(N):
    A, B = hippo("legs", N)
    assert A.dtype == torch.float64 and A.shape == (N, N) and B.shape == (N,)
    A_ref, B_ref = legs_reference(N)
    np.testing.assert_allclose(A.numpy(), A_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(B.numpy(), B_ref, rtol=1e-12)
    eig = np.sort(np.linalg.eigvals(A.numpy()).real)
    np.testing.assert_allclose(eig, -np.arange(N, 0, -1.0), rtol=1e-8)


@pytest.mark.parametrize("N", [1, 4, 16, 33])
def test_legt_matches_reference_and_is_stable(N):
    A, B = hippo("legt", N)
    A_ref, B_ref = legt_reference(N)
    np.testing.assert_allclose(A.numpy(), A_ref, rtol=1e-12)
    np.testing.assert_allclose(B.numpy(), B_ref, rtol=1e-12)
    assert np.linalg.eigvals(A.numpy()).real.max() < 0


@pytest.mark.parametrize("N", [2, 8, 64])
def test_fourier_matches_reference(N):
    A, B = hippo("fourier", N)
    A_ref, B_ref = fourier_reference(N)
    np.testing.assert_allclose(A.numpy(), A_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(B.numpy(), B_ref, rtol=1e-12)
    # skew-symmetric rotations minus a rank-one PSD term: symmetric part is -B B^T <= 0
    sym = (A + A.T) / 2
    np.testing.assert_allclose(sym.numpy(), -np.outer(B_ref, B_ref), atol=1e-12)


def test_fourier_needs_even_state_dim_and_unknown_kind_fails():
    with pytest.raises(ValueError, match="even"):
        hippo("fourier", 5)
    with pytest.raises(ValueError, match="unknown hippo kind"):
        hippo("legx", 4)


def test_random_is_stable():
    A, _ = hippo("random", 12, generator=torch.Generator().manual_seed(3))
    assert torch.linalg.eigvalsh((A + A.T) / 2).max() < 0


@pytest.mark.parametrize("kind", ["legs", "legt", "fourier"])
@pytest.mark.parametrize("block", [1, 2, 4, 16])
def test_block_projection_is_contractive_and_idempotent(kind, block):
    A, _ = hippo(kind, 16)
    blocks = project_block_diagonal(A, block)
    assert blocks.shape == (16 // block, block, block)
    sym = (blocks + blocks.transpose(-1, -2)) / 2
    assert torch.linalg.eigvalsh(sym).max() <= -1e-3 + 1e-12
    assert torch.allclose(project_contractive(blocks), blocks, atol=1e-12)
    # the skew part of every block is kept exactly
    for i in range(16 // block):
        orig = A[i * block:(i + 1) * block, i * block:(i + 1) * block]
        assert torch.allclose(blocks[i] - blocks[i].T, orig - orig.T, atol=1e-12)


def test_contractive_projection_is_nearest():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64, generator=g)
    P = project_contractive(A)
    best = torch.linalg.norm(A - P)
    for _ in range(200):  # random points of the contractive set are never closer
        M = torch.randn(6, 6, dtype=torch.float64, generator=g)
        Q = project_contractive(P + 0.3 * M)
        assert torch.linalg.norm(A - Q) >= best - 1e-9


def test_diagonal_projection_of_legs_is_s4d_real():
    A, _ = hippo("legs", 8)
    assert torch.allclose(project_diagonal(A), -torch.arange(1.0, 9.0, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["legs", "legt", "fourier"])
def test_low_rank_projection_is_stable_and_improves_with_rank(kind):
    A, _ = hippo(kind, 16)
    errors = []
    for rank in (1, 2, 4, 8):
        lam, U, V = project_low_rank(A, rank)
        fit = torch.diag(lam) + U @ V.T
        sym = (fit + fit.T) / 2
        assert torch.linalg.eigvalsh(sym).max() < 0
        off = lambda M: M - torch.diag(torch.diagonal(M))
        errors.append(torch.linalg.norm(off(fit) - off(A)).item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_low_rank_projection_is_exact_for_stable_rank_r_matrices():
    g = torch.Generator().manual_seed(1)
    U = torch.zeros(10, 2, dtype=torch.float64)
    V = torch.zeros(10, 2, dtype=torch.float64)
    U[:5] = 0.1 * torch.randn(5, 2, dtype=torch.float64, generator=g)  # U V^T has an empty diagonal
    V[5:] = 0.1 * torch.randn(5, 2, dtype=torch.float64, generator=g)
    lam = -1.0 - torch.rand(10, dtype=torch.float64, generator=g)
    A = torch.diag(lam) + U @ V.T
    lam_fit, U_fit, V_fit = project_low_rank(A, 2)
    assert torch.allclose(U_fit @ V_fit.T, U @ V.T, atol=1e-12)
    assert torch.allclose(lam_fit, lam)  # the shift fits below these diagonal values


@pytest.mark.parametrize("N, level, expected", [(16, 0.9, 1), (16, 0.0, 16), (16, 0.5, 8), (64, 0.9, 4),
                                                (128, 0.9, 8), (12, 0.7, 3), (7, 0.5, 1)])
def test_block_size_for_sparsity_level(N, level, expected):
    b = block_size_for(N, level)
    assert b == expected and N % b == 0
    assert 1 - b / N >= level - 1e-12 or b == 1
