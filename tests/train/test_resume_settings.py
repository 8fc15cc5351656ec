"""--set on --resume: a changed value is used from the first resumed step (and reported), a value
the checkpoint fixes is refused; config.yaml never records a value that was not used."""

import pytest
import torch

from sparse_ssm import cli
from sparse_ssm.config import Config
from sparse_ssm.train import Trainer
from sparse_ssm.train.optim import lr_factor
from sparse_ssm.util.errors import ConfigError

TRAINING = {"max_steps": 6, "save_steps": 100, "eval_steps": 100}


def resumed(tiny, out, notes=None, **sections):
    sections = {"training": TRAINING, **sections}
    return Trainer(tiny(out, **sections), resume="latest", log=(notes.append if notes is not None else lambda *_: None))


def test_a_changed_learning_rate_and_weight_decay_apply_from_the_first_resumed_step(tiny, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny(out, training=TRAINING), log=lambda *_: None).train(until_step=3)
    same = resumed(tiny, out)
    notes = []
    changed = resumed(tiny, out, notes, optimizer={"learning_rate": 0.5, "weight_decay": 0.2})
    assert any("optimizer.learning_rate 0.003 -> 0.5" in n and "optimizer.weight_decay 0.01 -> 0.2" in n for n in notes)
    factor = lr_factor(3, same.total_steps, same.config.scheduler)
    for group in changed.opt.optimizer.param_groups:
        assert group["initial_lr"] == 0.5 * group["lr_multiplier"]
        assert group["lr"] == 0.5 * group["lr_multiplier"] * factor
        assert group["weight_decay"] == (0.0 if group["name"] == "no_decay" else 0.2)
    for g, h in zip(same.opt.optimizer.param_groups, changed.opt.optimizer.param_groups):
        assert torch.equal(same.opt.optimizer.state[g["params"][0]]["exp_avg"],
                           changed.opt.optimizer.state[h["params"][0]]["exp_avg"])   # the moments are kept
    changed.train(until_step=4)
    assert Config.load(out / "latest" / "config.yaml").optimizer.learning_rate == 0.5
    same.train(until_step=4)             # (overwrites step 4 with the unchanged run, for the comparison)
    moved = [k for k, v in changed.model.state_dict().items() if not torch.equal(v, same.model.state_dict()[k])]
    assert len(moved) > 10


def test_values_the_checkpoint_fixes_are_refused_on_resume(tiny, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny(out, training={"max_steps": 2}), log=lambda *_: None).train()
    for sections, message in [({"model": {"hidden_dim": 48}}, r"model\.hidden_dim: cannot change when resuming "
                                                              r"\(32 in the checkpoint, 48 now\).*weights"),
                              ({"training": {"max_steps": 4, "seed": 8}}, r"training\.seed: cannot change.*data order"),
                              ({"optimizer": {"use_param_groups": False}}, r"optimizer\.use_param_groups"),
                              ({"dataset": {"tokenizer_vocab_size": 280}}, r"dataset\.tokenizer_vocab_size.*tokenizer")]:
        with pytest.raises(ConfigError, match=message):
            Trainer(tiny(out, **sections), resume="latest", log=lambda *_: None)
    notes = []
    resumed(tiny, out, notes, model={"dropout": 0.1}, scheduler={"name": "linear"})   # these apply
    assert any("model.dropout 0.0 -> 0.1" in n and "scheduler.name 'cosine' -> 'linear'" in n for n in notes)


def test_cli_resume_refuses_a_fixed_value_and_reports_a_changed_one(tiny, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    tiny(tmp_path / "run", training={"max_steps": 2}).save(config)
    run = lambda *args: cli.main(["train", "--config", str(config), *args])
    assert run() == 0
    assert run("--resume", "--seed", "9") == 2
    assert "training.seed: cannot change when resuming (7 in the checkpoint, 9 now)" in capsys.readouterr().err
    assert run("--resume", "--set", "training.max_steps=3", "--set", "optimizer.learning_rate=1e-2") == 0
    assert "optimizer.learning_rate 0.003 -> 0.01" in capsys.readouterr().out
    assert Config.load(tmp_path / "run" / "latest" / "config.yaml").optimizer.learning_rate == 0.01
