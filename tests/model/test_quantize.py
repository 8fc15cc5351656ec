"""Weight-only int8 (`model.quantize`): the matmul within its error bound, a quantised model's logits
and decoding, and loading a checkpoint as int8 without a float copy of the quantised maps."""

import copy

import pytest
import torch
import torch.nn as nn

from helpers import randomise_generators, tiny_language_model, write_checkpoint
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.model.checkpoint import load_model
from sparse_ssm.util.errors import CheckpointError
from sparse_ssm.model.quantize import Int8Embedding, Int8Linear, quantize_model, quantize_rows

BF16_ROUNDING = 2.0 ** -8          # relative rounding of a bf16 value is at most 2^-9; twice that for margin


# below 64 rows the native int8 product, or without it torch's int8 kernel (inner sizes a multiple of 16)
# or a cast of the weight; from 64 rows on, a bf16 GEMM
@pytest.mark.parametrize("inner, rows", [(64, 3), (30, 3), (64, 30)], ids=["int8-kernel", "int8-cast", "bf16-gemm"])
def test_int8_matmul_is_within_the_quantisation_error_bound(inner, rows):
    torch.manual_seed(0)
    weight, x = torch.randn(40, inner), torch.randn(5, rows, inner)
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and ((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all()
    y, exact = Int8Linear(q, scales)(x), x @ weight.T
    # each weight is off by at most scale / 2; bf16 activations and output round by 2^-9 relative
    bound = (scales / 2) * x.abs().sum(-1, keepdim=True) + BF16_ROUNDING * (x.abs() @ weight.abs().T + exact.abs())
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert ((y - exact).abs() <= bound).all()
    assert (y - exact).abs().max() > 0                                       # really quantised


def tiny(**kw):
    torch.manual_seed(0)
    config = SparseSSMConfig(vocab_size=97, hidden_dim=32, state_dim=8, ffn_dim=48, num_layers=2, max_seq_len=64,
                             dropout=0.0, num_heads=2, scan_chunk_size=4, **kw)
    return randomise_generators(SparseSSMForCausalLM(config).eval())


@pytest.mark.parametrize("kw", [dict(selective_param_class="sparse", sparsity_level=0.9),
                                dict(selective_param_class="sparse", sparsity_level=0.5, tie_embeddings=False)],
                         ids=["diagonal-tied", "block4-untied"])
def test_an_int8_model_gives_the_float32_logits_and_decodes(kw):
    model = tiny(**kw)
    int8 = quantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in int8.modules())
    if model.config.tie_embeddings:
        assert int8.embed.qweight is int8.lm_head.qweight                     # one int8 table for both
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    reference, logits = model(ids).logits, int8(ids).logits
    # weights off by <= 1/254 of their row's largest: a few % of the logits' scale after two blocks
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()
    last, cache = int8.prefill(ids[:, :8])
    for t in range(8, 16):
        last, cache = int8.step(ids[:, t], cache)
    assert torch.allclose(last, logits[:, -1], atol=1e-4)                     # the recurrent path = the parallel one
    loss = int8(ids, labels=ids, return_logits=False)
    assert loss.logits is None and abs(loss.loss - model(ids, labels=ids).loss) < 0.05


@pytest.mark.parametrize("tied", [True, False])
def test_loading_a_checkpoint_as_int8_builds_no_float_copy(tmp_path, tied):
    model, tokenizer = tiny_language_model(seed=1, tie_embeddings=tied)
    folder = write_checkpoint(tmp_path / "ckpt", model, tokenizer)
    int8 = load_model(folder, weights="int8")
    tensors = list(int8.parameters()) + list(int8.buffers())
    assert not any(t.is_meta for t in tensors)
    float_sizes = {t.numel() for t in tensors if t.is_floating_point() and t.dim() == 2}
    assert model.blocks[0].mixer.in_proj.weight.numel() not in float_sizes   # no float in_proj weight anywhere
    assert isinstance(int8.embed, Int8Embedding)
    ids = torch.tensor([tokenizer.encode("The quick brown fox").ids])
    assert torch.equal(int8(ids).logits, quantize_model(copy.deepcopy(model))(ids).logits)
    assert load_model(folder, weights="bf16").blocks[0].mixer.in_proj.weight.dtype == torch.bfloat16


def test_a_damaged_checkpoint_is_refused_when_loaded_as_int8(tmp_path):
    model, tokenizer = tiny_language_model(seed=1)
    folder = write_checkpoint(tmp_path / "ckpt", model, tokenizer)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])                               # truncated
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_model(folder, weights="int8")
    with torch.no_grad():
        model.blocks[1].mixer.out_proj.weight[0, 0] = float("nan")
    write_checkpoint(folder, model, tokenizer)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        load_model(folder, weights="int8")
