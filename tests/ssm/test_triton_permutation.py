"""The Triton kernels of the permutation-diagonal scan (PD-SSM), run by Triton's interpreter on CPU
tensors, against the sequential scan (and the dense reference): values and gradients (fp64, the
straight-through selection's included) for every discretisation, odd lengths across the kernels'
chunks, initial and final state, the gate, shared B/C groups, channel tiles, states moved onto one
row, low-precision inputs (one ulp), a model's loss and gradients, and the dispatcher."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu extra: pip install -e '.[gpu]')")

import triton_cases  # noqa: E402
from triton_cases import (  # noqa: E402
    announcement, assert_both_paths_train_alike, assert_forward_matches, assert_matches_the_sequential_scan,
    assert_within_one_ulp, fresh_dispatcher)
from sparse_ssm.ssm import triton as triton_scan  # noqa: E402
from sparse_ssm.ssm.scan import selective_scan_ref  # noqa: E402
from sparse_ssm.ssm.structures import PermutationStructure  # noqa: E402
from sparse_ssm.ssm.triton import permutation  # noqa: E402


@pytest.fixture(autouse=True)
def _short_chunks(monkeypatch):
    """Checkpoints every 8 tokens and channel tiles of 4: the lengths and head sizes below cross
    chunk and tile boundaries at interpreter speed."""
    monkeypatch.setattr(permutation, "CHUNK", 8)
    monkeypatch.setattr(permutation, "STEP_ELEMENTS", 16)


def inputs(*args, **kwargs):
    """triton_cases.inputs with logits ~ 2 N(0, 1): every token moves states to other rows, some onto
    the same row."""
    return triton_cases.inputs(*args, raw_scale=2, **kwargs)


# (b, L, H, P, N, G, method, alpha, state, gate): odd lengths around the 8-token chunks, a single
# token, state sizes that are not powers of two (3, 6), heads over two and three channel tiles
# (P = 6, 10), heads sharing B/C and per-head B/C
CASES = [
    (2, 13, 2, 3, 4, 1, "zoh", 0.5, True, True),
    (1, 9, 2, 6, 6, 2, "bilinear", 0.5, False, True),
    (1, 17, 1, 2, 3, 1, "gbt", 0.25, True, False),
    (1, 1, 2, 3, 8, 2, "zoh", 0.5, False, False),
    (1, 7, 1, 10, 4, 1, "zoh", 0.5, True, True),
]


@pytest.mark.parametrize("b, L, H, P, N, G, method, alpha, state, gate", CASES)
def test_forward_and_gradients_match_the_sequential_scan(b, L, H, P, N, G, method, alpha, state, gate):
    structure = PermutationStructure(N)
    xs = inputs(b, L, H, P, structure, G, state=state, gate=gate)
    assert_matches_the_sequential_scan(xs, structure, method, alpha)


def test_the_forward_matches_the_dense_reference_and_merges_rows():
    """P @ the dense discretisation of diag(a) (`dense_discretize`); the inputs move two states onto
    one row somewhere (the arg-max is not a bijection)."""
    structure = PermutationStructure(4)
    xs = inputs(1, 10, 2, 3, structure, 1)
    P = structure.selection(structure.continuous(xs[2])[1])
    assert (P.sum(-1) > 1).any()
    assert_forward_matches(selective_scan_ref, xs, structure, "zoh", 0.5)


def test_float64_gradcheck_of_the_continuous_inputs():
    """The selection's arg-max is piecewise constant (gradcheck's finite differences of A_raw would see
    the straight-through estimate disagree): A_raw is checked against the sequential scan above."""
    structure = PermutationStructure(3)
    xs = inputs(1, 4, 1, 2, structure, 1, seed=3)
    A_raw = xs.pop(2)
    xs = [x.requires_grad_() for x in xs]
    fn = lambda u, dt, B, C, D, h0, z: triton_scan.selective_scan_triton(u, dt, A_raw, B, C, D, structure,
                                                                          "bilinear", 0.5, h0, z)
    assert torch.autograd.gradcheck(fn, xs, fast_mode=True)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)])
def test_low_precision_inputs_keep_a_float32_state_within_one_ulp(dtype, ulp):
    """bf16/fp16 inputs, fp32 factors and state: y and every gradient are the fp32 scan's on the same
    values, rounded once (one ulp of the dtype); the state is float32."""
    structure = PermutationStructure(4)
    xs = inputs(1, 11, 2, 3, structure, 1, dtype=dtype)
    assert_within_one_ulp(xs, structure, "zoh", dtype, ulp)


def test_the_dispatcher_takes_triton_on_cuda_for_permutation(monkeypatch, capsys):
    fresh_dispatcher(monkeypatch)
    assert triton_scan.use_triton(torch.device("cuda"), PermutationStructure(16))
    assert capsys.readouterr().err.splitlines() == [announcement("permutation")]


def test_a_permutation_model_trains_through_the_triton_path_as_through_the_pytorch_path(monkeypatch):
    """The layer's real call (z a view of the projection, a learned initial state expanded over the
    batch, two heads sharing B/C): same loss and parameter gradients whichever path the dispatcher
    picks (here told to pick Triton for CPU tensors, the interpreter's)."""
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    config = SparseSSMConfig(vocab_size=40, hidden_dim=16, state_dim=4, ffn_dim=0, num_layers=1, num_heads=2,
                             selective_param_class="permutation", learned_initial_state=True, dropout=0.0)
    model = SparseSSMForCausalLM(config).double()
    assert model.blocks[0].mixer.structure.name == "permutation"
    monkeypatch.setattr(permutation, "STEP_ELEMENTS", 4096)           # one channel tile: interpreter time
    ids = torch.randint(0, 40, (2, 11))
    assert_both_paths_train_alike(monkeypatch, model, ids)
