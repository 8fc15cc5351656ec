"""Loading a checkpoint into an uninitialised model a block of rows at a time (`model.weights_file`):
every weight format gives back the saved tensors, blocks of any size, tied or untied heads, and
damaged files are still refused with the checkpoint's errors."""

import pytest
import torch

from helpers import randomise_generators, tiny_language_model, write_checkpoint
from sparse_ssm.data.tokenizer import load_tokenizer
from sparse_ssm.model import weights_file
from sparse_ssm.model.checkpoint import load_model
from sparse_ssm.model.quantize import quantize_rows
from sparse_ssm.util.errors import CheckpointError


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def saved(request, tmp_path):
    model, tokenizer = tiny_language_model(seed=3, tie_embeddings=request.param)
    randomise_generators(model)
    return model, write_checkpoint(tmp_path / "ckpt", model, tokenizer)


@pytest.mark.parametrize("elements_at_once", [1 << 18, 7, 1])            # one block a tensor; odd blocks; a row a block
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_a_loaded_float_model_holds_the_saved_tensors(saved, monkeypatch, elements_at_once, weights):
    monkeypatch.setattr(weights_file, "ELEMENTS_AT_ONCE", elements_at_once)
    model, folder = saved
    loaded = load_model(folder, weights=weights)
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == dtype and torch.equal(got[name], tensor.to(dtype)), name
    assert (loaded.lm_head.weight is loaded.embed.weight) == model.config.tie_embeddings
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    if weights == "fp32":
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("elements_at_once", [1 << 18, 5])
def test_a_model_loaded_as_int8_holds_the_saved_tensors_quantised(saved, monkeypatch, elements_at_once):
    monkeypatch.setattr(weights_file, "ELEMENTS_AT_ONCE", elements_at_once)
    model, folder = saved
    loaded = load_model(folder, weights="int8")
    floats = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name.endswith(".qweight"):
            q, scales = quantize_rows(floats[name.replace(".qweight", ".weight")])
            assert torch.equal(tensor, q) and torch.equal(loaded.get_submodule(name[:-8]).scales, scales), name
        elif not name.endswith(".scales"):
            assert torch.equal(tensor, floats[name]), name


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
def test_a_damaged_weights_file_is_refused_in_every_format(saved, weights):
    model, folder = saved
    file = folder / "model.safetensors"
    good = file.read_bytes()
    file.write_bytes(good[:-100])                                                     # truncated
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_model(folder, weights=weights)
    file.write_bytes(b"\xff" * 8 + good[8:])                                          # a header size past the end
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_model(folder, weights=weights)
    with torch.no_grad():
        model.norm.weight[3] = float("inf")
    write_checkpoint(folder, model, load_tokenizer(folder / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="NaN or inf values in 1 tensor.*norm.weight"):
        load_model(folder, weights=weights)
