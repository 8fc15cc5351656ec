"""bench/state_tracking_lm.py compares config/state_tracking_lm.yaml with the demo's diagonal model:
the two configs differ only in the state matrix (same shape, data and schedule), and the equal
wall-clock perplexity is read from the evaluation log between its entries."""

import sys
from pathlib import Path

import pytest
import torch

from sparse_ssm.config import Config
from sparse_ssm.util.schema import load_yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import state_tracking_lm  # noqa: E402


def test_the_state_tracking_config_is_the_demo_with_another_state_matrix():
    demo, tracking = (Config.load(ROOT / p).to_dict() for p in state_tracking_lm.CONFIGS.values())
    differ = {(section, key) for section in demo for key in demo[section] if demo[section][key] != tracking[section][key]}
    transition = {"selective_param_class", "sparsity_level", "low_rank_rank", "reflection_range", "a_generator_rank",
                  "dt_min", "dt_max", "reflection_init_logit", "reflection_input", "structured_layers"}
    assert {("model", "selective_param_class"), ("training", "output_dir")} <= differ
    assert {key for section, key in differ if section == "model"} <= transition
    assert {section for section, _ in differ} == {"model", "training"}
    assert set(load_yaml(ROOT / "config" / "state_tracking_lm.yaml")) == set(load_yaml(ROOT / "config" / "demo.yaml"))


def test_the_equal_wall_clock_perplexity_is_interpolated_in_steps():
    log = [(0, 100.0), (100, 50.0), (200, 40.0)]
    assert state_tracking_lm.at_step(log, 150) == pytest.approx(45.0)
    assert state_tracking_lm.at_step(log, 200) == 40.0 and state_tracking_lm.at_step(log, 0) == 100.0
    assert state_tracking_lm.at_step(log, 250) == 40.0


def test_the_timing_phase_runs_on_its_core_under_its_lock_and_then_returns(tmp_path):
    import fcntl
    import os

    lock = tmp_path / "core.lock"
    before = os.sched_getaffinity(0)
    core = min(before)
    with state_tracking_lm.timing_conditions(core, str(lock)):
        assert os.sched_getaffinity(0) == {core}
        with open(lock) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)          # held while timing
    assert os.sched_getaffinity(0) == before
    with open(lock) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)               # released after


def test_set_replaces_a_model_key_of_the_state_tracking_config_only():
    """--set KEY=VALUE reaches the state-tracking model (validated: an unknown key is refused) and
    leaves the diagonal model alone."""
    args = state_tracking_lm.parse_args(["--set", "reflection_init_logit=-1.5"])
    assert args.overrides == [("reflection_init_logit", -1.5)]
    *_, cfg = state_tracking_lm.build(state_tracking_lm.CONFIGS["state tracking"], 64, 4, dict(args.overrides))
    assert cfg.model.reflection_init_logit == -1.5 and cfg.model.reflection_input == "delta"
    with pytest.raises(SystemExit):
        state_tracking_lm.parse_args(["--set", "no_such_key=1"])


def test_the_seed_sets_the_initialisation_and_the_same_seed_builds_the_same_model():
    """--seed reaches both models' initialisation: one seed builds the same weights twice, another
    seed other weights."""
    path = state_tracking_lm.CONFIGS["state tracking"]
    assert state_tracking_lm.parse_args(["--seed", "3"]).seed == 3
    first, again, other = (state_tracking_lm.build(path, 64, 4, seed=s)[0].embed.weight for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_the_state_tracking_config_has_the_transition_of_the_hybrid_task_variant():
    """config/state_tracking_lm.yaml's transition keys are those the tasks measure as
    `householder_delta_hybrid` (docs/state_tracking.md reports the two as one configuration)."""
    from sparse_ssm.tasks.training import VARIANTS

    model = Config.load(ROOT / "config" / "state_tracking_lm.yaml").model
    assert {key: getattr(model, key) for key in VARIANTS["householder_delta_hybrid"]} == VARIANTS["householder_delta_hybrid"]
