"""lm-evaluation-harness on an exported model, offline: `lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True` on the tiny local tasks in lm_eval_tasks/ (a multiple-choice
cloze and its greedy continuations).  The harness's log-likelihoods equal our own scoring of the
same strings, and its generations equal our greedy `generate_text`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_language_model
from sparse_ssm.generate import GenerationConfig, generate_text
from sparse_ssm.hf import export_model

pytestmark = pytest.mark.slow          # the harness in a fresh interpreter

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
pytest.importorskip("lm_eval")


def our_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): the tokens of context + continuation after those of context."""
    whole = tokenizer.encode(context + continuation).ids
    start = len(tokenizer.encode(context).ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(start, len(whole)))


def samples(folder: Path, task: str) -> list[dict]:
    (path,) = folder.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_harness_scores_like_we_do(tmp_path):
    model, tokenizer = tiny_language_model(seed=4)
    export_model(model, tokenizer, tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={tmp_path / 'hf'},trust_remote_code=True", "--tasks", "tiny_cloze,tiny_continue",
                           "--include_path", str(TASKS), "--device", "cpu", "--batch_size", "2", "--log_samples",
                           "--output_path", str(tmp_path / "results")],
                          cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cloze = samples(tmp_path / "results", "tiny_cloze")
    assert len(cloze) == 6
    for sample in cloze:
        doc = sample["doc"]
        harness = [float(resp[0][0]) for resp in sample["resps"]]
        ours = [our_loglikelihood(model, tokenizer, doc["context"], " " + choice) for choice in doc["choices"]]
        assert harness == pytest.approx(ours, abs=1e-3)
        assert sample["acc"] == float(max(range(len(ours)), key=ours.__getitem__) == doc["answer"])
    settings = GenerationConfig(max_length=8, temperature=0, stop_strings=["\n"])
    for sample in samples(tmp_path / "results", "tiny_continue"):
        assert sample["resps"][0][0] == generate_text(model, tokenizer, [sample["doc"]["context"]], settings)[0]
