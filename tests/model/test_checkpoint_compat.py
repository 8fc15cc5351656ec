"""Checkpoints written before the package redesign still load: the fixture was written by the
previous layout (see tests/fixtures/checkpoint_v0/README.md), with the logits it gave."""

import shutil

import torch
from safetensors.torch import load_file

from helpers import FIXTURES

from sparse_ssm.config import Config
from sparse_ssm.generate import load_checkpoint
from sparse_ssm.model.checkpoint import load_model, load_model_config

FIXTURE = FIXTURES / "checkpoint_v0"


def test_a_checkpoint_of_the_previous_layout_gives_its_logits():
    expected = load_file(str(FIXTURE / "expected_logits.safetensors"))
    model = load_model(FIXTURE)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    # the same numbers up to float32 rounding (the scan that computes them may differ from the one that wrote them)
    assert torch.allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_the_previous_layout_generates_from_an_output_directory(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run / "checkpoints" / "step-00000002")
    (run / "latest").symlink_to("checkpoints/step-00000002")
    loaded = load_checkpoint(run, None, "cpu")
    ids = loaded.tokenizer.encode("The quick brown fox").ids
    assert ids and loaded.model.config.vocab_size == 300
    with torch.no_grad():
        assert loaded.model(torch.tensor([ids])).logits.shape == (1, len(ids), 300)


def test_keys_added_since_a_checkpoint_was_written_take_the_values_that_describe_it():
    """The fixture's config.yaml predates `weight_init` (its weights were initialised GPT-2 style);
    a config file a user writes without the key gets today's default."""
    assert "weight_init" not in (FIXTURE / "config.yaml").read_text()
    assert load_model_config(FIXTURE).weight_init == "gpt2"
    assert Config.load(FIXTURE / "config.yaml", saved=True).model.weight_init == "gpt2"
    assert Config.load(FIXTURE / "config.yaml").model.weight_init == "mamba"
