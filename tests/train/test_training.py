"""The trainer: schedule, accumulation, checkpoints, exact resume, non-finite losses, TensorBoard."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, wait_for_line
from sparse_ssm import cli
from sparse_ssm.config import Config, ConfigError
from sparse_ssm.model.checkpoint import load_model, resolve_checkpoint
from sparse_ssm.train import SchedulerConfig, Trainer
from sparse_ssm.train.config import OptimizerConfig
from sparse_ssm.train.optim import build_optimizer, lr_factor
from sparse_ssm.util.errors import CheckpointError, TrainingError


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedules():
    cos = SchedulerConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 110, cos) == 0.0 and lr_factor(5, 110, cos) == 0.5 and lr_factor(10, 110, cos) == 1.0
    assert math.isclose(lr_factor(60, 110, cos), 0.55) and math.isclose(lr_factor(110, 110, cos), 0.1)
    lin = SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(0, 100, lin) == 1.0 and math.isclose(lr_factor(25, 100, lin), 0.75)
    const = SchedulerConfig(name="constant", warmup_steps=4, min_lr_ratio=0.5)
    assert lr_factor(2, 100, const) == 0.5 and lr_factor(50, 100, const) == 1.0


def test_config_sections_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  num_epochs: 2\noptimizer:\n  learning_rate: 1.0e-3\n")
    config = Config.load(path, ["training.num_epochs=5", "scheduler.name=linear", "dataset.data_path=x.json"])
    assert config.training.num_epochs == 5 and config.scheduler.name == "linear"
    for bad, message in [(["training.num_epochs=0"], r"training\.num_epochs: must be >= 1"),
                         (["training.batchsize=3"], r"training\.batchsize: unknown key"),
                         (["training.mixed_precision=fp8"], r"training\.mixed_precision: 'fp8' is not one of"),
                         (["dataset.max_seq_len=4096"], r"dataset\.max_seq_len: \(4096\) must not exceed"),
                         (["optimizer.name=sgd"], r"optimizer\.name"),
                         (["nosection"], r"expected SECTION\.KEY=VALUE")]:
        with pytest.raises(ConfigError, match=message):
            Config.load(path, bad)
    path.write_text("trainin:\n  num_epochs: 2\n")
    with pytest.raises(ConfigError, match="trainin: unknown section"):
        Config.load(path)


def test_fp16_without_cuda_falls_back_to_bf16_with_a_note(tiny, tmp_path):
    notes = []
    trainer = Trainer(tiny(tmp_path / "out", training={"mixed_precision": "fp16"}), log=notes.append)
    assert any("'fp16' needs a CUDA device" in n for n in notes)
    assert trainer.autocast_dtype == torch.bfloat16 and not trainer.opt.scaler.is_enabled()
    assert Config.load(tmp_path / "out" / "config.yaml").training.mixed_precision == "bf16"


def test_optimizer_groups_and_lr_multiplier(tiny, tmp_path):
    trainer = Trainer(tiny(tmp_path / "out"), log=lambda *_: None)
    groups = {g["name"]: g for g in trainer.opt.optimizer.param_groups}
    assert groups["no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 0.01
    assert math.isclose(groups["selective"]["initial_lr"], 1.5 * groups["decay"]["initial_lr"])
    assert groups["decay"]["initial_lr"] == 3e-3


def test_gradient_accumulation_equals_one_big_batch(tiny, tmp_path):
    """Two micro-batches of 2 accumulate the gradient of one batch of 4 (compared before the
    optimizer step, which then moves the weights: no warm-up, so the step is not zero)."""
    sections = {"scheduler": {"warmup_steps": 0}}
    big = Trainer(tiny(tmp_path / "a", training={"batch_size": 4, "max_steps": 1}, **sections),
                  log=lambda *_: None)
    small = Trainer(tiny(tmp_path / "b", training={"batch_size": 2, "gradient_accumulation_steps": 2,
                                                                  "max_steps": 1}, **sections), log=lambda *_: None)
    small.model.load_state_dict(big.model.state_dict())
    initial = weights(big.model)
    # same epoch order: the first 4 sequences, as one batch or as two micro-batches
    assert torch.equal(torch.cat(big.batches.epoch(0)), torch.cat(small.batches.epoch(0)))
    grads = {}
    for name, trainer in (("big", big), ("small", small)):
        real_step = trainer.opt.step

        def step(finite=True, trainer=trainer, name=name, real_step=real_step):
            grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            return real_step(finite)
        trainer.opt.step = step
        trainer.train()
    assert grads["big"].keys() == grads["small"].keys() and len(grads["big"]) > 10
    for name, g in grads["big"].items():
        assert g.abs().max() > 0 or "a_up" in name or "D" in name, name
        assert torch.allclose(g, grads["small"][name], rtol=1e-4, atol=1e-7), name
    moved = [n for n, w in weights(big.model).items() if not torch.equal(w, initial[n])]
    assert len(moved) > 10                       # the step was taken (Adam's first step is lr * sign(g) almost
                                                 # everywhere, so the weights are not compared: tiny g flip it)


def test_checkpoints_tensorboard_and_round_trip(tiny, tmp_path):
    out = tmp_path / "out"
    trainer = Trainer(tiny(out, training={"max_steps": 7, "save_total_limit": 2}), log=lambda *_: None)
    result = trainer.train()
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-00000006", "step-00000007"]          # rotated to the newest two
    assert (out / "latest").resolve() == (out / "checkpoints" / "step-00000007").resolve()
    assert (out / "best" / "metrics.json").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".old" in p.name]
    model = load_model(resolve_checkpoint(out, "latest"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    trainer.model.eval()
    assert torch.equal(model(ids).logits, trainer.model(ids).logits)
    assert math.isfinite(result["validation"]["perplexity"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/perplexity"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 7]


def test_overwrite_replaces_a_longer_earlier_run_in_the_same_directory(tiny, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny(out, training={"max_steps": 9}), log=lambda *_: None).train()
    assert (out / "checkpoints" / "step-00000009").is_dir()
    again = Trainer(tiny(out, training={"max_steps": 4, "save_total_limit": 1}), overwrite=True, log=lambda *_: None)
    again.train()                     # the earlier run's checkpoints are gone, never the new run's own
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    assert (out / "latest").resolve().name == "step-00000004"


def test_corrupt_checkpoint_is_reported(tiny, tmp_path):
    out = tmp_path / "out"
    Trainer(tiny(out, training={"max_steps": 3}), log=lambda *_: None).train()
    ckpt = resolve_checkpoint(out, "latest")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt.*train again without --resume"):
        Trainer(tiny(out, training={"max_steps": 6}), resume="latest", log=lambda *_: None)
    (ckpt / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(out, "latest")


def test_resume_is_exact(tiny, tmp_path):
    extra = {"max_steps": 9, "save_steps": 100, "eval_steps": 4}
    model_kw = {"dropout": 0.1}                 # dropout exercises the saved RNG state
    straight = Trainer(tiny(tmp_path / "a", training=extra, model=model_kw), log=lambda *_: None)
    straight.train()
    first = Trainer(tiny(tmp_path / "b", training=extra, model=model_kw), log=lambda *_: None)
    first.train(until_step=5)
    resumed = Trainer(tiny(tmp_path / "b", training=extra, model=model_kw), resume="latest",
                      log=lambda *_: None)
    assert resumed.state.step == 5
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_finite_losses_are_skipped_then_stop(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = Trainer(tiny(out, training={"max_steps": 6, "max_consecutive_nonfinite": 3}),
                      log=lambda *_: None)
    calls = {"n": 0}
    real = Trainer._loss

    def flaky(self, ids, labels):
        calls["n"] += 1
        loss, terms = real(self, ids, labels)
        return (loss * float("nan") if calls["n"] in (2, 3) else loss), terms
    monkeypatch.setattr(Trainer, "_loss", flaky)
    result = trainer.train()
    assert result["step"] == 6 and result["nonfinite_skipped"] == 2

    trainer = Trainer(tiny(out, training={"max_steps": 12, "max_consecutive_nonfinite": 3}),
                      resume="latest", log=lambda *_: None)
    monkeypatch.setattr(Trainer, "_loss", lambda self, ids, labels: (torch.tensor(float("inf"), requires_grad=True), {}))
    # no step since resuming was finite: step-6 is not called "the last good" checkpoint
    with pytest.raises(TrainingError, match="3 non-finite losses in a row, every step since resuming from "
                                            ".*step-00000006.*--resume 3 for train"):
        trainer.train()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tiny, tmp_path):
    """The train command's run in a fresh interpreter: SIGTERM once a step is done (its validation
    line is printed) saves a checkpoint at the end of the current step and exits with 130."""
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    tiny(out, training={"max_steps": 100000, "num_epochs": 1000, "save_steps": 100000, "eval_steps": 1,
                        "eval_max_batches": 1}).save(config)
    with open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "train", "--config", str(config)],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            wait_for_line(proc.stdout, "step 1: validation loss")
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=300)
        finally:
            proc.kill()
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "--resume latest" in stderr
    step = int((out / "latest").resolve().name.split("-")[1])
    assert step > 0 and load_file(str(out / "latest" / "model.safetensors"))


def test_cli_train_resume_and_best_model(tiny, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    tiny(tmp_path / "ignored", training={"max_steps": 4, "eval_max_batches": 1}).save(config)
    run = lambda *args: cli.main(["train", "--config", str(config), "--output-dir", str(tmp_path / "cli"), *args])
    assert run("--seed", "3", "--use-best-model") == 0
    out = capsys.readouterr().out
    assert "on the test split: loss" in out and "checkpoints:" in out
    # the periodic validation covers the first batch only, the final one the whole split: the lines say so
    assert "(first 1 batch; unigram" in out and "(whole split; unigram baseline" in out
    assert Config.load(tmp_path / "cli" / "latest" / "config.yaml").training.seed == 3
    assert run("--resume", "--set", "training.max_steps=6") == 0   # the checkpoint config (seed 3) is kept
    assert "resuming from" in capsys.readouterr().out
    assert (tmp_path / "cli" / "latest").resolve().name == "step-00000006"
    saved = Config.load(tmp_path / "cli" / "latest" / "config.yaml")
    assert saved.training.seed == 3 and saved.training.max_steps == 6


def test_gradient_checkpointing_changes_nothing(tiny, tmp_path):
    plain = Trainer(tiny(tmp_path / "a", training={"max_steps": 2}), log=lambda *_: None)
    ckpt = Trainer(tiny(tmp_path / "b", training={"max_steps": 2, "gradient_checkpointing": True}),
                   log=lambda *_: None)
    ckpt.model.load_state_dict(plain.model.state_dict())
    plain.train()
    ckpt.train()
    for (name, a), b in zip(plain.model.state_dict().items(), ckpt.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name          # recomputation changes nothing


def test_bf16_trains_under_autocast_close_to_fp32(tiny, tmp_path):
    """mixed_precision bf16: the projections run in bfloat16 (autocast is on in the training
    forward), and the losses follow the fp32 run's within bf16 rounding."""
    runs = {}
    for precision in ("no", "bf16"):
        trainer = Trainer(tiny(tmp_path / precision, training={"max_steps": 3, "mixed_precision": precision}),
                          log=lambda *_: None)
        seen, losses = [], []
        proj = trainer.model.blocks[0].mixer.in_proj
        proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype) if module.training else None)

        def recording(ids, labels, *rest, real=trainer._loss, losses=losses):
            loss, terms = real(ids, labels, *rest)
            losses.append(float(loss.detach()))
            return loss, terms
        trainer._loss = recording
        result = trainer.train()
        runs[precision] = seen, losses, result
    (seen32, loss32, res32), (seen16, loss16, res16) = runs["no"], runs["bf16"]
    assert set(seen32) == {torch.float32} and set(seen16) == {torch.bfloat16} and len(seen16) == 3
    assert loss32[0] != loss16[0] and math.isclose(loss32[0], loss16[0], rel_tol=2e-2)    # the same weights at step 1
    assert all(math.isclose(a, b, rel_tol=5e-2) for a, b in zip(loss32, loss16))
    assert math.isclose(res16["validation"]["loss"], res32["validation"]["loss"], rel_tol=5e-2)
    assert res16["nonfinite_skipped"] == 0


def test_without_param_groups_every_parameter_decays():
    """optimizer.use_param_groups false: one group, weight decay for all parameters (the SSM bases,
    norms and embeddings too), no selective learning-rate multiplier."""
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM

    model = SparseSSMForCausalLM(SparseSSMConfig(vocab_size=97, hidden_dim=32, state_dim=8, ffn_dim=48, num_layers=1,
                                                 dropout=0.0, num_heads=2))
    results = {}
    for grouped in (True, False):
        copy = SparseSSMForCausalLM(model.config)
        copy.load_state_dict(model.state_dict())
        optimizer = build_optimizer(copy, OptimizerConfig(learning_rate=0.1, weight_decay=0.5, use_param_groups=grouped,
                                                          selective_param_lr_multiplier=3.0))
        for p in copy.parameters():
            p.grad = torch.zeros_like(p)          # Adam's step is 0: only the decoupled weight decay moves weights
        optimizer.step()
        results[grouped] = optimizer, dict(copy.named_parameters())
    optimizer, params = results[False]
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == 0.5 and group["lr"] == 0.1
    assert len(group["params"]) == len({id(p) for p in model.parameters()})      # tied embeddings once
    for name, p in model.named_parameters():
        assert torch.allclose(params[name], p * (1 - 0.1 * 0.5)), name           # decayed, whatever it is
    grouped = results[True][1]
    assert torch.equal(grouped["blocks.0.mixer.generator.A_base"], model.blocks[0].mixer.generator.A_base)


def test_parameter_groups_exclude_ssm_bases_norms_biases_embeddings_from_decay():
    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
    from sparse_ssm.train.optim import parameter_groups

    model = SparseSSMForCausalLM(SparseSSMConfig(vocab_size=97, hidden_dim=32, state_dim=8, ffn_dim=48, num_layers=2,
                                                 dropout=0.0, num_heads=2))
    groups = {g["name"]: g for g in parameter_groups(model, 0.1, selective_lr_multiplier=1.5)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0
    for suffix in ("A_base", "D_base", "dt_bias", "mixer_norm.weight", "conv.bias", "embed.weight", "ffn.up.bias"):
        assert any(n.endswith(suffix) for n in no_decay), suffix
    selective = {names[id(p)] for p in groups["selective"]["params"]}
    assert selective and all(".generator." in n for n in selective)
    assert groups["selective"]["lr_multiplier"] == 1.5
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert any(n.endswith("in_proj.weight") for n in decay)
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len({id(p) for p in model.parameters()})


def test_divergence_names_a_checkpoint_whose_weights_give_a_finite_loss(tiny, tmp_path):
    """lr 1e5: the update of step 2 leaves finite weights that give NaN, so step-2 (the latest) is
    not a good checkpoint; the stop names step-1 (and rotation kept it despite save_total_limit 1)."""
    out = tmp_path / "out"
    trainer = Trainer(tiny(out, training={"max_steps": 30, "save_steps": 1, "eval_steps": 1000,
                                          "max_consecutive_nonfinite": 2, "save_total_limit": 1},
                           optimizer={"learning_rate": 1e5}), log=lambda *_: None)
    with pytest.raises(TrainingError, match="diverged; the last good checkpoint is") as stop:
        trainer.train()
    named = resolve_checkpoint(out, str(stop.value).split("good checkpoint is ")[1].split()[0])
    latest = resolve_checkpoint(out, "latest")
    ids = torch.tensor([trainer.train_set[0][0].tolist()])
    loss = lambda path: float(load_model(path)(ids, labels=ids, return_logits=False).loss.detach())
    assert latest != named and not math.isfinite(loss(latest))
    assert math.isfinite(loss(named)) and named.name == "step-00000001"


def test_training_without_a_validation_split(tiny, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    tiny(tmp_path / "out", training={"max_steps": 3}, dataset={"val_split": 0.0, "test_split": 0.0}).save(config)
    assert cli.main(["train", "--config", str(config), "--use-best-model"]) == 2
    assert "--use-best-model evaluates" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli.main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "no validation data (dataset.val_split = 0.0)" in out and "3 steps: no validation data" in out
    assert "best:" not in out and not (tmp_path / "out" / "best").exists()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=pytest.fail)   # no NaN
    assert metrics["validation"] is None and metrics["step"] == 3
