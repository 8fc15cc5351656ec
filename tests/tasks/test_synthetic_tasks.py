"""The paper's synthetic tasks: data generators, the time-invariant ablation, a smoke run, and the
training options of run_task (curriculum, random initial states, when rotation turns snap)."""

import pytest
import torch

from helpers import randomise_generators
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.ssm.selective import SelectiveParameterGenerator
from sparse_ssm.tasks.synthetic import induction_heads_batch, selective_copying_batch, task_batches
from sparse_ssm.tasks.training import noisy_initial_states, run_task, task_model_config, training_lengths
from sparse_ssm.util.errors import ConfigError


def test_selective_copying_batches():
    g = torch.Generator().manual_seed(0)
    inputs, labels = selective_copying_batch(64, 20, 5, 10, g)
    assert inputs.shape == labels.shape == (64, 26)
    for x, y in zip(inputs, labels):
        data = x[:20][x[:20] != 0]
        assert len(data) == 5 and torch.all((data >= 1) & (data <= 7))
        assert x[20] == 8 and torch.all(x[21:] == 9)
        assert torch.equal(y[21:], data) and torch.all(y[:21] == -100)
    again = selective_copying_batch(64, 20, 5, 10, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs)


def test_induction_heads_batches():
    g = torch.Generator().manual_seed(1)
    inputs, labels = induction_heads_batch(64, 30, 12, g)
    for x, y in zip(inputs, labels):
        first = int((x == 1).nonzero()[0])
        assert first < 28 and x[-2] == 1
        assert torch.all(y[:-1] == -100) and y[-1] == x[first + 1] == x[-1]


def test_lti_ablation_generates_the_same_parameters_at_every_step():
    """With random generator weights (A's and D's start at zero), the selective model's dt, A, B, C,
    D change from token to token and the ablation's do not."""
    u = torch.randn(2, 7, 64)
    for selective in (True, False):
        config = SparseSSMConfig(vocab_size=16, hidden_dim=32, state_dim=8, ffn_dim=0, num_layers=1, num_heads=2,
                                 selective=selective)
        gen = randomise_generators(SparseSSMForCausalLM(config)).blocks[0].mixer.generator
        for x in gen(u):
            constant = torch.allclose(x, x[:1, :1].expand_as(x))
            assert constant != selective


def test_the_default_layer_learns_selective_copying_in_seconds():
    """150 steps of the default layer (2 layers, width 32): far above chance (1 in 5 data tokens).
    The previous default initialisation (weight_init: gpt2) stays near chance with this budget (36%)."""
    config = SparseSSMConfig(vocab_size=8, hidden_dim=32, state_dim=8, ffn_dim=0, num_layers=2, dropout=0.0,
                             max_seq_len=64)
    result = run_task("selective-copying", config, steps=150, batch=32, length=16, test_lengths=[16], num_memorize=2)
    assert result.accuracy[16] > 0.6


def test_a_curriculum_trains_its_phases_in_order_then_the_length():
    assert training_lengths(10, 256, [(64, 0.3), (128, 0.2)]) == [64] * 3 + [128] * 2 + [256] * 5
    assert training_lengths(4, 32) == [32] * 4
    assert training_lengths(3, 32, [(8, 1.0)]) == [8] * 3
    for bad in ([(64, 0.7), (128, 0.4)], [(0, 0.5)], [(64, -0.1)]):
        with pytest.raises(ConfigError, match="curriculum"):
            training_lengths(10, 256, bad)


def test_run_task_trains_at_the_curriculum_lengths(monkeypatch):
    """The batches run_task draws follow the curriculum (the lengths the data generator is asked for)."""
    seen = []
    make = task_batches

    def recording(*args, **kwargs):
        inner = make(*args, **kwargs)
        return lambda n, L: (seen.append(L), inner(n, L))[1]
    monkeypatch.setattr("sparse_ssm.tasks.training.task_batches", recording)
    config = SparseSSMConfig(vocab_size=8, hidden_dim=16, state_dim=4, ffn_dim=0, num_layers=1, max_seq_len=64)
    run_task("selective-copying", config, steps=4, batch=2, length=16, test_lengths=[12], num_memorize=2,
             curriculum=[(8, 0.5)])
    assert seen == [8, 8, 16, 16, 12]          # 4 training batches, then the test batch


def test_noisy_initial_states_have_the_layer_state_shapes_and_the_scale():
    config = SparseSSMConfig(vocab_size=8, hidden_dim=32, state_dim=8, ffn_dim=0, num_layers=2, num_heads=2,
                             conv_kernel=3, max_seq_len=64)
    model = SparseSSMForCausalLM(config)
    ids = torch.randint(0, 8, (64, 5))
    reached = model(ids).cache                              # the states a forward pass ends in
    noisy = noisy_initial_states(model, 64, 0.5)
    for state, like in zip(noisy, reached):
        assert state.conv.shape == like.conv.shape and not state.conv.any()
        assert state.ssm.shape == like.ssm.shape
        assert abs(state.ssm.std().item() - 0.5) < 0.02 and abs(state.ssm.mean().item()) < 0.02
    from_noise = model(ids, cache=noisy).logits
    assert not torch.allclose(from_noise, model(ids).logits, atol=1e-4)     # the state reaches the output
    learned = SparseSSMForCausalLM(config.model_copy(update={"learned_initial_state": True}))
    with torch.no_grad():
        for block in learned.blocks:
            block.mixer.initial_state.fill_(3.0)
    for state in noisy_initial_states(learned, 64, 0.5):               # around the learned state
        assert abs(state.ssm.std().item() - 0.5) < 0.02 and abs(state.ssm.mean().item() - 3.0) < 0.02


def test_run_task_starts_the_noisy_steps_from_random_states(monkeypatch):
    """state_noise (sigma, fraction): training steps from that fraction on start from random states;
    earlier steps and the tests start from zero."""
    seen = []
    forward = SparseSSMForCausalLM.forward

    def recording(self, ids, labels=None, cache=None, **kwargs):
        seen.append(None if cache is None else round(float(cache[0].ssm.std()), 1))
        return forward(self, ids, labels, cache, **kwargs)
    monkeypatch.setattr(SparseSSMForCausalLM, "forward", recording)
    config = SparseSSMConfig(vocab_size=8, hidden_dim=32, state_dim=8, ffn_dim=0, num_layers=1, max_seq_len=64)
    run_task("parity", config, steps=5, batch=64, length=8, test_lengths=[8], state_noise=(2.0, 0.4))
    assert seen == [None, None, 2.0, 2.0, 2.0, None]            # 5 training steps, then the test batch
    for bad in ((-1.0, 0.0), (1.0, 1.5)):
        with pytest.raises(ConfigError, match="state_noise"):
            run_task("parity", config, steps=2, batch=2, length=8, test_lengths=[8], state_noise=bad)
    with pytest.raises(ConfigError, match="state_noise"):
        run_task("parity", lambda: SparseSSMForCausalLM(config), steps=2, batch=2, length=8, test_lengths=[8],
                 vocab=2, state_noise=(1.0, 0.0))


def test_run_task_trains_the_first_steps_with_continuous_angles_then_snaps_them(monkeypatch):
    """angle_grid_from: the generators of a model with an angle grid (or exact reflections) snap no
    turn before that fraction of the steps, and snap them from there on and in the tests."""
    seen = []
    forward = SelectiveParameterGenerator.forward
    monkeypatch.setattr(SelectiveParameterGenerator, "forward", lambda self, u: seen.append(self.angle_grid)
                        or forward(self, u))
    config = task_model_config("rotation_grid", 16, 3)
    run_task("modular-counting", config, steps=4, batch=2, length=8, test_lengths=[8], angle_grid_from=0.5)
    assert seen == [0, 0, 60, 60, 60]                           # 4 training steps, then the test batch
    seen.clear()
    run_task("modular-counting", config, steps=2, batch=2, length=8, test_lengths=[8], angle_grid_from=0.0)
    assert seen == [60, 60, 60]
    with pytest.raises(ConfigError, match="angle_grid_from"):
        run_task("modular-counting", config, steps=2, batch=2, length=8, test_lengths=[8], angle_grid_from=1.5)
    seen.clear()
    run_task("parity", task_model_config("householder_exact", 16, 2), steps=4, batch=2, length=8, test_lengths=[8])
    assert seen == [0, 0, 2, 2, 2]                              # exact reflections: the grid of Z_2
