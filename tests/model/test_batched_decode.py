"""The native decoding step at many rows (concurrent streams) against the PyTorch step, for every
variant of the diagonal layer that the kernel (`ssm/kernels/layer_step.cpp`) takes."""

import pytest
import torch

from helpers import randomise_generators, requires_native_kernel
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

# every option the kernel implements: zoh / gbt / bilinear, the signed range, groups, the time-invariant
# generator, conv kernels 1 and 2; widths and state sizes that leave remainders in its vector loops
VARIANTS = [dict(), dict(eigenvalue_range="signed"), dict(discretization="gbt", gbt_alpha=0.25),
            dict(discretization="bilinear"), dict(num_groups=2), dict(selective=False), dict(conv_kernel=1),
            dict(conv_kernel=2), dict(hidden_dim=13, state_dim=6), dict(state_dim=19, num_heads=1)]


def model_of(**kw) -> SparseSSMForCausalLM:
    base = dict(vocab_size=97, hidden_dim=32, state_dim=16, ffn_dim=48, num_layers=2, max_seq_len=64, dropout=0.0,
                num_heads=2, selective_param_class="sparse", sparsity_level=0.9)
    return randomise_generators(SparseSSMForCausalLM(SparseSSMConfig(**{**base, **kw})).eval())


def decode(model, ids, prompt: int, native: bool):
    """Logits of every step after the prompt, by the native block step or operation by operation."""
    import sparse_ssm.model.layer as layer_module

    real_plan, real_layer = layer_module.block_step_plan, layer_module.decode_layer_step
    if not native:
        layer_module.block_step_plan = lambda *a: None
        layer_module.decode_layer_step = lambda *a: None
    try:
        _, cache = model.prefill(ids[:, :prompt])
        out = [model.step(ids[:, t], cache)[0] for t in range(prompt, ids.shape[1])]
        native_used = all(s.plan is not None for s in cache)
    finally:
        layer_module.block_step_plan, layer_module.decode_layer_step = real_plan, real_layer
    return torch.stack(out, 1), native_used


@requires_native_kernel()
@pytest.mark.parametrize("rows", [1, 2, 7, 9])
@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()) or "diagonal")
def test_the_native_step_of_many_rows_equals_the_pytorch_step(kw, rows):
    """Rows 7 and 9 take the kernel's tiles of several rows and their remainders (4 + 3, 4 + 4 + 1 with
    AVX-512; 3 + 3 + 1, 3 + 3 + 3 with AVX2); float32, each row's tokens and states its own."""
    torch.manual_seed(rows)
    model = model_of(**kw)
    ids = torch.randint(0, 97, (rows, 10))
    native, used = decode(model, ids, 4, native=True)
    reference, not_used = decode(model, ids, 4, native=False)
    assert used and not not_used
    assert torch.allclose(native, reference, atol=2e-5, rtol=2e-5)
