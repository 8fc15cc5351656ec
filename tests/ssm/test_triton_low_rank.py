"""The Triton kernels of the diagonal-plus-low-rank scan, run by Triton's interpreter on CPU tensors,
against the sequential scan (and the dense reference): values and gradients (fp64) for ranks 1, 2
and 3 and both discretisations (bilinear, gbt), odd lengths across the kernels' chunks, initial and
final state, the gate, shared B/C groups, channel tiles, low-precision inputs (one ulp), a model's
loss and gradients, and the dispatcher."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu extra: pip install -e '.[gpu]')")

from triton_cases import (  # noqa: E402
    announcement, assert_both_paths_train_alike, assert_forward_matches, assert_gradcheck,
    assert_matches_the_sequential_scan, assert_within_one_ulp, fresh_dispatcher, inputs)
from sparse_ssm.ssm import triton as triton_scan  # noqa: E402
from sparse_ssm.ssm.scan import selective_scan_ref  # noqa: E402
from sparse_ssm.ssm.structures import LowRankStructure  # noqa: E402
from sparse_ssm.ssm.triton import low_rank  # noqa: E402

@pytest.fixture(autouse=True)
def _short_chunks(monkeypatch):
    """Checkpoints every 8 tokens and channel tiles of 4: the lengths and head sizes below cross
    chunk and tile boundaries at interpreter speed."""
    monkeypatch.setattr(low_rank, "CHUNK", 8)
    monkeypatch.setattr(low_rank, "STATE_ELEMENTS", 16)
    monkeypatch.setattr(low_rank, "MIN_TILE", 4)


# (b, L, H, P, rank, N, G, method, alpha, state, gate): ranks 1, 2 and 3 (padded to 4 in the
# kernel), odd lengths around the 8-token chunks, a single token, a state size that is not a power
# of two (6), heads over two and three channel tiles (P = 6, 10), heads sharing B/C and per-head B/C
CASES = [
    (2, 13, 2, 3, 1, 4, 1, "bilinear", 0.5, True, True),
    (1, 9, 2, 6, 2, 6, 2, "gbt", 0.25, False, True),
    (1, 17, 1, 2, 3, 4, 1, "bilinear", 0.5, True, False),
    (1, 1, 2, 3, 1, 8, 2, "gbt", 1.0, False, False),
    (1, 7, 1, 10, 2, 4, 1, "bilinear", 0.5, True, True),
]


@pytest.mark.parametrize("b, L, H, P, rank, N, G, method, alpha, state, gate", CASES)
def test_forward_and_gradients_match_the_sequential_scan(b, L, H, P, rank, N, G, method, alpha, state, gate):
    structure = LowRankStructure(N, rank)
    xs = inputs(b, L, H, P, structure, G, state=state, gate=gate)
    assert_matches_the_sequential_scan(xs, structure, method, alpha)


def test_the_forward_matches_the_dense_reference():
    """The dense bilinear discretisation of diag(lam) + U V^T (`dense_discretize`)."""
    structure = LowRankStructure(4, 2)
    xs = inputs(1, 10, 2, 3, structure, 1)
    assert_forward_matches(selective_scan_ref, xs, structure, "bilinear", 0.5)


def test_zoh_is_refused_as_on_the_pytorch_paths():
    structure = LowRankStructure(4, 1)
    with pytest.raises(ValueError, match="bilinear' or 'gbt'"):
        triton_scan.selective_scan_triton(*inputs(1, 3, 1, 2, structure, 1)[:6], structure, "zoh", 0.5)


def test_float64_gradcheck():
    structure = LowRankStructure(3, 2)
    assert_gradcheck(inputs(1, 4, 1, 2, structure, 1, seed=3), structure, "gbt", 0.7)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_low_precision_inputs_keep_a_float32_state_within_one_ulp(dtype, ulp):
    """bf16/fp16 inputs, fp32 operators and state: y and every gradient are the fp32 scan's on the same
    values, rounded once (one ulp of the dtype); the state is float32."""
    structure = LowRankStructure(4, 2)
    xs = inputs(1, 11, 2, 3, structure, 1, dtype=dtype)
    assert_within_one_ulp(xs, structure, "bilinear", dtype, ulp)


def test_the_dispatcher_takes_triton_on_cuda_for_low_rank(monkeypatch, capsys):
    fresh_dispatcher(monkeypatch)
    assert triton_scan.use_triton(torch.device("cuda"), LowRankStructure(16, 2))
    assert capsys.readouterr().err.splitlines() == [announcement("lowrank2")]


def test_a_low_rank_model_trains_through_the_triton_path_as_through_the_pytorch_path(monkeypatch):
    """The layer's real call with a rank-2 A (z a view of the projection, a learned initial state
    expanded over the batch, two heads sharing B/C): same loss and parameter gradients whichever
    path the dispatcher picks (here told to pick Triton for CPU tensors, the interpreter's)."""
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    config = SparseSSMConfig(vocab_size=40, hidden_dim=16, state_dim=4, ffn_dim=0, num_layers=1, num_heads=2,
                             selective_param_class="low_rank", low_rank_rank=2, learned_initial_state=True,
                             dropout=0.0)
    model = SparseSSMForCausalLM(config).double()
    assert model.blocks[0].mixer.structure.name == "lowrank2"
    monkeypatch.setattr(low_rank, "STATE_ELEMENTS", 2048)             # one channel tile: interpreter time
    ids = torch.randint(0, 40, (2, 11))
    assert_both_paths_train_alike(monkeypatch, model, ids)
