"""`python main.py serve` as a real process: port 0 read back from its first line, a clean exit on
SIGTERM (a stream in flight ends, with the tokens it had), the API key from the environment, and the
project's own `create-synthetic --backend ollama` with our served model as the teacher."""

import json
import os
import signal
import subprocess
import sys

import httpx
import ollama
import pytest

from helpers import ROOT, tiny_language_model, write_checkpoint
from sparse_ssm import cli

pytestmark = pytest.mark.slow          # the server in a fresh interpreter


def start_server(tmp_path, env=None):
    """`main.py serve` on 127.0.0.1, any free port: (process, url)."""
    model, tokenizer = tiny_language_model(seed=0)
    write_checkpoint(tmp_path / "tinyrun" / "best", model, tokenizer)
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "main.py"), "serve", "--model-dir", str(tmp_path / "tinyrun"),
                             "--host", "127.0.0.1", "--port", "0", "--name", "tiny", "--max-tokens", "100000",
                             "--device", "cpu", "--prefill-chunk-tokens", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=None if env is None else {**os.environ, **env})
    line = proc.stdout.readline()
    assert "serving tiny" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split(" on ")[1].split()[0]


@pytest.fixture
def serve_process(tmp_path):
    proc, url = start_server(tmp_path)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_ends_streams_and_exits_cleanly(serve_process):
    proc, url = serve_process
    assert ollama.Client(host=url).generate(model="tiny", prompt="The", options={"num_predict": 3}).done
    endless = {"model": "tiny", "prompt": "The quick", "options": {"num_predict": 100_000, "temperature": 0,
                                                                   "repeat_penalty": 1.0}}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{url}/api/generate", json=endless) as response:
        lines = response.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        last = json.loads(list(lines)[-1])
    assert last["done"] and last["done_reason"] == "cancelled" and last["eval_count"] >= 1
    assert proc.wait(timeout=120) == 0
    assert "server stopped" in proc.stdout.read()


def test_create_synthetic_with_our_server_as_the_ollama_teacher(serve_process, tmp_path, monkeypatch):
    _, url = serve_process
    out = tmp_path / "synthetic"
    monkeypatch.setenv("OLLAMA_HOST", "")
    code = cli.main(["create-synthetic", "--config", str(ROOT / "config" / "default_config.yaml"), "--backend",
                     "ollama", "--host", url, "--model", "tiny", "--num-samples", "3", "--max-new-tokens", "40",
                     "--temperature", "1.0", "--workers", "2", "--output-dir", str(out), "--output-file", "tiny.json",
                     "--set", "synthetic.min_words=2"])               # (in this process; the server is another)
    assert code == 0
    dataset = json.loads((out / "tiny.json").read_text())
    assert dataset["teacher"]["backend"] == "ollama" and dataset["teacher"]["host"] == url
    assert len(dataset["records"]) == 3 and all(r["text"] for r in dataset["records"])


def test_the_api_key_comes_from_the_environment(tmp_path):
    proc, url = start_server(tmp_path, env={"SPARSE_SSM_API_KEY": "s3cret"})
    try:
        assert httpx.get(f"{url}/api/tags", timeout=60).status_code == 401
        assert httpx.get(f"{url}/api/tags", headers={"Authorization": "Bearer s3cret"}, timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
