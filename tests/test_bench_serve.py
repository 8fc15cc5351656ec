"""The serving benchmark's random model has the vocabulary config/small_cpu.yaml asks for, whatever
length the docs have (its tokenizer is trained on a text that does not change with them)."""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import serve  # noqa: E402

from sparse_ssm.data.tokenizer import load_tokenizer  # noqa: E402


def test_random_checkpoint_reaches_the_small_cpu_vocab(tmp_path):
    asked = yaml.safe_load((ROOT / "config" / "small_cpu.yaml").read_text())["model"]["vocab_size"]
    checkpoint = serve.random_checkpoint(tmp_path) / "best"
    assert load_tokenizer(checkpoint / "tokenizer.json").get_vocab_size() == asked
    assert yaml.safe_load((checkpoint / "config.yaml").read_text())["model"]["vocab_size"] == asked
