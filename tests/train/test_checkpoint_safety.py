"""Loading a checkpoint runs no code: the resume state is JSON + safetensors; an old pickled
training_state.pt is read only when it holds nothing but tensors and plain values."""

import json
import math
import shutil

import pytest
import torch

from helpers import FIXTURES, make_text
from sparse_ssm import cli
from sparse_ssm.model.checkpoint import resolve_checkpoint
from sparse_ssm.train import Trainer
from sparse_ssm.train.training_state import read_training_state, write_training_state
from sparse_ssm.util.errors import CheckpointError

FIXTURE = FIXTURES / "checkpoint_v0"


class Planted:
    """What an attacker puts in a pickle: unpickling it calls open(path, 'w')."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_the_training_state_round_trips_without_pickle(tmp_path):
    state = {"optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                           "param_groups": [{"params": ["w"], "betas": (0.9, 0.95), "lr": 1e-3, "name": "decay"}]},
             "scheduler": {"last_epoch": 3, "lr_lambdas": [None]}, "scaler": {},
             "state": {"best_val_loss": float("inf"), "best_step": None, "step": 3},
             "rng_cpu": torch.get_rng_state(), "rng_cuda": [torch.zeros(4, dtype=torch.uint8)]}
    write_training_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_state.json", "training_state.safetensors"]
    json.loads((tmp_path / "training_state.json").read_text(), parse_constant=pytest.fail)   # strict JSON
    back = read_training_state(tmp_path)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert math.isinf(back["state"]["best_val_loss"]) and back["state"]["best_step"] is None
    assert torch.equal(back["optimizer"]["state"]["w"]["exp_avg"], state["optimizer"]["state"]["w"]["exp_avg"])
    assert torch.equal(back["rng_cpu"], state["rng_cpu"]) and back["rng_cuda"][0].dtype == torch.uint8
    body = json.loads((tmp_path / "training_state.json").read_text())
    body["rng_cpu"] = {"__tensor__": "missing"}
    (tmp_path / "training_state.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="names tensor 'missing'"):
        read_training_state(tmp_path)


def test_training_writes_no_pickle_and_the_fixture_state_loads_with_weights_only(tiny, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny(out, training={"max_steps": 2}), log=lambda *_: None).train()
    ckpt = resolve_checkpoint(out, "latest")
    assert not list(ckpt.glob("*.pt")) and (ckpt / "training_state.json").is_file()
    legacy = read_training_state(FIXTURE)            # torch.load(weights_only=True) of the pickled state
    assert legacy["state"]["step"] == 2 and legacy["optimizer"]["state"]


def _legacy_run(tmp_path, name):
    """An output directory whose only checkpoint is a copy of the fixture (written by the old code),
    and the corpus its config names (relative paths: the commands run in tmp_path, see _resume)."""
    corpus = tmp_path / "data" / "corpus"
    if not corpus.is_dir():
        corpus.mkdir(parents=True)
        for i in range(12):
            (corpus / f"doc{i}.txt").write_text(make_text(120, seed=i))
    step = tmp_path / name / "checkpoints" / "step-00000002"
    shutil.copytree(FIXTURE, step)
    return step


def _resume(step, *args):
    """`main.py train --resume STEP` (in this process; the caller changes to the run's folder)."""
    return cli.main(["train", "--config", str(step / "config.yaml"), "--output-dir", str(step.parent.parent),
                     "--resume", str(step), *args])


def test_an_old_checkpoint_resumes_and_is_then_saved_without_pickle(tmp_path, monkeypatch, capsys):
    step = _legacy_run(tmp_path, "legacy")
    monkeypatch.chdir(tmp_path)
    assert _resume(step, "--set", "training.max_steps=4") == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    latest = (tmp_path / "legacy" / "latest").resolve()
    assert latest.name == "step-00000004"
    assert sorted(p.name for p in latest.iterdir() if p.name.startswith("training_state")) == [
        "training_state.json", "training_state.safetensors"]


def test_a_planted_pickle_is_refused_and_runs_no_code(tmp_path, monkeypatch, capsys):
    step = _legacy_run(tmp_path, "evil")
    pwned = tmp_path / "PWNED"
    torch.save({"optimizer": Planted(pwned)}, step / "training_state.pt")
    monkeypatch.chdir(tmp_path)
    code = _resume(step, "--set", "training.max_steps=4")
    err = capsys.readouterr().err
    assert not pwned.exists()                     # nothing of the pickle ran
    assert code == 2, err[-2000:]
    assert "training_state.pt was not loaded" in err and "could run code" in err
    assert "Resume from a checkpoint you trust" in err
