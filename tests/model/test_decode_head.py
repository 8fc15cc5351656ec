"""A decoding step's LM head (`SparseSSMForCausalLM.head_rows`): the native few-rows kernel where it
applies, the nn.Linear head (its reference) otherwise; the step's logits the same either way."""

import copy

import pytest
import torch

from helpers import requires_native_kernel, tiny_language_model
from sparse_ssm.model import lm
from sparse_ssm.model.quantize import quantize_model
from sparse_ssm.ssm.kernels import lm_head_rows


@requires_native_kernel()
@pytest.mark.parametrize("dtype, batch", [(torch.float32, 1), (torch.float32, 3), (torch.float32, 8),
                                          (torch.float64, 3), (torch.bfloat16, 1), (torch.bfloat16, 4)])
def test_a_decoding_step_with_the_head_kernel_gives_the_nn_linear_heads_logits(monkeypatch, dtype, batch):
    model, _ = tiny_language_model(seed=2)
    model = model.to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch, 6), generator=torch.Generator().manual_seed(batch))
    _, cache = model.prefill(ids[:, :-1])
    calls = []
    monkeypatch.setattr(lm, "lm_head_rows", lambda h, w: calls.append(h.shape) or lm_head_rows(h, w))
    got, _ = model.step(ids[:, -1], copy.deepcopy(cache))
    assert calls == [(batch, model.config.hidden_dim)]
    monkeypatch.setattr(lm, "lm_head_rows", lambda h, w: None)                # the reference: nn.Linear
    expected, _ = model.step(ids[:, -1], cache)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(got.double(), expected.double(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("batch", [9, 16])
def test_larger_batches_and_int8_heads_take_the_modules_head(monkeypatch, batch):
    model, _ = tiny_language_model(seed=2)
    monkeypatch.setattr(lm, "lm_head_rows", lambda h, w: pytest.fail("the kernel was asked"))
    h = torch.randn(batch, model.config.hidden_dim)
    assert torch.equal(model.head_rows(h), model.lm_head(h))
    int8 = quantize_model(model)
    assert torch.equal(int8.head_rows(h[:2]), int8.lm_head(h[:2]))
