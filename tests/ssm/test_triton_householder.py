"""The Triton kernels of the Householder-product scan (DeltaProduct, r reflections per token), run by
Triton's interpreter on CPU tensors, against the sequential scan (and the dense reference): values
and gradients (fp64) for 1, 2 and 4 reflections and every discretisation, odd lengths across the
kernels' chunks, initial and final state, the gate, shared B/C groups, channel tiles, exact
reflections, low-precision inputs (one ulp), a model's loss and gradients, and the dispatcher."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu extra: pip install -e '.[gpu]')")

import triton_cases  # noqa: E402
from triton_cases import (  # noqa: E402
    announcement, assert_both_paths_train_alike, assert_forward_matches, assert_gradcheck,
    assert_matches_the_sequential_scan, assert_within_one_ulp, fresh_dispatcher)
from sparse_ssm.ssm import triton as triton_scan  # noqa: E402
from sparse_ssm.ssm.scan import selective_scan_ref  # noqa: E402
from sparse_ssm.ssm.structures import HouseholderStructure  # noqa: E402
from sparse_ssm.ssm.triton import householder  # noqa: E402


@pytest.fixture(autouse=True)
def _short_chunks(monkeypatch):
    """Checkpoints every 8 tokens and channel tiles of 4: the lengths and head sizes below cross
    chunk and tile boundaries at interpreter speed."""
    monkeypatch.setattr(householder, "CHUNK", 8)
    monkeypatch.setattr(householder, "STATE_ELEMENTS", 16)
    monkeypatch.setattr(householder, "MIN_TILE", 4)


def inputs(*args, **kwargs):
    """triton_cases.inputs with strong reflections (b ~ N(0, 1))."""
    return triton_cases.inputs(*args, raw_scale=1.0, **kwargs)


# (b, L, H, P, reflections, N, G, method, alpha, state, gate): one, two and four reflections, odd
# lengths around the 8-token chunks, a single token, a state size that is not a power of two (6),
# heads over two and three channel tiles (P = 6, 10), heads sharing B/C and per-head B/C
CASES = [
    (2, 13, 2, 3, 1, 4, 1, "zoh", 0.5, True, True),
    (1, 9, 2, 6, 2, 6, 2, "bilinear", 0.5, False, True),
    (1, 17, 1, 2, 2, 4, 1, "zoh", 0.5, True, False),
    (1, 1, 2, 3, 1, 8, 2, "gbt", 0.25, False, False),
    (1, 7, 1, 10, 4, 4, 1, "zoh", 0.5, True, True),
]


@pytest.mark.parametrize("b, L, H, P, reflections, N, G, method, alpha, state, gate", CASES)
def test_forward_and_gradients_match_the_sequential_scan(b, L, H, P, reflections, N, G, method, alpha, state, gate):
    structure = HouseholderStructure(N, reflections)
    xs = inputs(b, L, H, P, structure, G, state=state, gate=gate)
    assert_matches_the_sequential_scan(xs, structure, method, alpha)


@pytest.mark.parametrize("reflection_input", ["delta", "both"])
def test_delta_writes_match_the_sequential_scan(reflection_input):
    """The delta writes reach the kernels through B_bar (`HouseholderStructure.factors`)."""
    structure = HouseholderStructure(6, 2, reflection_input=reflection_input)
    xs = inputs(1, 11, 2, 3, structure, 1, gate=True)
    assert_matches_the_sequential_scan(xs, structure, "zoh", 0.5)


def test_the_forward_matches_the_dense_reference():
    """The textbook matrices (`dense_discretize`: I - beta k k^T / k^T k times the dense discretisation)."""
    structure = HouseholderStructure(4, 2)
    xs = inputs(1, 10, 2, 3, structure, 1)
    assert_forward_matches(selective_scan_ref, xs, structure, "zoh", 0.5)


def test_exact_reflections_keep_the_state_norm_and_match():
    """Snapped raw parameters (beta 0 or 2, decay 1): every A_bar_t orthogonal.  Without input the
    state's norm per channel is kept over 40 tokens, and values and gradients match the sequential scan."""
    structure = HouseholderStructure(4, 2)
    xs = inputs(1, 40, 1, 3, structure, 1, gate=False)
    xs[2] = structure.snap_to_grid(xs[2], xs[1], 2)
    assert_matches_the_sequential_scan(xs, structure, "zoh", 0.5)
    silent = [xs[0] * 0, *xs[1:]]
    _, h = triton_scan.selective_scan_triton(*silent[:6], structure, "zoh", 0.5, silent[6], None)
    torch.testing.assert_close(h.norm(dim=2), xs[6].norm(dim=2), rtol=1e-12, atol=1e-12)


def test_float64_gradcheck():
    structure = HouseholderStructure(3, 2)
    assert_gradcheck(inputs(1, 4, 1, 2, structure, 1, seed=3), structure, "bilinear", 0.5)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_low_precision_inputs_keep_a_float32_state_within_one_ulp(dtype, ulp):
    """bf16/fp16 inputs, fp32 factors and state: y and every gradient are the fp32 scan's on the same
    values, rounded once (one ulp of the dtype); the state is float32."""
    structure = HouseholderStructure(4, 2)
    xs = inputs(1, 11, 2, 3, structure, 1, dtype=dtype)
    assert_within_one_ulp(xs, structure, "zoh", dtype, ulp)


def test_the_dispatcher_takes_triton_on_cuda_for_householder(monkeypatch, capsys):
    fresh_dispatcher(monkeypatch)
    assert triton_scan.use_triton(torch.device("cuda"), HouseholderStructure(16, 2))
    assert capsys.readouterr().err.splitlines() == [announcement("householder2")]


def test_a_householder_model_trains_through_the_triton_path_as_through_the_pytorch_path(monkeypatch):
    """The layer's real call with two reflections per token (z a view of the projection, a learned
    initial state expanded over the batch, two heads sharing B/C): same loss and parameter gradients
    whichever path the dispatcher picks (here told to pick Triton for CPU tensors, the interpreter's)."""
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    config = SparseSSMConfig(vocab_size=40, hidden_dim=16, state_dim=4, ffn_dim=0, num_layers=1, num_heads=2,
                             selective_param_class="householder", low_rank_rank=2, learned_initial_state=True,
                             dropout=0.0)
    model = SparseSSMForCausalLM(config).double()
    assert model.blocks[0].mixer.structure.name == "householder2"
    monkeypatch.setattr(householder, "STATE_ELEMENTS", 2048)          # one channel tile: interpreter time
    ids = torch.randint(0, 40, (2, 11))
    assert_both_paths_train_alike(monkeypatch, model, ids)
