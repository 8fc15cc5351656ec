"""Extreme sizes fail fast: the memory a config needs is estimated before anything is allocated
(inspect, train, loading a checkpoint, the Hugging Face class) and refused with the estimate and
the memory available; the default config's 140M-parameter model passes on a 24 GiB machine."""

import time

import pytest
import yaml

from helpers import tiny_language_model, write_checkpoint
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM, cli
from sparse_ssm.config import Config
from sparse_ssm.model import memory
from sparse_ssm.model.memory import MemoryNeed, parameter_count
from sparse_ssm.train import Trainer
from sparse_ssm.util.errors import ConfigError

GIB = 1024 ** 3


@pytest.fixture
def machine_of_24_gib(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: (24 * GIB, "a 24 GiB machine"))


@pytest.mark.parametrize("model", [{}, {"ffn_dim": 0, "tie_embeddings": False}, {"selective": False, "num_groups": 2},
                                   {"selective_param_class": "rotation", "rotation_angle_grid": 4,
                                    "learned_initial_state": True},
                                   *({"selective_param_class": c} for c in ("dense", "low_rank", "permutation",
                                                                            "householder")),
                                   {"sparsity_pattern": "banded", "state_dim": 16, "sparsity_level": 0.5},
                                   {"selective_param_class": "householder", "num_layers": 3, "structured_layers": [-1]}])
def test_the_parameter_count_from_the_config_is_the_models(model):
    config = SparseSSMConfig(**{**dict(vocab_size=300, hidden_dim=32, state_dim=8, ffn_dim=32, num_layers=2,
                                       num_heads=2), **model})
    assert parameter_count(config) == SparseSSMForCausalLM(config).num_parameters()


def test_the_default_config_fits_a_24_gib_machine_for_inspect_and_training(machine_of_24_gib):
    config = Config.load("config/default_config.yaml")
    tc = config.training
    assert 139e6 < parameter_count(config.model) < 141e6
    MemoryNeed.inference(config.model, tokens=256).check("inspect", "cpu", "")
    MemoryNeed.training(config.model, tc.batch_size, config.dataset.max_seq_len, tc.gradient_checkpointing,
                        tc.mixed_precision != "no").check("training", "cpu", "")


@pytest.mark.parametrize("model", ["hidden_dim: 20000", "hidden_dim: 1000000000", "num_layers: 1000000"])
def test_inspect_refuses_an_absurd_model_before_allocating_it(model, machine_of_24_gib, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"model:\n  {model}\n")
    start = time.perf_counter()
    assert cli.main(["inspect", "--config", str(tmp_path / "c.yaml")]) == 2
    assert time.perf_counter() - start < 2
    err = capsys.readouterr().err
    assert "inspect of the model of" in err and "GiB of float32 weights), but a 24 GiB machine has 24.0 GiB " \
                                               "available; lower model.hidden_dim" in err


def test_training_refuses_a_step_that_cannot_fit(tiny, tmp_path, machine_of_24_gib):
    config = tiny(tmp_path / "out", model={"hidden_dim": 20000})
    with pytest.raises(ConfigError, match=r"training needs at least .* GiB of weights, gradients and AdamW states; "
                                          r"activations of 4 x 32 tokens.*24\.0 GiB available; lower"):
        Trainer(config, log=lambda *_: None)


def test_a_checkpoint_whose_config_is_absurd_is_refused_before_building_it(tmp_path, machine_of_24_gib, capsys):
    model, tokenizer = tiny_language_model()
    folder = write_checkpoint(tmp_path / "ckpt", model, tokenizer)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["model"]["num_layers"] = 10 ** 6
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    assert cli.main(["generate", "--model-dir", str(tmp_path), "--checkpoint", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {folder} needs at least" in err and "describes a model too large for this machine" in err


def test_the_hugging_face_class_refuses_an_absurd_config(machine_of_24_gib):
    pytest.importorskip("transformers")
    from sparse_ssm.hf import SparseSSMHFForCausalLM
    from sparse_ssm.hf.config import SparseSSMHFConfig

    config = SparseSSMHFConfig.from_sparse_ssm(SparseSSMConfig(hidden_dim=10 ** 6, num_heads=2))
    with pytest.raises(ConfigError, match="the sparse-ssm model of this Hugging Face config needs at least"):
        SparseSSMHFForCausalLM(config)
