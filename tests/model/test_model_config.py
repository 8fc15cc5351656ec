"""Values of the `model` section reach the model they describe (read from a YAML file)."""

import math

import pytest
import torch

import sparse_ssm.model.layer as layer_module
from helpers import randomise_generators
from sparse_ssm import SparseSSMForCausalLM
from sparse_ssm.config import Config
from sparse_ssm.util.errors import ConfigError

MODEL = ("model:\n  vocab_size: 97\n  hidden_dim: 32\n  state_dim: 8\n  ffn_dim: 0\n  num_layers: 2\n  dropout: 0.0\n"
         "  num_heads: 2\n  scan_chunk_size: 4\n  sparsity_level: 0.5\n")


def test_gbt_alpha_from_a_config_file_reaches_every_scan(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(MODEL + "  discretization: gbt\n  gbt_alpha: 0.25\n")
    config = Config.load(path).model
    seen = []
    real = layer_module.selective_scan
    monkeypatch.setattr(layer_module, "selective_scan", lambda *a, **k: seen.append((a[7], a[8])) or real(*a, **k))
    quarter = randomise_generators(SparseSSMForCausalLM(config).double().eval())
    ids = torch.randint(0, 97, (2, 11))
    out = quarter(ids).logits
    assert seen == [("gbt", 0.25)] * 2                       # every layer's scan
    # the value is what the model computes with: alpha 0.5 is the bilinear transform, 0.25 is not
    other = {}
    for name, extra in (("half", "  discretization: gbt\n  gbt_alpha: 0.5\n"),
                        ("bilinear", "  discretization: bilinear\n")):
        path.write_text(MODEL + extra)
        model = SparseSSMForCausalLM(Config.load(path).model).double().eval()
        model.load_state_dict(quarter.state_dict())
        other[name] = model(ids).logits
    assert torch.allclose(other["half"], other["bilinear"], atol=1e-12)
    assert (out - other["bilinear"]).abs().max() > 1e-6          # (float64: rounding is ~1e-15)


def test_an_angle_grid_from_a_config_file_snaps_the_turns_of_rotation_pairs_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MODEL + "  selective_param_class: rotation\n  rotation_angle_grid: 12\n")
    model = randomise_generators(SparseSSMForCausalLM(Config.load(path).model).double())
    generator = model.blocks[1].mixer.generator
    u = torch.randn(2, 9, model.blocks[1].mixer.inner_dim, dtype=torch.float64)
    dt, A_raw, *_ = generator(u)
    turns = dt[..., None] * A_raw[..., 1::2] / (2 * math.pi / 12)
    assert torch.allclose(turns, turns.round(), atol=1e-9) and turns.abs().max() >= 1
    generator.angle_grid = 0                                   # the same weights without the grid
    dt, A_raw, *_ = generator(u)
    turns = dt[..., None] * A_raw[..., 1::2] / (2 * math.pi / 12)
    assert (turns - turns.round()).abs().max() > 0.1
    path.write_text(MODEL + "  rotation_angle_grid: 12\n")
    with pytest.raises(ConfigError, match="rotation_angle_grid: snaps the turns of rotation pairs"):
        Config.load(path)
