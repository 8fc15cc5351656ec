"""A model whose weights are bf16 or fp16: the matmuls run in that dtype, the conv, the scan and its
state stay float32; forward, prefill + step decoding, generate and the Hugging Face class.

Tolerance: bf16 keeps 8 significant bits (a relative rounding of 2^-9 = 0.2 %), fp16 11 bits
(2^-12); every linear map, norm and residual add of the two blocks rounds its output once, so the
logits carry a few tens of such roundings: 3 % of the logits' scale for bf16 (observed ~1 %),
0.5 % for fp16 (observed ~0.15 %).  A dtype mix in the layer raises instead of drifting."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import randomise_generators, tiny_language_model
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.generate import generate
from sparse_ssm.hf import export_model

TOLERANCE = {torch.bfloat16: 0.03, torch.float16: 0.005}
STRUCTURES = [dict(selective_param_class="sparse", sparsity_level=0.9),       # diagonal: the fused CPU paths
              dict(selective_param_class="sparse", sparsity_level=0.5),       # 4 x 4 blocks
              dict(selective_param_class="householder", low_rank_rank=2)]


def float32_model(**kw):
    torch.manual_seed(0)
    config = SparseSSMConfig(vocab_size=97, hidden_dim=32, state_dim=8, ffn_dim=48, num_layers=2, max_seq_len=64,
                             dropout=0.0, num_heads=2, scan_chunk_size=4, **kw)
    return randomise_generators(SparseSSMForCausalLM(config).eval())


def assert_close(low, reference, dtype):
    scale = reference.abs().max().item()
    error = (low.float() - reference).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{dtype}: max error {error:.4g} over scale {scale:.4g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", STRUCTURES, ids=["diagonal", "block4", "householder"])
def test_a_model_cast_to_low_precision_gives_the_float32_logits(kw, dtype):
    model = float32_model(**kw)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    reference = model(ids).logits
    low = copy.deepcopy(model).to(dtype)
    logits = low(ids).logits
    assert logits.dtype == dtype
    assert_close(logits, reference, dtype)
    layer = low.blocks[0].mixer
    assert layer.in_proj.weight.dtype == dtype and layer.conv.weight.dtype == dtype   # nothing cast back


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", STRUCTURES, ids=["diagonal", "block4", "householder"])
def test_a_low_precision_model_decodes_step_by_step_with_a_float32_state(kw, dtype):
    model = float32_model(**kw)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    reference = model(ids).logits
    low = copy.deepcopy(model).to(dtype)
    logits, cache = low.prefill(ids[:, :6])
    assert all(state.ssm.dtype == torch.float32 for state in cache)
    for t in range(6, 16):
        assert_close(logits, reference[:, t - 1], dtype)
        logits, cache = low.step(ids[:, t], cache)
    assert_close(logits, reference[:, -1], dtype)
    assert all(state.ssm.dtype == torch.float32 for state in cache)
    out = generate(low, ids[:, :4], max_new_tokens=8)
    assert out.shape == (2, 12)


def test_from_pretrained_in_bf16_runs_and_generates(tmp_path):
    model, tokenizer = tiny_language_model(seed=1)
    folder = export_model(model, tokenizer, tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert hf.model.blocks[0].mixer.in_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode("The quick brown fox").ids])
    assert_close(hf(ids).logits, model(ids).logits, torch.bfloat16)
    out = hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 6)
