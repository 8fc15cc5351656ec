"""The Triton kernels of the block-diagonal (b = 2, 4, 8) and rotation scans, run by Triton's
interpreter on CPU tensors, against the sequential scan: values and gradients (fp64) over every
block size and discretisation, odd lengths across the kernels' chunks, initial and final state, the
gate, shared B/C groups, channel tiles, padded block counts, low-precision inputs (one ulp), a
model's loss and gradients, and the dispatcher's choice of path on a CUDA device."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu extra: pip install -e '.[gpu]')")

from triton_cases import (  # noqa: E402
    announcement, assert_both_paths_train_alike, assert_forward_matches, assert_gradcheck,
    assert_matches_the_sequential_scan, assert_within_one_ulp, fresh_dispatcher, inputs)
from sparse_ssm.ssm import triton as triton_scan  # noqa: E402
from sparse_ssm.ssm.scan import selective_scan_sequential  # noqa: E402
from sparse_ssm.ssm.structures import BlockStructure, RotationStructure  # noqa: E402
from sparse_ssm.ssm.triton import block  # noqa: E402

@pytest.fixture(autouse=True)
def _short_chunks(monkeypatch):
    """Checkpoints every 8 tokens and channel tiles of 4 (the fewest) for every structure below:
    the lengths and head sizes below cross chunk and tile boundaries at interpreter speed."""
    monkeypatch.setattr(block, "CHUNK", 8)
    monkeypatch.setattr(block, "STEP_ELEMENTS", 16)


# (b, L, H, P, structure, G, method, alpha, state, gate): every block size, odd lengths around the
# 8-token chunks, a single token, a block count that is not a power of two (12 / 4 = 3), heads
# over two and three channel tiles (P = 6, 10), heads sharing B/C and per-head B/C, rotation pairs
CASES = [
    (2, 13, 2, 3, BlockStructure(4, 2), 1, "zoh", 0.5, True, True),
    (1, 9, 2, 2, BlockStructure(12, 4), 2, "bilinear", 0.5, False, True),
    (1, 17, 2, 2, BlockStructure(16, 8), 1, "gbt", 0.25, True, False),
    (1, 5, 1, 10, BlockStructure(8, 8), 1, "zoh", 0.5, True, True),
    (1, 1, 2, 3, BlockStructure(8, 4), 2, "gbt", 1.0, False, False),
    (1, 10, 2, 6, RotationStructure(6), 1, "zoh", 0.5, True, True),
]


@pytest.mark.parametrize("b, L, H, P, structure, G, method, alpha, state, gate", CASES,
                         ids=lambda v: v.name if hasattr(v, "name") else None)
def test_forward_and_gradients_match_the_sequential_scan(b, L, H, P, structure, G, method, alpha, state, gate):
    xs = inputs(b, L, H, P, structure, G, state=state, gate=gate)
    assert_matches_the_sequential_scan(xs, structure, method, alpha)


def test_inference_without_gradients_matches_the_sequential_scan():
    """No input requires a gradient (generation, evaluation): the forward alone, no checkpoints."""
    structure = BlockStructure(16, 8)
    xs = inputs(2, 12, 2, 5, structure, 1)
    assert_forward_matches(selective_scan_sequential, xs, structure, "bilinear", 0.5)


def test_float64_gradcheck():
    structure = BlockStructure(4, 2)
    assert_gradcheck(inputs(1, 4, 1, 2, structure, 1, seed=3), structure, "bilinear", 0.5)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_low_precision_inputs_keep_a_float32_state_within_one_ulp(dtype, ulp):
    """bf16/fp16 inputs, fp32 operators and state: y and every gradient are the fp32 scan's on the
    same values, rounded once (one ulp of the dtype); the state is float32."""
    structure = BlockStructure(8, 4)
    xs = inputs(1, 11, 2, 3, structure, 1, dtype=dtype)
    assert_within_one_ulp(xs, structure, "zoh", dtype, ulp)


def test_the_dispatcher_takes_triton_on_cuda_for_blocks_of_2_4_8_only(monkeypatch, capsys):
    fresh_dispatcher(monkeypatch)
    cuda = torch.device("cuda")
    assert all(triton_scan.use_triton(cuda, s) for s in (BlockStructure(128, 8), BlockStructure(8, 2),
                                                         BlockStructure(16, 4), RotationStructure(4)))
    assert capsys.readouterr().err.splitlines() == [
        announcement(name) for name in ("block8", "block2", "block4", "rotation")]
    for other in (BlockStructure(32, 16),):
        assert not triton_scan.use_triton(cuda, other)
        assert f"chunked path for the {other.name!r} structure" in capsys.readouterr().err
        with pytest.raises(NotImplementedError, match="PyTorch path"):
            triton_scan.selective_scan_triton(*inputs(1, 3, 1, 2, other, 1)[:6], other, "zoh", 0.5)


def test_a_block_model_trains_through_the_triton_path_as_through_the_pytorch_path(monkeypatch):
    """The layer's real call with 4 x 4 blocks (z a view of the projection, a learned initial state
    expanded over the batch, two heads sharing B/C): same loss and parameter gradients whichever
    path the dispatcher picks (here told to pick Triton for CPU tensors, the interpreter's)."""
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    config = SparseSSMConfig(vocab_size=40, hidden_dim=16, state_dim=8, ffn_dim=0, num_layers=1, num_heads=2,
                             sparsity_level=0.5, learned_initial_state=True, dropout=0.0)
    model = SparseSSMForCausalLM(config).double()
    assert model.blocks[0].mixer.structure.name == "block4"
    ids = torch.randint(0, 40, (2, 11))
    assert_both_paths_train_alike(monkeypatch, model, ids)
