"""Values of the `model` section reach the model they describe (read from a YAML file)."""

import math

import pytest
import torch

import sparse_ssm.model.layer as layer_module
from helpers import randomise_generators, tiny_language_model, write_checkpoint
from sparse_ssm import SparseSSMForCausalLM
from sparse_ssm.config import Config
from sparse_ssm.model.checkpoint import load_model
from sparse_ssm.ssm.hippo import hippo
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
    """The turns become whole steps of 2 pi / K and the inputs stop entering the state (B = 0), which
    is why the grid needs a learned initial state."""
    path = tmp_path / "c.yaml"
    learned = "  learned_initial_state: true\n"
    path.write_text(MODEL + "  selective_param_class: rotation\n  rotation_angle_grid: 12\n" + learned)
    model = randomise_generators(SparseSSMForCausalLM(Config.load(path).model).double())
    generator = model.blocks[1].mixer.generator
    u = torch.randn(2, 9, model.blocks[1].mixer.inner_dim, dtype=torch.float64)
    dt, A_raw, B, *_ = generator(u)
    turns = dt[..., None] * A_raw[..., 1::2] / (2 * math.pi / 12)
    assert torch.allclose(turns, turns.round(), atol=1e-9) and turns.abs().max() >= 1
    assert (B == 0).all()
    generator.angle_grid = 0                                   # the same weights without the grid
    dt, A_raw, B, *_ = generator(u)
    turns = dt[..., None] * A_raw[..., 1::2] / (2 * math.pi / 12)
    assert (turns - turns.round()).abs().max() > 0.1 and B.abs().min() > 0
    path.write_text(MODEL + "  rotation_angle_grid: 12\n" + learned)
    with pytest.raises(ConfigError, match="rotation_angle_grid: snaps the turns of rotation pairs"):
        Config.load(path)
    path.write_text(MODEL + "  selective_param_class: rotation\n  rotation_angle_grid: 12\n")
    with pytest.raises(ConfigError, match="rotation_angle_grid: exact transitions take no inputs .* learned_initial"):
        Config.load(path)


def test_exact_reflections_from_a_config_file_make_every_layer_a_product_of_reflections_of_its_learned_state(tmp_path):
    """`exact_reflections` snaps each reflection to beta 0 or 2 and the decay to 1 in every layer, with
    no inputs into the state; `reflection_init_logit` sets the reflections' b at initialisation; both
    belong to the householder class, and the exact ones need a learned initial state."""
    path = tmp_path / "c.yaml"
    householder = "  selective_param_class: householder\n  low_rank_rank: 1\n"
    path.write_text(MODEL + householder + "  exact_reflections: true\n  reflection_init_logit: 0.5\n"
                    "  learned_initial_state: true\n")
    model = randomise_generators(SparseSSMForCausalLM(Config.load(path).model).double())
    N = model.blocks[0].mixer.structure.state_dim
    for block in model.blocks:
        generator = block.mixer.generator
        assert (generator.A_base[:, -1] == 0.5).all()
        u = torch.randn(2, 9, block.mixer.inner_dim, dtype=torch.float64)
        dt, A_raw, B, *_ = generator(u)
        a, keys, beta = block.mixer.structure.continuous(A_raw)
        assert (torch.exp(dt[..., None] * a) == 1).all() and (B == 0).all()
        assert set((1 - beta).unique().tolist()) == {-1.0, 1.0}
        assert A_raw.shape[-1] == 2 * N + 1
    for extra, message in (("  exact_reflections: true\n  learned_initial_state: true\n",
                            "exact_reflections: applies to the reflections of selective_param_class 'householder'"),
                           ("  reflection_init_logit: 0.0\n", "reflection_init_logit: applies to the reflections"),
                           (householder + "  exact_reflections: true\n",
                            "exact_reflections: exact transitions take no inputs .* learned_initial_state: true")):
        path.write_text(MODEL + extra)
        with pytest.raises(ConfigError, match=message):
            Config.load(path)


def test_closed_reflection_range_reaches_exact_flips_in_every_layer_and_every_scan(tmp_path):
    """`reflection_range: closed` makes beta reach 2 (eigenvalue -1 along the key, to float rounding)
    where the open range 2 sigmoid(b) stays short of it; the native kernel and the PyTorch scan see
    the same betas; the key belongs to the householder class."""
    path = tmp_path / "c.yaml"
    householder = "  selective_param_class: householder\n  low_rank_rank: 2\n  reflection_init_logit: 3.5\n"
    betas = {}
    for kind in ("open", "closed"):
        path.write_text(MODEL + householder + f"  reflection_range: {kind}\n")
        model = SparseSSMForCausalLM(Config.load(path).model).double().eval()
        for block in model.blocks:
            u = torch.randn(2, 9, block.mixer.inner_dim, dtype=torch.float64)
            _, A_raw, *_ = block.mixer.generator(u)
            betas[kind] = block.mixer.structure.continuous(A_raw)[2]
        ids = torch.randint(0, 97, (2, 13))
        randomise_generators(model, std=0.3)
        native = model(ids).logits
        model.config.use_parallel_scan = False
        for block in model.blocks:
            block.mixer.config = model.config
        assert torch.allclose(model(ids).logits, native, atol=1e-8), kind
    assert (betas["closed"] > 2 - 1e-6).all() and (betas["open"] < 1.95).all()
    path.write_text(MODEL + "  reflection_range: closed\n")
    with pytest.raises(ConfigError, match="reflection_range: applies to the reflections"):
        Config.load(path)


@pytest.mark.parametrize("reflection_input", ["delta", "both"])
def test_delta_writes_reach_every_layer_and_every_scan(tmp_path, reflection_input):
    """`reflection_input: delta | both` changes what every householder layer computes (the logits
    differ from the input through B), the native kernel and the sequential PyTorch scan agree on it,
    and the key belongs to the householder class."""
    path = tmp_path / "d.yaml"
    householder = "  selective_param_class: householder\n  low_rank_rank: 2\n  reflection_init_logit: 0.0\n"
    ids = torch.randint(0, 97, (2, 13))
    logits = {}
    for kind in ("b", reflection_input):
        path.write_text(MODEL + householder + f"  reflection_input: {kind}\n")
        torch.manual_seed(0)
        model = SparseSSMForCausalLM(Config.load(path).model).double().eval()
        assert all(block.mixer.structure.reflection_input == kind for block in model.blocks)
        randomise_generators(model, std=0.3)
        logits[kind] = model(ids).logits
        model.config.use_parallel_scan = False
        for block in model.blocks:
            block.mixer.config = model.config
        assert torch.allclose(model(ids).logits, logits[kind], atol=1e-8), kind
    assert (logits["b"] - logits[reflection_input]).abs().max() > 1e-3
    path.write_text(MODEL + f"  reflection_input: {reflection_input}\n")
    with pytest.raises(ConfigError, match="reflection_input: applies to the reflections"):
        Config.load(path)
    path.write_text(MODEL + householder + f"  reflection_input: {reflection_input}\n  exact_reflections: true\n"
                    "  learned_initial_state: true\n")
    with pytest.raises(ConfigError, match="exact_reflections: snapped reflections take no input"):
        Config.load(path)


def test_signed_eigenvalue_range_reaches_the_decay_of_every_householder_layer(tmp_path):
    """`eigenvalue_range: signed` with householder maps every layer's decay to 2 exp(dt a) - 1, which a
    long step takes to -1 (a flip of each state alone, the signed diagonal's parity) and a short one
    keeps near 1; the positive range stays in (0, 1]."""
    path = tmp_path / "c.yaml"
    decays = {}
    for kind in ("positive", "signed"):
        path.write_text(MODEL + f"  selective_param_class: householder\n  eigenvalue_range: {kind}\n")
        model = SparseSSMForCausalLM(Config.load(path).model).double()
        for block in model.blocks:
            structure = block.mixer.structure
            a = structure.continuous(block.mixer.generator.A_base[None])
            dt = torch.tensor([[50.0, 1e-6]], dtype=torch.float64).T
            decays[kind] = structure.factors(a, dt, torch.zeros(2, structure.state_dim, dtype=torch.float64), "zoh")[0]
    assert (decays["signed"][0] < -1 + 1e-9).all() and (decays["signed"][1] > 0.99).all()
    assert (decays["positive"] > 0).all() and (decays["positive"] <= 1).all()


def test_initial_write_strengths_spread_over_the_heads_of_every_layer(tmp_path):
    """`reflection_init_logit_last` spreads the reflections' b at initialisation evenly over the heads,
    from `reflection_init_logit` (first head) to it (last head), in every layer: under the closed range
    the first head starts with writes of beta ~0.004 and the last with beta = 1; the key belongs to the
    householder class."""
    path = tmp_path / "s.yaml"
    path.write_text(MODEL.replace("num_heads: 2", "num_heads: 4") + "  selective_param_class: householder\n"
                    "  low_rank_rank: 2\n  reflection_range: closed\n  reflection_input: delta\n"
                    "  reflection_init_logit: -3.0\n  reflection_init_logit_last: 0.0\n")
    model = SparseSSMForCausalLM(Config.load(path).model).double()
    for block in model.blocks:
        structure, generator = block.mixer.structure, block.mixer.generator
        N = structure.state_dim
        logits = generator.A_base[:, N:].reshape(4, 2, N + 1)[..., N]
        assert torch.equal(logits, torch.tensor([[-3.0] * 2, [-2.0] * 2, [-1.0] * 2, [0.0] * 2], dtype=logits.dtype))
        u = torch.randn(1, 5, block.mixer.inner_dim, dtype=torch.float64)
        _, A_raw, *_ = generator(u)                      # W_A starts at zero: A_raw is A_base at every token
        beta = structure.continuous(A_raw)[2]           # the generator closed the range
        assert torch.allclose(beta[..., -1, :], torch.ones_like(beta[..., -1, :]), atol=1e-6)
        assert (beta[..., 0, :] < 0.01).all() and (beta[..., 0, :] > 0).all()
        # the rest of the base is the unspread one's: the decays and keys
        unspread = structure.raw_from_hippo(hippo("legs", N)[0])
        keep = torch.ones(A_raw.shape[-1], dtype=torch.bool)
        keep[N + N::N + 1] = False
        assert torch.allclose(generator.A_base[:, keep], unspread[keep].to(generator.A_base).expand(4, -1))
    path.write_text(MODEL + "  reflection_init_logit_last: 0.0\n")
    with pytest.raises(ConfigError, match="reflection_init_logit_last: applies to the reflections"):
        Config.load(path)


def test_structured_layers_make_a_hybrid_whose_other_layers_are_the_default_diagonal_ssm(tmp_path):
    """`structured_layers: [-1]` builds the class (delta writes from beta = 1, small dt) in the last
    layer only; the others are the default model's diagonal SSM (input through B, dt between the
    default dt_min and dt_max) with the shared sizes; native and sequential scans agree on the
    hybrid, a checkpoint of it loads back to the same logits, and bad lists are refused by name."""
    delta = ("  selective_param_class: householder\n  low_rank_rank: 2\n  reflection_range: closed\n"
             "  reflection_input: delta\n  reflection_init_logit: 0.0\n  dt_min: 1.0e-4\n  dt_max: 1.0e-2\n"
             "  a_generator_rank: 8\n")
    path = tmp_path / "h.yaml"
    path.write_text(MODEL.replace("num_layers: 2", "num_layers: 3") + delta + "  structured_layers: [-1]\n")
    config = Config.load(path).model
    model, tokenizer = tiny_language_model(seed=1, **{**config.to_dict(), "vocab_size": 300})
    assert [block.mixer.structure.name for block in model.blocks] == ["diagonal", "diagonal", "householder2-delta"]
    for block in model.blocks:
        assert block.mixer.generator.a_up.in_features == 8                  # shared: the generator's size
        dt = torch.nn.functional.softplus(block.mixer.generator.dt_bias)
        low, high = ((1e-3, 0.1) if block is not model.blocks[-1] else (1e-4, 1e-2))
        assert ((dt > low * 0.99) & (dt < high * 1.01)).all()
    randomise_generators(model, std=0.3)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        native = model(ids).logits
        folder = write_checkpoint(tmp_path / "ckpt", model, tokenizer)
        assert torch.equal(load_model(folder)(ids).logits, native)
        model.config.use_parallel_scan = False
        for i, block in enumerate(model.blocks):
            block.mixer.config = model.config.layer_config(i)
        assert torch.allclose(model(ids).logits, native, atol=1e-5)
    for layers, message in (("[]", "name at least one layer"), ("[3]", r"each index must be in \[-3, 3\)"),
                            ("[2, -1]", "names a layer twice")):
        path.write_text(MODEL.replace("num_layers: 2", "num_layers: 3") + delta + f"  structured_layers: {layers}\n")
        with pytest.raises(ConfigError, match=f"structured_layers: {message}"):
            Config.load(path)


def test_held_decays_reach_every_reflection_layer_and_only_delta_writes_take_them(tmp_path):
    """`reflection_decay: false` holds every householder layer's decays at 1 (the logits differ from
    the decaying model's; native and sequential scans agree), the hybrid's diagonal layers keep
    theirs (the key is reset there), and it is refused for another class, an input through B or a
    signed decay."""
    path = tmp_path / "u.yaml"
    delta = "  selective_param_class: householder\n  low_rank_rank: 2\n  reflection_input: delta\n"
    ids = torch.randint(0, 97, (2, 13))
    logits = {}
    for decay in ("true", "false"):
        path.write_text(MODEL + delta + f"  reflection_decay: {decay}\n")
        torch.manual_seed(0)
        model = randomise_generators(SparseSSMForCausalLM(Config.load(path).model).double().eval(), std=0.3)
        assert all(block.mixer.structure.decays == (decay == "true") for block in model.blocks)
        logits[decay] = model(ids).logits
        model.config.use_parallel_scan = False
        for block in model.blocks:
            block.mixer.config = model.config
        assert torch.allclose(model(ids).logits, logits[decay], atol=1e-8), decay
    assert (logits["true"] - logits["false"]).abs().max() > 1e-3
    path.write_text(MODEL + delta + "  reflection_decay: false\n  structured_layers: [-1]\n")
    config = Config.load(path).model
    assert not config.layer_config(1).reflection_decay and config.layer_config(0).reflection_decay
    for extra, message in (("  reflection_decay: false\n", "reflection_decay: applies to the reflections"),
                           ("  selective_param_class: householder\n  reflection_decay: false\n",
                            "reflection_decay: false holds every decay at 1, so only delta writes"),
                           (delta + "  reflection_decay: false\n  eigenvalue_range: signed\n",
                            "eigenvalue_range: 'signed' flips householder's decay")):
        path.write_text(MODEL + extra)
        with pytest.raises(ConfigError, match=message):
            Config.load(path)
