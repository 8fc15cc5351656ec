"""Stable parameterisations of the selective state matrix, their costs, and a rotation pair that
counts modulo 3 exactly."""

import math

import pytest
import torch

from sparse_ssm.ssm.hippo import hippo, project_block_diagonal, project_low_rank
from sparse_ssm.ssm.structures import (BandedStructure, BlockStructure, DiagonalStructure, LowRankStructure,
                                       RotationStructure, make_structure)
from sparse_ssm.ssm.structures.block import UNIT_MAGNITUDE_RAW

STRUCTURES = [DiagonalStructure(8), BlockStructure(8, 2), BlockStructure(8, 8), BandedStructure(8, 2),
              BandedStructure(8, 4), LowRankStructure(8, 2)]


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
def test_any_raw_vector_gives_a_stable_matrix(structure):
    raw = torch.randn(200, structure.raw_size, dtype=torch.float64)
    A = structure.to_dense(structure.continuous(raw))
    sym = (A + A.transpose(-1, -2)) / 2
    assert torch.linalg.eigvalsh(sym).max() < 0          # contractive, hence stable
    assert torch.linalg.eigvals(A).real.max() < 0


@pytest.mark.parametrize("kind", ["legs", "legt", "fourier"])
@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.name)
def test_base_parameters_represent_the_hippo_projection(kind, structure):
    A_hippo, _ = hippo(kind, 8)
    A = structure.to_dense(structure.continuous(structure.raw_from_hippo(A_hippo)))
    if isinstance(structure, LowRankStructure):
        lam, U, V = project_low_rank(A_hippo, structure.rank)
        expected = torch.diag(lam) + U @ V.T
    elif isinstance(structure, BandedStructure):
        # the band of A, split over the two partitions, each block projected: exact on the band
        # where the projection changes nothing, always stable and confined to the pattern
        idx = torch.arange(8)
        band = (idx[:, None] - idx[None, :]).abs() <= structure.shift
        assert torch.all(A[~band & ((idx[:, None] - idx[None, :]).abs() >= structure.block_size)] == 0)
        sym = (A + A.T) / 2
        assert torch.linalg.eigvalsh(sym).max() < 0
        return
    else:
        expected = BlockStructure(8, structure.block_size).to_dense(project_block_diagonal(A_hippo, structure.block_size))
    assert torch.allclose(A, expected, atol=1e-10)


def test_block_size_one_is_the_diagonal_case():
    raw = torch.randn(5, 8, dtype=torch.float64)
    assert torch.allclose(BlockStructure(8, 1).to_dense(BlockStructure(8, 1).continuous(raw)),
                          DiagonalStructure(8).to_dense(DiagonalStructure(8).continuous(raw)))


def test_make_structure_follows_the_config():
    assert isinstance(make_structure("sparse", 16, 0.9), DiagonalStructure)
    assert make_structure("sparse", 64, 0.9).block_size == 4
    assert make_structure("dense", 16).block_size == 16
    assert make_structure("low_rank", 16, low_rank_rank=3).rank == 3
    with pytest.raises(ValueError):
        make_structure("banded-ish", 16)


def test_cost_follows_structure():
    """Raw parameters and the apply cost scale with the number of nonzeros, not with N^2."""
    N, P = 64, 64
    dense, block, diag, lowrank = (BlockStructure(N, N), BlockStructure(N, 4), DiagonalStructure(N),
                                   LowRankStructure(N, 2))
    assert (dense.raw_size, block.raw_size, diag.raw_size) == (N * N, N * 4, N)
    assert lowrank.raw_size == N * 5
    flops = [s.flops_per_token(P)["apply"] for s in (dense, block, diag)]
    assert flops == [2 * N * N * P, 2 * N * 4 * P, 2 * N * P]
    assert lowrank.flops_per_token(P)["apply"] < dense.flops_per_token(P)["apply"] / 4
    # the operator of the block structure stores only its blocks
    A = block.continuous(torch.randn(2, block.raw_size))
    (op,), _ = block.discretize(A, torch.full((2,), 0.1), torch.randn(2, N), "zoh")
    assert op.numel() == 2 * N * 4


def test_banded_pattern_covers_the_band():
    structure = BandedStructure(12, 4)
    A = structure.to_dense(structure.continuous(torch.randn(structure.raw_size, dtype=torch.float64)))
    idx = torch.arange(12)
    dist = (idx[:, None] - idx[None, :]).abs()
    assert torch.all(A[dist <= 2] != 0)          # half-bandwidth b // 2 is fully covered
    assert torch.all(A[dist >= 4] == 0)          # nothing outside distance b - 1
    assert make_structure("sparse", 16, 0.5, sparsity_pattern="banded").name == "banded4"
    assert isinstance(make_structure("sparse", 16, 0.9, sparsity_pattern="banded"), DiagonalStructure)


@pytest.mark.parametrize("N, b", [(8, 2), (8, 4), (12, 4), (12, 6)])
def test_banded_structure_holds_a_contractive_banded_matrix_exactly(N, b):
    """A matrix on the banded pattern (b x b blocks and the blocks shifted by h = b // 2) whose two
    parts are already contractive comes back unchanged, every value on the band."""
    structure, h = BandedStructure(N, b), b // 2
    idx = torch.arange(N)
    same_block = lambda offset: ((idx[:, None] + offset) // b) == ((idx[None, :] + offset) // b)
    pattern = same_block(0) | same_block(b - h)
    g = torch.Generator().manual_seed(N * b)
    A = torch.where(pattern, 0.2 * torch.randn(N, N, generator=g, dtype=torch.float64), 0.0)
    A = A - 6 * torch.eye(N, dtype=torch.float64)                 # diagonally dominant: every part contractive
    got = structure.to_dense(structure.continuous(structure.raw_from_hippo(A)))
    assert torch.allclose(got, A, atol=1e-10)


def test_structures_refuse_sizes_they_cannot_hold():
    from sparse_ssm import ConfigError, SparseSSMConfig

    for rank in (0, 9):
        with pytest.raises(ValueError, match=rf"low-rank rank must be in \[1, 8\], got {rank}"):
            LowRankStructure(8, rank)
    for block in (1, 3, 16):
        with pytest.raises(ValueError, match=f"banded needs a block size >= 2 that divides state_dim 8, got {block}"):
            BandedStructure(8, block)
    with pytest.raises(ValueError, match="block_size 3 does not divide state_dim 8"):
        BlockStructure(8, 3)
    with pytest.raises(ValueError, match="unknown sparsity_pattern 'diagonal'"):
        make_structure("sparse", 16, 0.5, sparsity_pattern="diagonal")
    with pytest.raises(ConfigError, match=r"model\.sparsity_pattern: 'diagonal' is not one of"):
        SparseSSMConfig.from_dict({"sparsity_pattern": "diagonal"})


def rotation_counter(word: torch.Tensor, turn_error: float = 0.0, grid: int = 0, use_parallel_scan: bool = True):
    """The state (L, 2) of one rotation pair with no decay (UNIT_MAGNITUDE_RAW: lambda = e^-40) fed
    the same input c = (1, 0) at every token and turned by dt_t * w = 2 pi k / 3 * (1 + turn_error)
    for token k (turns snapped to multiples of 2 pi / grid first when grid > 0), and the state of the
    exact counter (L, 2)."""
    from sparse_ssm.ssm.scan import selective_scan

    s, w, L = RotationStructure(2), 3.0, len(word)
    dt = (2 * math.pi / 3 / w * (1 + turn_error) * word).float()[None, :, None]   # (1, L, 1): token 0 is dt = 0
    raw = torch.tensor([UNIT_MAGNITUDE_RAW, w]).expand(1, L, 1, 2)
    if grid:
        raw = s.snap_to_grid(raw, dt, grid)
    u = torch.ones(1, L, 1, 1)
    B = torch.tensor([1.0, 0.0]).expand(1, L, 1, 2)                       # c = (1, 0): p = -A^-1 c = (0, 1/w)
    C = torch.tensor([1.0, 0.0]).expand(1, L, 1, 2)                       # read h_0 ...
    y0, _ = selective_scan(u, dt, raw, B, C, torch.zeros(1, L, 1), s, "zoh", use_parallel_scan=use_parallel_scan)
    y1, _ = selective_scan(u, dt, raw, B, C.flip(-1), torch.zeros(1, L, 1), s, "zoh",
                           use_parallel_scan=use_parallel_scan)                         # ... and h_1
    phase = 2 * math.pi / 3 * (word.cumsum(0) % 3).double()
    expected = torch.stack([torch.sin(phase), 1 - torch.cos(phase)], -1) / w       # p - R(phase) p
    return torch.stack([y0[0, :, 0, 0], y1[0, :, 0, 0]], -1).double(), expected


@pytest.mark.parametrize("use_parallel_scan", [True, False])
def test_a_rotation_pair_counts_modulo_3_from_a_zero_state_without_a_start_token(use_parallel_scan):
    """The solution the one-layer rotation model learns (`rotation_shallow`): a pair with no decay
    turned by 2 pi k / 3 for token k, and the same input c at every token.  ZOH integrates
    dh/dt = A h + c exactly, a rotation about the fixed point p = -A^-1 c, so from h = 0 the state is
    p - R(2 pi s_t / 3) p with s_t the running sum: one of three points, mod 3, at any length (fused
    and sequential paths, float32, 4,000 tokens)."""
    word = torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(0))
    got, expected = rotation_counter(word, use_parallel_scan=use_parallel_scan)
    assert torch.allclose(got, expected, atol=1e-3)                      # the three points are 0.58 apart


@pytest.mark.parametrize("use_parallel_scan", [True, False])
def test_turns_snapped_to_a_grid_keep_an_imprecise_counter_on_three_points(use_parallel_scan):
    """The counter above with every turn 0.5% off: over 4,000 tokens its state drifts off any three
    points; with the turns snapped to multiples of 2 pi / 60 (`rotation_angle_grid`) it stays on three,
    one per value of the running sum mod 3 (those of a circle 0.5% larger: ZOH's fixed point -A^-1 c
    follows the snapped w)."""
    word = torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(1))
    count = word.cumsum(0) % 3

    def spread(states):          # the largest distance of a state from the mean of its count's states
        return max((states[count == k] - states[count == k].mean(0)).norm(dim=-1).max() for k in range(3))
    drifting, _ = rotation_counter(word, turn_error=0.005, use_parallel_scan=use_parallel_scan)
    assert spread(drifting) > 0.3
    snapped, _ = rotation_counter(word, turn_error=0.005, grid=60, use_parallel_scan=use_parallel_scan)
    assert spread(snapped) < 1e-3                                        # the three points are 0.58 apart


def test_snap_to_grid_makes_each_pair_an_element_of_the_cyclic_group_with_the_identity_gradient_on_turns():
    """Every snapped pair's turn is the nearest multiple of 2 pi / K and its magnitude is 1, so its
    ZOH transition exp(dt A) is an orthogonal matrix whose K-th power is the identity; the turns keep
    the identity's gradient (straight-through), the decays get none."""
    s, grid = RotationStructure(8), 12
    g = torch.Generator().manual_seed(0)
    raw = (4 * torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)).requires_grad_()
    dt = torch.rand(2, 5, 3, generator=g, dtype=torch.float64)
    dt[0, 1] = 0                                                         # the scan's padding steps
    snapped = s.snap_to_grid(raw, dt, grid)
    assert (snapped[..., 0::2] == UNIT_MAGNITUDE_RAW).all()
    w, w_snapped, step = raw[..., 1::2], snapped[..., 1::2], dt[..., None]
    turns = step * w_snapped / (2 * math.pi / grid)
    moving = (step > 0).expand_as(turns)
    assert torch.allclose(turns[moving], turns[moving].round(), atol=1e-9)        # whole grid steps ...
    assert ((step * (w_snapped - w)).abs()[moving] <= math.pi / grid + 1e-9).all()  # ... the nearest one
    assert torch.equal(w_snapped[~moving], w[~moving])
    A_bar = torch.linalg.matrix_exp(dt[..., None, None, None] * s.continuous(snapped.detach()))   # (2, 5, 3, 4, 2, 2)
    eye = torch.eye(2, dtype=torch.float64).expand_as(A_bar)
    assert torch.allclose(A_bar @ A_bar.transpose(-1, -2), eye, atol=1e-12)        # magnitude 1 ...
    assert torch.allclose(torch.linalg.matrix_power(A_bar, grid), eye, atol=1e-9)  # ... and in Z_K
    weights = torch.randn(raw.shape, generator=g, dtype=torch.float64)
    grad, = torch.autograd.grad((snapped * weights).sum(), raw)
    assert torch.equal(grad[..., 1::2], weights[..., 1::2])              # straight-through turns
    assert (grad[..., 0::2] == 0).all()                                  # frozen decays
