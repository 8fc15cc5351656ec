"""The Triton kernels of the banded scan (blocks of 2, 4 and 8, the second partition shifted by half a
block), run by Triton's interpreter on CPU tensors, against the sequential scan (and the dense
reference): values and gradients (fp64) for every block size and discretisation, odd lengths across
the kernels' chunks, initial and final state, the gate, shared B/C groups, channel tiles, padded
block counts, low-precision inputs (one ulp), a model's loss and gradients, and the dispatcher."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu extra: pip install -e '.[gpu]')")

from triton_cases import (  # noqa: E402
    announcement, assert_both_paths_train_alike, assert_forward_matches, assert_gradcheck,
    assert_matches_the_sequential_scan, assert_within_one_ulp, fresh_dispatcher, inputs)
from sparse_ssm.ssm import triton as triton_scan  # noqa: E402
from sparse_ssm.ssm.scan import selective_scan_ref  # noqa: E402
from sparse_ssm.ssm.structures import BandedStructure  # noqa: E402
from sparse_ssm.ssm.triton import banded  # noqa: E402

@pytest.fixture(autouse=True)
def _short_chunks(monkeypatch):
    """Checkpoints every 8 tokens and channel tiles of 4 (the fewest): the lengths and head sizes
    below cross chunk and tile boundaries at interpreter speed."""
    monkeypatch.setattr(banded, "CHUNK", 8)
    monkeypatch.setattr(banded, "STEP_ELEMENTS", 16)


# (b, L, H, P, structure, G, method, alpha, state, gate): every block size, odd lengths around the
# 8-token chunks, a single token, block counts that are not powers of two (12 / 4 = 3 and 4 shifted
# blocks), heads over two and three channel tiles (P = 6, 10), heads sharing B/C and per-head B/C
CASES = [
    (2, 13, 2, 3, BandedStructure(4, 2), 1, "zoh", 0.5, True, True),
    (1, 9, 2, 6, BandedStructure(12, 4), 2, "bilinear", 0.5, False, True),
    (1, 17, 1, 2, BandedStructure(16, 8), 1, "gbt", 0.25, True, False),
    (1, 1, 2, 3, BandedStructure(8, 4), 2, "zoh", 0.5, False, False),
    (1, 7, 1, 10, BandedStructure(6, 2), 1, "bilinear", 0.5, True, True),
]


@pytest.mark.parametrize("b, L, H, P, structure, G, method, alpha, state, gate", CASES,
                         ids=lambda v: v.name if hasattr(v, "name") else None)
def test_forward_and_gradients_match_the_sequential_scan(b, L, H, P, structure, G, method, alpha, state, gate):
    xs = inputs(b, L, H, P, structure, G, state=state, gate=gate)
    assert_matches_the_sequential_scan(xs, structure, method, alpha)


def test_the_forward_matches_the_dense_reference():
    """The dense Lie-Trotter product of the two partitions' discretisations (`dense_discretize`)."""
    structure = BandedStructure(8, 4)
    xs = inputs(1, 10, 2, 3, structure, 1)
    assert_forward_matches(selective_scan_ref, xs, structure, "zoh", 0.5)


def test_float64_gradcheck():
    structure = BandedStructure(4, 2)
    assert_gradcheck(inputs(1, 4, 1, 2, structure, 1, seed=3), structure, "bilinear", 0.5)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_low_precision_inputs_keep_a_float32_state_within_one_ulp(dtype, ulp):
    """bf16/fp16 inputs, fp32 operators and state: y and every gradient are the fp32 scan's on the same
    values, rounded once (one ulp of the dtype); the state is float32."""
    structure = BandedStructure(8, 4)
    xs = inputs(1, 11, 2, 3, structure, 1, dtype=dtype)
    assert_within_one_ulp(xs, structure, "zoh", dtype, ulp)


def test_the_dispatcher_takes_triton_on_cuda_for_banded_blocks_of_2_4_8_only(monkeypatch, capsys):
    fresh_dispatcher(monkeypatch)
    cuda = torch.device("cuda")
    assert triton_scan.use_triton(cuda, BandedStructure(128, 8))
    assert capsys.readouterr().err.splitlines() == [announcement("banded4")]
    wide = BandedStructure(32, 16)
    assert not triton_scan.use_triton(cuda, wide)
    assert "chunked path for the 'banded8' structure" in capsys.readouterr().err
    with pytest.raises(NotImplementedError, match="PyTorch path"):
        triton_scan.selective_scan_triton(*inputs(1, 3, 1, 2, wide, 1)[:6], wide, "zoh", 0.5)


def test_a_banded_model_trains_through_the_triton_path_as_through_the_pytorch_path(monkeypatch):
    """The layer's real call with a band of 4 x 4 blocks (z a view of the projection, a learned
    initial state expanded over the batch, two heads sharing B/C): same loss and parameter gradients
    whichever path the dispatcher picks (here told to pick Triton for CPU tensors, the interpreter's)."""
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    config = SparseSSMConfig(vocab_size=40, hidden_dim=16, state_dim=8, ffn_dim=0, num_layers=1, num_heads=2,
                             sparsity_level=0.5, sparsity_pattern="banded", learned_initial_state=True, dropout=0.0)
    model = SparseSSMForCausalLM(config).double()
    assert model.blocks[0].mixer.structure.name == "banded2"
    monkeypatch.setattr(banded, "STEP_ELEMENTS", 4096)                # one channel tile: interpreter time
    ids = torch.randint(0, 40, (2, 11))
    assert_both_paths_train_alike(monkeypatch, model, ids)
