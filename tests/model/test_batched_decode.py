"""The native decoding step at many rows (concurrent streams) against the PyTorch step, for every
variant of the diagonal layer and of the FFN that the kernels (`ssm/kernels/layer_step.cpp`) take."""

import pytest
import torch

from helpers import randomise_generators, requires_native_kernel
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

# every option the kernel implements: zoh / gbt / bilinear, the signed range, groups, the time-invariant
# generator, conv kernels 1 and 2; widths and state sizes that leave remainders in its vector loops
# (hidden 50, FFN 70: a 64-float step of the one- and two-row products and a masked tail)
VARIANTS = [dict(), dict(eigenvalue_range="signed"), dict(discretization="gbt", gbt_alpha=0.25),
            dict(discretization="bilinear"), dict(num_groups=2), dict(selective=False), dict(conv_kernel=1),
            dict(conv_kernel=2), dict(hidden_dim=13, state_dim=6), dict(state_dim=19, num_heads=1),
            dict(activation="gelu_tanh"), dict(activation="silu", ffn_dim=37), dict(activation="relu"),
            dict(ffn_dim=0), dict(hidden_dim=50, ffn_dim=70)]


def model_of(**kw) -> SparseSSMForCausalLM:
    base = dict(vocab_size=97, hidden_dim=32, state_dim=16, ffn_dim=48, num_layers=2, max_seq_len=64, dropout=0.0,
                num_heads=2, selective_param_class="sparse", sparsity_level=0.9)
    return randomise_generators(SparseSSMForCausalLM(SparseSSMConfig(**{**base, **kw})).eval())


def decode(model, ids, prompt: int, native: bool):
    """Logits of every step after the prompt, by the native block and FFN steps or operation by
    operation; and how many native FFN steps ran."""
    import sparse_ssm.model.block as block_module
    import sparse_ssm.model.layer as layer_module

    real = layer_module.block_step_plan, layer_module.decode_layer_step, block_module.decode_ffn
    ffn_calls = []

    def counted_ffn(*a):
        out = real[2](*a)
        ffn_calls.append(out is not None)
        return out
    block_module.decode_ffn = counted_ffn
    if not native:
        layer_module.block_step_plan = lambda *a: None
        layer_module.decode_layer_step = lambda *a: None
        block_module.decode_ffn = lambda *a: None
    try:
        _, cache = model.prefill(ids[:, :prompt])
        out = [model.step(ids[:, t], cache)[0] for t in range(prompt, ids.shape[1])]
        native_used = all(s.plan is not None for s in cache)
    finally:
        layer_module.block_step_plan, layer_module.decode_layer_step, block_module.decode_ffn = real
    return torch.stack(out, 1), native_used, sum(ffn_calls)


@requires_native_kernel()
@pytest.mark.parametrize("rows", [1, 2, 7, 9])
@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()) or "diagonal")
def test_the_native_step_of_many_rows_equals_the_pytorch_step(kw, rows):
    """Rows 7 and 9 take the kernel's tiles of several rows and their remainders (4 + 3, 4 + 4 + 1 with
    AVX-512; 3 + 3 + 1, 3 + 3 + 3 with AVX2); float32, each row's tokens and states its own."""
    torch.manual_seed(rows)
    model = model_of(**kw)
    ids = torch.randint(0, 97, (rows, 10))
    native, used, ffn_steps = decode(model, ids, 4, native=True)
    reference, not_used, _ = decode(model, ids, 4, native=False)
    assert used and not not_used
    assert ffn_steps == (0 if kw.get("ffn_dim") == 0 else 6 * 2)          # 6 steps, 2 layers
    assert torch.allclose(native, reference, atol=2e-5, rtol=2e-5)


@requires_native_kernel()
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("kw", [dict(), dict(hidden_dim=13, state_dim=6), dict(activation="silu", ffn_dim=37),
                                dict(selective=False), dict(ffn_dim=0, num_groups=2)],
                         ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()) or "diagonal")
def test_the_int8_native_step_equals_the_int8_pytorch_step(kw, rows):
    """Weight-only int8 maps (`quantize_model`): the block and FFN steps with int8 weights (`_q8` kernels)
    against the same int8 model operator by operator (its Int8Linear maps); width 13 gives inner sizes
    13 and 26 (the int8 product's masked tails), FFN width 37 output rows not a multiple of 4."""
    from sparse_ssm.model.quantize import quantize_model

    torch.manual_seed(rows)
    model = quantize_model(model_of(**kw))
    ids = torch.randint(0, 97, (rows, 10))
    native, used, ffn_steps = decode(model, ids, 4, native=True)
    reference, not_used, _ = decode(model, ids, 4, native=False)
    assert used and not not_used
    assert ffn_steps == (0 if kw.get("ffn_dim") == 0 else 6 * 2)
    # the same int8 products, but of activations from differently ordered float arithmetic: one that lands
    # on the other side of an int8 rounding moves a product by 1/127 of its row's largest value times the
    # weight (up to ~7e-3 in these models, carried on through the later layers and steps); without such a
    # flip the two agree to ~1e-6
    assert torch.allclose(native, reference, atol=2e-2, rtol=0)
