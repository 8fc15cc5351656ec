"""The native decoding step of the block family (block, dense, rotation, banded A: `ssm/kernels/layer_step.cpp`
with the operators of `block_ops.h`) against the pure-PyTorch step (the sequential scan's step, no native
kernel in the scan) and against the full forward: every structure and discretisation the step takes,
block sizes the kernel specialises (2, 4, 8) and generic ones (3, 5, 6), batch 1 and 3, float32 and float64."""

import ctypes

import pytest
import torch

from helpers import randomise_generators, requires_native_kernel
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.ssm import fused
from sparse_ssm.ssm.kernels import native_library
from sparse_ssm.ssm.structures import (BandedStructure, BlockStructure, DiagonalStructure, LowRankStructure,
                                       PermutationStructure, RotationStructure)

SPARSE, BANDED = dict(selective_param_class="sparse"), dict(selective_param_class="sparse", sparsity_pattern="banded")
# (name, config keys): the structure (its block size) and the discretisation; hidden 13 leaves remainders
# in the kernels' vector loops (head width P = 13), 9 heads in the step's vectors over heads (8 or 4 lanes)
CASES = [("block4-bilinear", dict(SPARSE, state_dim=8, sparsity_level=0.5)),
         ("block8-gbt", dict(SPARSE, state_dim=16, sparsity_level=0.5, discretization="gbt", gbt_alpha=0.25)),
         ("block6-bilinear-P13", dict(SPARSE, state_dim=12, sparsity_level=0.5, hidden_dim=13)),
         ("dense5-gbt-groups", dict(selective_param_class="dense", state_dim=5, discretization="gbt", gbt_alpha=0.7,
                                    num_groups=2)),
         ("block8-9heads-3groups", dict(SPARSE, state_dim=16, sparsity_level=0.5, hidden_dim=18, num_heads=9,
                                        num_groups=3)),
         ("banded2-bilinear", dict(BANDED, state_dim=8, sparsity_level=0.5)),
         ("banded4-9heads", dict(BANDED, state_dim=16, sparsity_level=0.5, hidden_dim=18, num_heads=9)),
         ("banded1-gbt-P13", dict(BANDED, state_dim=12, sparsity_level=0.7, discretization="gbt", gbt_alpha=0.25,
                                  hidden_dim=13)),
         ("rotation-zoh", dict(selective_param_class="rotation", state_dim=8)),
         ("rotation-bilinear-P13", dict(selective_param_class="rotation", state_dim=6, discretization="bilinear",
                                        hidden_dim=13)),
         ("rotation-gbt-lti", dict(selective_param_class="rotation", state_dim=8, discretization="gbt", gbt_alpha=0.3,
                                   selective=False))]


def pick(*names: str) -> list:
    return [pytest.param(*case, id=case[0]) for case in CASES if case[0] in names]


def model_of(dtype, **kw) -> SparseSSMForCausalLM:
    base = dict(vocab_size=97, hidden_dim=32, ffn_dim=0, num_layers=2, max_seq_len=64, dropout=0.0, num_heads=2)
    return randomise_generators(SparseSSMForCausalLM(SparseSSMConfig(**{**base, **kw})).to(dtype).eval())


def decode(model, ids, prompt: int, native: bool, monkeypatch):
    """Logits (b, steps, vocab) of every step after the prompt, and whether every layer's bound native
    step ran; native False: the native steps refused and the scan's step on the pure-PyTorch path."""
    import sparse_ssm.model.layer as layer_module

    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(layer_module, "block_step_plan", lambda *a: None)
            patch.setattr(layer_module, "decode_layer_step", lambda *a: None)
            patch.setattr(fused, "available", lambda *a, **k: False)
        _, cache = model.prefill(ids[:, :prompt])
        out = [model.step(ids[:, t], cache)[0] for t in range(prompt, ids.shape[1])]
    return torch.stack(out, 1), all(s.plan is not None for s in cache)


@requires_native_kernel()
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 3e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_the_native_step_of_a_structured_layer_equals_the_pytorch_step_and_the_forward(name, kw, dtype, tol, rows,
                                                                                        monkeypatch):
    torch.manual_seed(rows)
    model = model_of(dtype, **kw)
    ids = torch.randint(0, 97, (rows, 11))
    native, used = decode(model, ids, 4, True, monkeypatch)
    reference, refused = decode(model, ids, 4, False, monkeypatch)
    assert used and not refused
    assert torch.allclose(native, reference, atol=tol, rtol=tol)
    assert torch.allclose(native, model(ids).logits[:, 4:], atol=tol, rtol=tol)


@requires_native_kernel()
@pytest.mark.parametrize("name,kw", pick("block4-bilinear", "banded2-bilinear", "rotation-zoh"))
def test_the_layer_step_between_the_projections_takes_the_structures_too(name, kw, monkeypatch):
    """`decode_layer_step` (one native call between in_proj and out_proj: the path of a model whose block
    step is refused) decodes as the forward."""
    import sparse_ssm.model.layer as layer_module

    calls = []
    real = layer_module.decode_layer_step
    monkeypatch.setattr(layer_module, "block_step_plan", lambda *a: None)
    monkeypatch.setattr(layer_module, "decode_layer_step", lambda *a: calls.append(real(*a)) or calls[-1])
    model = model_of(torch.float64, **kw)
    ids = torch.randint(0, 97, (2, 9))
    logits, _ = decode(model, ids, 3, True, monkeypatch)
    assert len(calls) == 6 * 2 and all(y is not None for y in calls)
    assert torch.allclose(logits, model(ids).logits[:, 3:], atol=1e-10)


def test_the_step_code_names_the_structures_the_step_takes():
    assert fused.step_code("zoh", 0.5, DiagonalStructure(8)) == (0, 0.0)
    assert fused.step_code("bilinear", 0.5, DiagonalStructure(8, signed=True)) == (3, 0.5)
    assert fused.step_code("bilinear", 0.5, BlockStructure(16, 8)) == (1 | 1 << 2 | 8 << 8, 0.5)
    assert fused.step_code("gbt", 0.25, BandedStructure(12, 6)) == (1 | 3 << 2 | 6 << 8, 0.25)
    assert fused.step_code("zoh", 0.5, RotationStructure(8)) == (0 | 2 << 2 | 2 << 8, 0.0)
    assert fused.step_code("zoh", 0.5, BlockStructure(16, 8)) is None        # ZOH of a block: no kernel
    assert fused.step_code("bilinear", 0.5, LowRankStructure(8, 2)) is None
    assert fused.step_code("zoh", 0.5, PermutationStructure(8)) is None


@requires_native_kernel()
@pytest.mark.parametrize("code", [1 | 2 << 2 | 4 << 8,      # rotation blocks of 4
                                  0 | 1 << 2 | 4 << 8,      # ZOH of a block
                                  1 | 1 << 2 | 3 << 8,      # blocks of 3 in 8 states
                                  3 | 1 << 2 | 4 << 8,      # a signed range on a block
                                  1 | 4 << 2 | 4 << 8,      # no such structure
                                  1 | 1 << 8])              # a block size without a structure
def test_the_kernel_refuses_a_structure_code_it_does_not_take(code):
    """The C entry points check the code themselves (error 2), before any state is touched."""
    b, H, P, N, G, r, K = 1, 2, 4, 8, 1, 2, 4
    E, O, R = H * P, 2 * H + r + 2 * G * N, 8 * N
    t = {name: torch.zeros(*shape) for name, shape in dict(
        xz=(b, 2 * E), conv_state=(b, K - 1, E), conv_w=(E, K), conv_b=(E,), Wg=(O, E), dt_bias=(H,), Wa=(H * R, r),
        A_base=(H, R), D_base=(H,), ssm_state=(b, H, N, P), y=(b, E)).items()}
    state = t["ssm_state"].clone()
    args = [t[k].data_ptr() for k in ("xz", "conv_state", "conv_w", "conv_b", "Wg", "dt_bias", "Wa", "A_base", "D_base")]
    err = native_library().ssm_layer_step_f32(*args, None, t["ssm_state"].data_ptr(), t["y"].data_ptr(),
                                              b, E, H, P, N, G, r, K, code, ctypes.c_double(0.5), 1)
    assert err == 2 and torch.equal(t["ssm_state"], state)


@requires_native_kernel()
@pytest.mark.parametrize("name,kw", pick("block8-gbt", "banded4-9heads", "rotation-bilinear-P13"))
def test_the_int8_native_step_of_a_structured_layer_equals_the_int8_pytorch_step(name, kw, monkeypatch):
    """Weight-only int8 maps (`quantize_model`): the `_q8` block step with the structure's scan against
    the same int8 model operator by operator (tolerance as the diagonal's int8 test: activations rounded
    to int8 on either side of a boundary move a product by 1/127 of its row's largest value)."""
    from sparse_ssm.model.quantize import quantize_model

    torch.manual_seed(0)
    model = quantize_model(model_of(torch.float32, **kw))
    assert all(isinstance(blk.mixer.generator.decode_weights()["Wa"], tuple) for blk in model.blocks)   # int8 Wa
    ids = torch.randint(0, 97, (3, 10))
    native, used = decode(model, ids, 4, True, monkeypatch)
    reference, refused = decode(model, ids, 4, False, monkeypatch)
    assert used and not refused
    assert torch.allclose(native, reference, atol=2e-2, rtol=0)


@requires_native_kernel()
@pytest.mark.parametrize("name,kw", pick("block8-gbt"))
def test_the_int8_step_takes_a_float_a_map(name, kw, monkeypatch):
    """int8 projections with the generator's A map Wa left float32 (the `_q8` step's float Wa): the
    native step against the same model operator by operator."""
    from sparse_ssm.model.quantize import quantize_model

    torch.manual_seed(1)
    model = model_of(torch.float32, **kw)
    maps = [blk.mixer.generator.a_up for blk in model.blocks]
    model = quantize_model(model)
    for blk, a_up in zip(model.blocks, maps):
        blk.mixer.generator.a_up = a_up
    assert all(isinstance(blk.mixer.generator.decode_weights()["Wa"], torch.Tensor) for blk in model.blocks)
    ids = torch.randint(0, 97, (2, 9))
    native, used = decode(model, ids, 4, True, monkeypatch)
    reference, refused = decode(model, ids, 4, False, monkeypatch)
    assert used and not refused
    assert torch.allclose(native, reference, atol=1e-4, rtol=1e-4)
