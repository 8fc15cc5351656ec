"""`--weights fp32|bf16|int8` of generate, evaluate and serve (and `generation.weights`): the
checkpoint is loaded with those weights, the output says which, bad values are refused."""

import json
import signal
import subprocess
import sys

import httpx
import pytest

from helpers import ROOT, make_text, tiny_language_model, write_checkpoint
from sparse_ssm import cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tokenizer = tiny_language_model(seed=0, max_seq_len=1024)   # >= the default dataset.max_seq_len
    return write_checkpoint(tmp_path_factory.mktemp("weights") / "run" / "best", model, tokenizer).parent


def generate(checkpoint, capsys, *flags):
    code = cli.main(["generate", "--model-dir", str(checkpoint), "--prompt", "The quick brown fox", "--temperature",
                     "0", "--max-length", "12", "--no-stream", "--device", "cpu", *flags])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_generate_with_low_precision_weights(checkpoint, capsys, weights):
    code, out, err = generate(checkpoint, capsys, "--weights", weights)
    assert code == 0 and "The quick brown fox" in out
    assert " new tokens in " in err and f"{weights} weights, from " in err


def test_generation_weights_in_a_config_is_the_default_and_the_flag_wins(checkpoint, capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("generation:\n  weights: int8\n")
    assert "int8 weights, from" in generate(checkpoint, capsys, "--config", str(tmp_path / "c.yaml"))[2]
    assert "fp32 weights, from" in generate(checkpoint, capsys, "--config", str(tmp_path / "c.yaml"), "--weights",
                                       "fp32")[2]
    assert "fp32 weights, from" in generate(checkpoint, capsys)[2]


def test_bad_weights_are_refused(checkpoint, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        generate(checkpoint, capsys, "--weights", "int4")
    assert exit_.value.code == 2 and "--weights: invalid choice: 'int4' (choose from 'fp32', 'bf16', 'int8')" in \
        capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("generation:\n  weights: int4\n")
    code, _, err = generate(checkpoint, capsys, "--config", str(tmp_path / "c.yaml"))
    assert code == 2 and "generation.weights" in err and "int8" in err and "Traceback" not in err


def test_evaluate_perplexity_with_int8_weights_is_close_to_float32(checkpoint, capsys, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(make_text(40, seed=3))
    results = {}
    for weights in ("fp32", "int8"):
        out = tmp_path / f"{weights}.json"
        assert cli.main(["evaluate", "--model-dir", str(checkpoint), "--data", str(data), "--max-seq-len", "32",
                         "--device", "cpu", "--weights", weights, "--output-file", str(out)]) == 0
        assert f"{weights} weights)" in capsys.readouterr().out
        results[weights] = json.loads(out.read_text())
    assert results["int8"]["weights"] == "int8"
    assert results["int8"]["perplexity"] == pytest.approx(results["fp32"]["perplexity"], rel=0.02)
    assert results["int8"]["perplexity"] != results["fp32"]["perplexity"]


@pytest.mark.slow                      # the server in a fresh interpreter
def test_serve_with_int8_weights_answers(checkpoint, tmp_path):
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "main.py"), "serve", "--model-dir", str(checkpoint),
                             "--port", "0", "--name", "tiny", "--device", "cpu", "--weights", "int8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert "serving tiny" in line and "int8 weights" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(") on ")[1].split()[0]
        reply = httpx.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "The sun", "stream": False,
                                                          "options": {"num_predict": 5, "temperature": 0}}, timeout=60)
        assert reply.status_code == 200 and reply.json()["done"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
