"""The layer, block and LM: recurrent decoding, initialisation, parameter groups, the fused loss."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import randomise_generators, requires_native_kernel
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.generate import generate
from sparse_ssm.model.loss import linear_cross_entropy

CLASSES = [dict(selective_param_class="sparse", sparsity_level=0.9),      # diagonal
           dict(selective_param_class="sparse", sparsity_level=0.5),      # 4 x 4 blocks
           dict(selective_param_class="sparse", sparsity_level=0.5, sparsity_pattern="banded"),
           dict(selective_param_class="dense"),
           dict(selective_param_class="low_rank", discretization="bilinear", low_rank_rank=2),
           dict(selective_param_class="rotation"),                            # 2 x 2 scaled rotations, zoh
           dict(selective_param_class="rotation", rotation_angle_grid=12,     # turns snapped to 2 pi / 12
                learned_initial_state=True),
           dict(selective_param_class="permutation"),                         # PD-SSM's P_t diag(d_t), zoh
           dict(selective_param_class="householder", low_rank_rank=2),        # DeltaProduct's reflections, zoh
           dict(selective_param_class="householder", low_rank_rank=1, exact_reflections=True,
                reflection_init_logit=0.0, learned_initial_state=True),       # beta 0 or 2, decay 1
           dict(selective_param_class="sparse", sparsity_level=0.9, eigenvalue_range="signed"),
           dict(selective_param_class="householder", low_rank_rank=2, reflection_range="closed",  # a hybrid: delta
                reflection_input="delta", reflection_init_logit=0.0, structured_layers=[-1]),     # writes on top
           dict(selective_param_class="householder", low_rank_rank=2, reflection_input="delta",  # writes, decays
                reflection_decay=False)]                                                     # held at 1


def tiny(**kw):
    base = dict(vocab_size=97, hidden_dim=32, state_dim=8, ffn_dim=48, num_layers=2, max_seq_len=64, dropout=0.0,
                num_heads=2, scan_chunk_size=4)
    base.update(kw)
    return SparseSSMConfig(**base)


LAYER_OPTIONS = [dict(num_groups=2), dict(conv_kernel=1), dict(conv_kernel=2, activation="silu"), dict(ffn_dim=0),
                 dict(hippo_init="legt"), dict(hippo_init="fourier"), dict(hippo_init="random"),
                 dict(discretization="gbt", gbt_alpha=0.25), dict(discretization="bilinear"), dict(selective=False)]


@pytest.mark.parametrize("kw", CLASSES + LAYER_OPTIONS, ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()))
def test_prefill_and_steps_equal_the_full_forward(kw):
    model = randomise_generators(SparseSSMForCausalLM(tiny(**kw)).double().eval())
    ids = torch.randint(0, 97, (3, 19))
    full = model(ids).logits
    logits, cache = model.prefill(ids[:, :7])
    assert torch.allclose(logits, full[:, 6], atol=1e-10)
    for t in range(7, 19):
        logits, cache = model.step(ids[:, t], cache)
        assert torch.allclose(logits, full[:, t], atol=1e-10)


@pytest.mark.parametrize("hidden,dtype,tol", [(32, torch.float64, 1e-10), (13, torch.float64, 1e-10),
                                               (13, torch.float32, 2e-5)], ids=["32-f64", "13-f64", "13-f32"])
@pytest.mark.parametrize("path", [pytest.param("block", marks=requires_native_kernel()),
                                  pytest.param("layer", marks=requires_native_kernel()), "operations"])
def test_the_three_decode_paths_of_the_diagonal_layer(path, hidden, dtype, tol, monkeypatch):
    """The whole residual block in one native call (its arguments bound once per cache), the layer
    between its projections in one call, and operation by operation (each native path refused in
    turn) all decode as the forward; width 13 leaves remainders in every projection's rows and columns."""
    import sparse_ssm.model.layer as layer_module

    calls = {"plans": 0, "block": 0, "layer": 0}
    real_plan, real_layer = layer_module.block_step_plan, layer_module.decode_layer_step

    def plan(*a):
        calls["plans"] += 1
        made = real_plan(*a)
        if path != "block":
            return None

        def counted(x):
            calls["block"] += 1
            return made(x)
        counted.fits = made.fits
        return counted

    def layer(*a):
        calls["layer"] += 1
        return real_layer(*a) if path == "layer" else None
    monkeypatch.setattr(layer_module, "block_step_plan", plan)
    monkeypatch.setattr(layer_module, "decode_layer_step", layer)
    model = randomise_generators(SparseSSMForCausalLM(tiny(num_groups=2, hidden_dim=hidden)).to(dtype).eval())
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    logits, cache = model.prefill(ids[:, :5])
    for t in range(5, 12):
        logits, cache = model.step(ids[:, t], cache)
        assert torch.allclose(logits, full[:, t], atol=tol, rtol=tol)
    steps, layers = 7, 2
    assert calls["plans"] == (layers if path == "block" else steps * layers)    # bound once per cache
    assert calls["block"] == (steps * layers if path == "block" else 0)
    assert calls["layer"] == (0 if path == "block" else steps * layers)


def test_a_cache_binds_its_native_step_once_and_again_for_new_states():
    """The bound step is reused while the cache's state tensors stay, and made again when they are
    replaced (the cache of a re-batched request) or the input dtype changes."""
    model = randomise_generators(SparseSSMForCausalLM(tiny()).eval())
    ids = torch.randint(0, 97, (2, 9))
    _, cache = model.prefill(ids[:, :4])
    model.step(ids[:, 4], cache)
    plans = [s.plan for s in cache]
    model.step(ids[:, 5], cache)
    assert [s.plan for s in cache] == plans
    cache[0].ssm = cache[0].ssm.clone()
    model.step(ids[:, 6], cache)
    assert cache[1].plan is plans[1] and (cache[0].plan is not plans[0] or plans[0] is None)
    expected = model(ids[:, 7:9], cache=[type(s)(s.conv.clone(), s.ssm.clone()) for s in cache]).logits
    logits, _ = model.step(ids[:, 7], cache)
    assert torch.allclose(logits, expected[:, 0], atol=1e-5)


def test_step_advances_the_cache_in_place_like_a_forward_from_it():
    model = randomise_generators(SparseSSMForCausalLM(tiny()).eval())
    ids = torch.randint(0, 97, (2, 9))
    _, cache = model.prefill(ids[:, :8])
    before = [(s.conv.clone(), s.ssm.clone()) for s in cache]
    expected = model(ids[:, 8:], cache=[type(s)(c, h) for s, (c, h) in zip(cache, before)]).cache
    _, same = model.step(ids[:, 8], cache)
    assert same is cache
    for state, want, old in zip(cache, expected, before):
        assert torch.allclose(state.ssm, want.ssm, atol=1e-6) and torch.allclose(state.conv, want.conv, atol=1e-6)
        assert not torch.equal(state.ssm, old[1])


def test_decoding_caps_the_decay_rates_where_the_forward_does():
    """Rate arguments above the cap (structures.block.RATE_EXP_MAX) with steps dt small enough that
    the capped rate still leaves a state: the decoding step (natively where it runs) must cap at the
    same place as the forward, or these states differ by orders of magnitude."""
    from sparse_ssm.ssm.structures.block import RATE_EXP_MAX

    model = randomise_generators(SparseSSMForCausalLM(tiny(ffn_dim=0)).double().eval())
    with torch.no_grad():
        for block in model.blocks:
            gen = block.mixer.generator
            gen.A_base[:, ::2] = RATE_EXP_MAX / 2 + 5             # a = -exp(2 A_base): argument 30
            dt = 1.5 * math.exp(-RATE_EXP_MAX)
            gen.dt_bias.fill_(math.log(math.expm1(dt)))
    ids = torch.randint(0, 97, (2, 9))
    _, cache = model.prefill(ids[:, :8])
    expected = model(ids[:, 8:], cache=[type(s)(s.conv.clone(), s.ssm.clone()) for s in cache]).cache
    model.step(ids[:, 8], cache)
    for state, want in zip(cache, expected):
        assert want.ssm[:, :, ::2].abs().max() > 1e-12
        assert torch.allclose(state.ssm, want.ssm, rtol=1e-8, atol=0)


@pytest.mark.parametrize("kw", CLASSES, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_parallel_and_sequential_scan_give_the_same_model(kw):
    torch.manual_seed(1)
    fast = SparseSSMForCausalLM(tiny(**kw)).double()
    slow = SparseSSMForCausalLM(tiny(use_parallel_scan=False, **kw)).double()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 97, (2, 13))
    l1, l2 = fast(ids, labels=ids).loss, slow(ids, labels=ids).loss
    g1 = torch.autograd.grad(l1, list(fast.parameters()))
    g2 = torch.autograd.grad(l2, list(slow.parameters()))
    assert torch.allclose(l1, l2, atol=1e-12)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-10)


def test_every_parameter_gets_a_gradient():
    model = SparseSSMForCausalLM(tiny(selective_param_class="sparse", sparsity_level=0.5))
    ids = torch.randint(0, 97, (2, 16))
    model(ids, labels=ids).loss.backward()
    # W_A starts at zero but its input is not zero, so it learns
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("kw", [dict(), dict(selective_param_class="rotation", rotation_angle_grid=12),
                                dict(selective_param_class="householder", low_rank_rank=1, exact_reflections=True)],
                         ids=["diagonal", "rotation-grid", "exact-reflections"])
def test_a_learned_initial_state_is_where_training_and_decoding_start(kw):
    """`learned_initial_state`: N(0, 1) at initialisation, the state every sequence without a cache
    starts from (the forward, prefill then steps), learned with the model and kept out of weight decay."""
    from sparse_ssm.model import LayerState
    from sparse_ssm.train.optim import parameter_groups

    model = randomise_generators(SparseSSMForCausalLM(tiny(learned_initial_state=True, **kw)).double().eval())
    plain = copy.deepcopy(model)                               # the same weights without the learned state
    for block in plain.blocks:
        block.mixer.initial_state = None
    ids = torch.randint(0, 97, (3, 11))
    drawn = torch.cat([b.mixer.initial_state.flatten() for b in model.blocks])          # 1,024 values
    assert drawn.shape == (2 * 2 * 8 * 32,) and abs(drawn.mean()) < 0.1 and abs(drawn.std() - 1) < 0.1
    full = model(ids).logits
    started = [LayerState(torch.zeros(3, 3, 64, dtype=torch.float64), b.mixer.initial_state.expand(3, -1, -1, -1))
               for b in model.blocks]
    assert torch.allclose(full, plain(ids, cache=started).logits, atol=1e-12)
    assert not torch.allclose(full, plain(ids).logits, atol=1e-3)
    logits, cache = model.prefill(ids[:, :5])
    for t in range(5, 11):
        assert torch.allclose(logits, full[:, t - 1], atol=1e-10)
        logits, cache = model.step(ids[:, t], cache)
    model(ids, labels=ids).loss.backward()
    assert all(b.mixer.initial_state.grad.abs().min() > 0 for b in model.blocks)
    no_decay = next(g for g in parameter_groups(model, 0.1) if g["name"] == "no_decay")["params"]
    assert all(any(p is b.mixer.initial_state for p in no_decay) for b in model.blocks)


def test_dt_bias_and_ssm_bases_survive_the_weight_init():
    config = tiny(dt_min=0.002, dt_max=0.05, num_heads=4)
    model = SparseSSMForCausalLM(config)
    for block in model.blocks:
        gen = block.mixer.generator
        dt = F.softplus(gen.dt_bias)
        assert (dt >= 0.002 - 1e-6).all() and (dt <= 0.05 + 1e-6).all()
        assert torch.all(gen.D_base == 1) and torch.all(gen.a_up.weight == 0)
        expected = gen.structure.raw_from_hippo(__import__("sparse_ssm.ssm.hippo", fromlist=["hippo"]).hippo("legs", 8)[0])
        assert torch.allclose(gen.A_base, expected.float().expand_as(gen.A_base))


@pytest.mark.parametrize("ffn_dim", [0, 48])
def test_mamba_weight_init_is_mamba_ssms(ffn_dim):
    """Kaiming-uniform linear maps (bound 1/sqrt(fan_in)), residual outputs divided by
    sqrt(residuals per layer * layers), the generator's dt/B/C rows like Mamba's x_proj."""
    config = tiny(hidden_dim=64, num_layers=3, ffn_dim=ffn_dim, weight_init="mamba", initializer_range=0.05)
    model = SparseSSMForCausalLM(config).requires_grad_(False)
    E, residuals = config.inner_dim, 2 if ffn_dim else 1

    def assert_uniform(w, bound):       # uniform(-bound, bound): max near the bound, std bound / sqrt(3)
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert abs(float(model.embed.weight.std()) - 0.05) < 0.005
    for block in model.blocks:
        mixer, gen = block.mixer, block.mixer.generator
        assert_uniform(mixer.in_proj.weight, 1 / math.sqrt(64))
        assert_uniform(mixer.out_proj.weight, 1 / math.sqrt(E) / math.sqrt(residuals * 3))
        if ffn_dim:
            assert_uniform(block.ffn.up.weight, 1 / math.sqrt(64))
            assert_uniform(block.ffn.down.weight, 1 / math.sqrt(ffn_dim) / math.sqrt(2 * 3))
            assert torch.all(block.ffn.up.bias == 0) and torch.all(block.ffn.down.bias == 0)
        d_rows = gen.sizes[-1]
        assert_uniform(gen.proj.weight[:-d_rows], 1 / math.sqrt(E))
        assert torch.all(gen.proj.weight[-d_rows:] == 0) and torch.all(gen.a_up.weight == 0)


def test_gpt2_weight_init_is_the_previous_default():
    config = tiny(hidden_dim=64, num_layers=3, weight_init="gpt2")
    model = SparseSSMForCausalLM(config).requires_grad_(False)
    close = lambda w, std: abs(float(w.std()) - std) < 0.05 * std
    assert close(model.embed.weight, 0.02)
    for block in model.blocks:
        gen = block.mixer.generator
        assert close(block.mixer.in_proj.weight, 0.02) and close(block.mixer.out_proj.weight, 0.02 / math.sqrt(6))
        assert close(block.ffn.down.weight, 0.02 / math.sqrt(6)) and close(gen.proj.weight[:-gen.sizes[-1]], 0.02)


def test_tied_and_untied_embeddings():
    tied = SparseSSMForCausalLM(tiny())
    assert tied.lm_head.weight is tied.embed.weight
    untied = SparseSSMForCausalLM(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_parameters() == tied.num_parameters() + 97 * 32


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("native", [True, False], ids=["native-kernel", "pytorch-ops"])
def test_fused_loss_equals_plain_cross_entropy_with_gradients(dtype, tol, native, monkeypatch):
    import sparse_ssm.model.loss as loss_module

    if not native:
        monkeypatch.setattr(loss_module, "cross_entropy_rows_", lambda *a: None)
    h = torch.randn(41, 16, dtype=dtype, requires_grad=True)
    W = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 37, (41,))
    targets[[0, 5, 40]] = -100
    fused = linear_cross_entropy(h, W, targets, chunk_rows=8)
    plain = F.cross_entropy(h @ W.T, targets, ignore_index=-100)
    assert torch.allclose(fused, plain, atol=tol, rtol=tol)
    g_fused = torch.autograd.grad(3 * fused, (h, W))
    g_plain = torch.autograd.grad(3 * plain, (h, W))
    for a, b in zip(g_fused, g_plain):
        assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_model_loss_paths_agree():
    model = SparseSSMForCausalLM(tiny()).double()
    ids = torch.randint(0, 97, (2, 12))
    labels = ids.clone()
    labels[0, 5] = -100
    a = model(ids, labels=labels).loss
    b = model(ids, labels=labels, return_logits=False)
    assert b.logits is None and torch.allclose(a, b.loss, atol=1e-12)
    assert math.isclose(a.item(), math.log(97), rel_tol=0.2)   # near uniform at initialisation


def test_bf16_autocast_runs_and_keeps_the_scan_in_float32():
    model = SparseSSMForCausalLM(tiny())
    ids = torch.randint(0, 97, (2, 12))
    ref = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.cache[0].ssm.dtype == torch.float32
    assert abs(out.loss.item() - ref.item()) < 0.05


def test_generate_greedy_matches_argmax_of_full_forward():
    model = SparseSSMForCausalLM(tiny()).double().eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = generate(model, prompt, max_new_tokens=6)
    for t in range(5, 11):
        assert torch.equal(model(out[:, :t]).logits[:, -1].argmax(-1), out[:, t])


def test_layer_cost_follows_structure():
    costs = {}
    for name, kw in [("dense", dict(selective_param_class="dense")),
                     ("sparse", dict(selective_param_class="sparse", sparsity_level=0.9))]:
        model = SparseSSMForCausalLM(tiny(state_dim=32, **kw))
        costs[name] = model.blocks[0].mixer.ssm_cost_per_token()
    assert costs["sparse"]["state_flops"] * 10 < costs["dense"]["state_flops"]
    assert costs["sparse"]["generator_params"] < costs["dense"]["generator_params"]
