"""Distillation: the loss against a hand computation, the compacted teacher vocabulary, and a
distillation run end to end on a dataset written by create-synthetic."""

import math

import numpy as np
import pytest
import torch

from helpers import tiny_config
from sparse_ssm.data.teacher_targets import prepare_distillation as prepare
from sparse_ssm.data.tokenizer import CompactTokenizer
from sparse_ssm.train.losses import distillation_loss
from sparse_ssm.teacher.synthetic import create_synthetic, output_paths
from sparse_ssm.data.tokenizer import EOS, PAD, load_tokenizer
from ssm_teacher import SSMTeacher, synthetic_config


def hand_loss(logits, labels, top_ids, top_lp, alpha, T):
    """The documented formula with plain Python loops."""
    b, L, V = logits.shape
    ce_terms, kd_terms = [], []
    for i in range(b):
        for t in range(L - 1):
            target = int(labels[i, t + 1])
            if target == -100:
                continue
            z = [float(v) for v in logits[i, t]]
            norm = math.log(sum(math.exp(v) for v in z))
            ce_terms.append(norm - z[target])
            slots = [(int(a), float(p)) for a, p in zip(top_ids[i, t + 1], top_lp[i, t + 1]) if a >= 0]
            if not slots:
                continue
            p = [math.exp(lp) for _, lp in slots] + [max(0.0, 1 - sum(math.exp(lp) for _, lp in slots))]
            q = [x ** (1 / T) for x in p]
            q = [x / sum(q) for x in q]
            zt = [v / T for v in z]
            norm_t = math.log(sum(math.exp(v) for v in zt))
            s = [math.exp(zt[a] - norm_t) for a, _ in slots]
            s.append(1 - sum(s))
            kd_terms.append(sum(qi * (math.log(qi) - math.log(si)) for qi, si in zip(q, s) if qi > 0))
    ce = sum(ce_terms) / len(ce_terms)
    kd = T * T * sum(kd_terms) / len(kd_terms)
    return (1 - alpha) * ce + alpha * kd, ce, kd


def example(seed=0, b=2, L=5, V=7, k=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, L, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (b, L), generator=g)
    labels[0, 2] = -100
    teacher = torch.log_softmax(torch.randn(b, L, V, generator=g, dtype=torch.float64) * 2, -1)
    top_lp, top_ids = torch.topk(teacher, k, -1)
    top_ids[1, 3, 1:] = -1                            # empty slots
    top_lp[1, 3, 1:] = float("-inf")
    top_ids[0, 1] = -1                                # a token without teacher targets (a prompt token)
    top_lp[0, 1] = float("-inf")
    return logits, labels, top_ids, top_lp


@pytest.mark.parametrize("alpha,T", [(0.5, 1.0), (0.7, 2.0), (1.0, 0.5)])
def test_loss_equals_the_hand_computation(alpha, T):
    logits, labels, top_ids, top_lp = example()
    loss, ce, kd = distillation_loss(logits, labels, top_ids, top_lp, alpha, T)
    expected = hand_loss(logits, labels, top_ids, top_lp, alpha, T)
    for got, want in zip((loss, ce, kd), expected):
        assert abs(float(got) - want) < 1e-9


def test_full_top_k_at_temperature_one_is_the_exact_kl():
    logits, labels, _, _ = example(seed=1, k=7)
    teacher = torch.log_softmax(torch.randn(logits.shape, dtype=torch.float64), -1)
    top_lp, top_ids = torch.topk(teacher, 7, -1)
    _, _, kd = distillation_loss(logits, labels, top_ids, top_lp, 1.0, 1.0)
    p, s = teacher[:, 1:].exp(), torch.log_softmax(logits[:, :-1], -1)
    kl = (p * (teacher[:, 1:] - s)).sum(-1)[labels[:, 1:] != -100].mean()
    assert abs(float(kd) - float(kl)) < 1e-5


def test_alpha_zero_is_plain_training_and_gradients_are_right():
    from sparse_ssm import SparseSSMConfig
    from sparse_ssm import SparseSSMForCausalLM

    model = SparseSSMForCausalLM(SparseSSMConfig(vocab_size=7, hidden_dim=16, state_dim=4, ffn_dim=0, num_layers=1,
                                                 max_seq_len=16, dropout=0.0))
    _, labels, top_ids, top_lp = example()
    out = model(labels.clamp(min=0), labels=labels)
    loss, ce, _ = distillation_loss(out.logits, labels, top_ids, top_lp, 0.0, 2.0)
    assert torch.allclose(loss, out.loss, atol=1e-6) and torch.allclose(ce, out.loss, atol=1e-6)
    logits, labels, top_ids, top_lp = example(b=2, L=4, V=5, k=2)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: distillation_loss(z, labels, top_ids, top_lp, 0.6, 1.5)[0], (logits,))


def test_compact_tokenizer_round_trip(tmp_path):
    teacher = SSMTeacher(tmp_path).tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    used = np.unique(np.array(teacher.encode(text).ids + [teacher.token_to_id(EOS), teacher.token_to_id(PAD)]))
    compact = CompactTokenizer(teacher, used)
    ids = compact.encode(text).ids
    assert max(ids) < len(used) == compact.get_vocab_size() and compact.decode(ids) == text
    assert compact.token_to_id(EOS) == int(np.searchsorted(used, teacher.token_to_id(EOS)))
    compact.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, CompactTokenizer) and again.encode(text).ids == ids


def test_distillation_run_end_to_end(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparse_ssm import cli
    from sparse_ssm.train import Trainer

    cfg = synthetic_config(tmp_path, distillation=True, top_logprobs=4, num_samples=12, max_new_tokens=40)
    create_synthetic(cfg, SSMTeacher(tmp_path), progress=False, log=lambda *_: None)
    data_path = output_paths(cfg)["json"]
    tokenizer, streams, targets = prepare(tiny_config(data_path, tmp_path, "synthetic").dataset)
    from safetensors.numpy import load_file
    stored = load_file(str(output_paths(cfg)["teacher"]))
    assert sum(len(s) for s in streams.values()) == len(stored["token_ids"]) + 12       # + one end-of-text each
    assert sum(int((t[0] >= 0).any(-1).sum()) for t in targets.values()) == len(stored["top_ids"])
    assert all(len(targets[n][0]) == len(streams[n]) for n in streams)
    run = tmp_path / "run"
    config = tiny_config(data_path, run, "synthetic", training={"max_steps": 6, "logging_steps": 2},
                         distillation={"enabled": True, "alpha": 0.5, "temperature": 2.0})
    config.dataset.stride = config.dataset.max_seq_len = 16
    trainer = Trainer(config, log=lambda *_: None)
    assert trainer.config.model.vocab_size == tokenizer.get_vocab_size() < 300
    result = trainer.train()
    assert math.isfinite(result["validation"]["loss"])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/ce_loss", "train/kd_loss", "train/loss"} <= set(tags)
    ce, kd, loss = (np.array([e.value for e in events.Scalars(f"train/{n}")]) for n in ("ce_loss", "kd_loss", "loss"))
    assert np.allclose(loss, 0.5 * ce + 0.5 * kd, rtol=1e-4) and (kd > 0).all()
    assert (run / "latest" / "vocab_map.json").is_file()
    code = cli.main(["generate", "--model-dir", str(run), "--prompt", "Once upon a time", "--max-length", "8",
                     "--temperature", "0", "--no-stream"])
    assert code == 0 and "Once upon a time" in capsys.readouterr().out
