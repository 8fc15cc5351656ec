"""Weights are checked wherever a checkpoint is loaded (generate, evaluate, export, serve, resume):
non-finite values, wrong shapes and a non-finite optimizer state end in a CheckpointError that
names the file and the earlier checkpoints to use instead."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_config
from sparse_ssm import cli
from sparse_ssm.generate import load_checkpoint
from sparse_ssm.train import Trainer
from sparse_ssm.util.errors import CheckpointError, TrainingError


@pytest.fixture(scope="module")
def run(corpus, corpus_tokenizer, tmp_path_factory):
    """A tiny run's output directory with checkpoints step-3 and step-6 (read-only: copy it)."""
    out = tmp_path_factory.mktemp("corrupt") / "out"
    Trainer(tiny_config(corpus, out, tokenizer=corpus_tokenizer, training={"max_steps": 6, "save_steps": 3}),
            log=lambda *_: None).train()
    return out


@pytest.fixture
def copy(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out, symlinks=True)
    return out


def _rewrite(file, change):
    """Rewrite a safetensors file with `change(tensors)` applied (as a damaged or altered file)."""
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def _poison(checkpoint, name="embed.weight", value=float("nan")):
    def change(tensors):
        tensors[name].view(-1)[0] = value
    _rewrite(checkpoint / "model.safetensors", change)


def test_generate_and_export_refuse_non_finite_weights_and_name_the_earlier_checkpoint(copy, tmp_path, capsys):
    _poison(copy / "checkpoints" / "step-00000006")
    assert cli.main(["generate", "--model-dir", str(copy), "--checkpoint", "latest", "--prompt", "The sun"]) == 2
    err = capsys.readouterr().err
    assert "step-00000006/model.safetensors holds NaN or inf values in 1 tensor(s) (embed.weight)" in err
    assert "step-00000003" in err and "--checkpoint 3" in err and "Traceback" not in err
    export = ["export", "--model-dir", str(copy), "--checkpoint", "latest", "--output", str(tmp_path / "hf")]
    assert cli.main(export) == 2
    assert "holds NaN or inf" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert cli.main(["generate", "--model-dir", str(copy), "--checkpoint", "3", "--prompt", "The sun",
                     "--max-length", "2"]) == 0


def test_serve_refuses_inf_weights(copy):
    """`serve` loads through load_checkpoint (as generate, evaluate and export do)."""
    _poison(copy / "checkpoints" / "step-00000003", "blocks.1.mixer.out_proj.weight", float("inf"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mixer\.out_proj\.weight\): the checkpoint is corrupt.*"
                                              r"no other checkpoint"):
        load_checkpoint(copy, "3", "cpu")


def test_a_tensor_of_another_shape_is_refused_before_loading(copy):
    def change(tensors):
        tensors["norm.weight"] = torch.ones(5)
    _rewrite(copy / "checkpoints" / "step-00000006" / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=r"norm\.weight has shape \(5,\), the config gives \(32,\).*"
                                              r"step-00000003"):
        load_checkpoint(copy, "latest", "cpu")


def test_resume_refuses_a_checkpoint_with_non_finite_weights(copy, capsys):
    _poison(copy / "checkpoints" / "step-00000006")
    code = cli.main(["train", "--config", str(copy / "config.yaml"), "--output-dir", str(copy), "--resume",
                     "--set", "training.max_steps=9"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "holds NaN or inf" in err and "--resume 3 for train" in err and "last good" not in err


def test_resume_refuses_a_non_finite_optimizer_state(copy, tiny):
    def change(tensors):
        name = next(k for k in tensors if k.endswith("exp_avg_sq"))
        tensors[name].view(-1)[0] = float("nan")
    _rewrite(copy / "checkpoints" / "step-00000006" / "training_state.safetensors", change)
    with pytest.raises(CheckpointError, match=r"optimizer tensor\(s\) .*exp_avg_sq.*cannot be resumed.*--resume 3"):
        Trainer(tiny(copy, training={"max_steps": 9}), resume="latest", log=lambda *_: None)


def test_divergence_right_after_resuming_does_not_call_that_checkpoint_the_last_good_one(copy, tiny):
    """Finite weights too large for a finite loss (an altered file): every step from it is skipped."""
    _poison(copy / "checkpoints" / "step-00000006", value=3e38)
    trainer = Trainer(tiny(copy, training={"max_steps": 12, "max_consecutive_nonfinite": 2}), resume="latest",
                      log=lambda *_: None)
    with pytest.raises(TrainingError, match="every step since resuming from .*step-00000006.*--resume 3") as stop:
        trainer.train()
    assert "last good" not in str(stop.value)


@pytest.mark.parametrize("damaged", ["config.yaml", "tokenizer.json"])
def test_a_damaged_config_or_tokenizer_names_the_earlier_checkpoint(copy, capsys, damaged):
    """Not only the weights: a checkpoint's config.yaml or tokenizer.json that does not parse is
    reported as a damaged checkpoint, with the earlier one to use instead (generate and resume)."""
    (copy / "checkpoints" / "step-00000006" / damaged).write_text("model: [unclosed\n")
    assert cli.main(["generate", "--model-dir", str(copy), "--checkpoint", "latest", "--prompt", "The sun"]) == 2
    err = capsys.readouterr().err
    assert f"step-00000006/{damaged}" in err and "damaged" in err and "--checkpoint 3" in err, err
    assert "Traceback" not in err
    if damaged == "config.yaml":
        code = cli.main(["train", "--config", str(copy / "config.yaml"), "--output-dir", str(copy), "--resume",
                         "--set", "training.max_steps=9"])
        err = capsys.readouterr().err
        assert code == 2 and "config.yaml is damaged" in err and "--resume 3 for train" in err, err
