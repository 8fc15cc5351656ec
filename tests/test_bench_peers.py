"""The benchmark peers (bench/peers.py) are fair against our dropout-0 model: no dropout anywhere,
train mode stated, so a training step of each is deterministic."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import peers  # noqa: E402
from provenance import model_record  # noqa: E402

VOCAB, HIDDEN, LAYERS, STATE, EXPAND, SEQ = 64, 64, 1, 4, 2, 16


def build_gpt2():
    return peers.hf_gpt2(VOCAB, HIDDEN, LAYERS, SEQ)


def build_mamba2():
    return peers.hf_mamba2(VOCAB, HIDDEN, LAYERS, STATE, EXPAND)


def build_hf_mamba():
    return peers.hf_mamba(VOCAB, HIDDEN, LAYERS, STATE, EXPAND)


def build_mambapy():
    pytest.importorskip("mambapy")
    return peers.mambapy(VOCAB, HIDDEN, LAYERS, STATE, EXPAND)


@pytest.mark.parametrize("build", [build_gpt2, build_mamba2, build_hf_mamba, build_mambapy])
def test_peer_has_no_dropout_and_trains_in_train_mode(build):
    model, loss = build()
    record = model_record(model)
    assert record["mode"] == "train" and model.training
    assert all(p == 0.0 for p in record["dropout_p"])
    config = record["config"] or {}
    assert all(config.get(k, 0.0) == 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"))
    ids = torch.randint(0, VOCAB, (2, SEQ))
    first, second = loss(ids), loss(ids)          # in train mode: equal only without dropout
    assert first.item() == second.item()


def test_gpt2_peer_attention_is_sdpa_without_dropout():
    """Attention dropout > 0 keeps PyTorch's CPU SDPA off its flash path: the peer's must be 0."""
    model, _ = build_gpt2()
    attention = model.transformer.h[0].attn
    assert model.config._attn_implementation == "sdpa"
    assert attention.attn_dropout.p == 0.0 and attention.resid_dropout.p == 0.0
