"""Generation: exact filters, greedy = argmax of the full forward, seeds, batching, stop rules, CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, make_text, tiny_config
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.generate import GenerationConfig, generate, generate_text, load_checkpoint, stream_generate
from sparse_ssm.generate.sampling import apply_repetition_penalty, next_token, top_k_filter, top_p_filter



def model(**kw):
    cfg = dict(vocab_size=50, hidden_dim=32, state_dim=8, ffn_dim=0, num_layers=2, dropout=0.0, num_heads=2,
               scan_chunk_size=4)
    cfg.update(kw)
    return SparseSSMForCausalLM(SparseSSMConfig(**cfg)).double().eval()


def test_top_k_and_top_p_on_hand_made_distributions():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log()
    kept = lambda x: torch.isfinite(x).nonzero().flatten().tolist()
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 0)) == [0, 1, 2, 3, 4]
    assert kept(top_p_filter(logits, 0.4)) == [1]                   # the top token alone reaches 0.4
    assert kept(top_p_filter(logits, 0.41)) == [1, 3]
    assert kept(top_p_filter(logits, 0.7)) == [1, 3]                # 0.4 + 0.3 = 0.7 reached
    assert kept(top_p_filter(logits, 0.71)) == [1, 3, 4]
    assert kept(top_p_filter(logits, 0.01)) == [1]                  # never empty
    filtered = torch.softmax(top_p_filter(logits, 0.75), -1)
    assert torch.allclose(filtered[[1, 3, 4]], torch.tensor([0.4, 0.3, 0.15]) / 0.85)


def test_repetition_penalty():
    logits = torch.tensor([2.0, -1.0, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([True, True, False]), 2.0)
    assert out.tolist() == [1.0, -2.0, 3.0]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]).log()
    settings = GenerationConfig(temperature=1.0, top_k=3)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(4000):
        counts[next_token(logits, torch.zeros(5, dtype=torch.bool), settings, g)] += 1
    expected = torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85
    assert counts[0] == 0 and counts[2] == 0
    assert torch.allclose(counts / 4000, expected, atol=0.03)


def test_greedy_equals_argmax_of_the_full_forward_at_every_step():
    m = model()
    prompt = torch.randint(0, 50, (2, 6))
    out = generate(m, prompt, max_new_tokens=10)
    for t in range(6, 16):
        assert torch.equal(m(out[:, :t]).logits[:, -1].argmax(-1), out[:, t])


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    m = model()
    prompt = torch.randint(0, 50, (1, 5))
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95)
    a, b, c = (generate(m, prompt, seed=s, **kw) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batch_of_different_prompt_lengths_equals_one_by_one(temperature):
    m = model(selective_param_class="sparse", sparsity_level=0.5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    settings = dict(max_length=12, temperature=temperature, top_k=20, seed=5)
    batch = [s.tokens for s in stream_generate(m, prompts, GenerationConfig(**settings))]
    for i, p in enumerate(prompts):
        single = [s.tokens[0] for s in stream_generate(m, [p], GenerationConfig(**{**settings, "seed": 5 + i}))]
        assert [int(t[i]) for t in batch] == [int(t) for t in single]


def test_eos_finishes_a_sequence():
    m = model()
    prompt = [[1, 2, 3]]
    greedy = [int(s.tokens[0]) for s in stream_generate(m, prompt, GenerationConfig(max_length=8, temperature=0))]
    eos = greedy[3]
    steps = list(stream_generate(m, prompt, GenerationConfig(max_length=8, temperature=0), eos_token_id=eos))
    assert len(steps) == greedy.index(eos) + 1 and steps[-1].finished.all()


def test_invalid_settings_and_prompts():
    m = model()
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2), dict(max_length=0)):
        with pytest.raises(ValueError):
            list(stream_generate(m, [[1]], GenerationConfig(**bad)))
    with pytest.raises(ValueError, match="at least one token"):
        list(stream_generate(m, [[]], GenerationConfig()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps through the real trainer."""
    from sparse_ssm.train import Trainer

    root = tmp_path_factory.mktemp("gen")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(make_text(120, seed=i))
    Trainer(tiny_config(corpus, root / "run", training={"max_steps": 6}), log=lambda *_: None).train()
    return root / "run"


def test_text_generation_with_stop_strings_and_streaming(trained):
    loaded = load_checkpoint(trained, "latest", "cpu")
    m, tok = loaded.model, loaded.tokenizer
    plain = generate_text(m, tok, ["The sun"], GenerationConfig(max_length=30, temperature=0))[0]
    assert plain
    stop = plain[len(plain) // 2:len(plain) // 2 + 3]
    pieces = []
    cut = generate_text(m, tok, ["The sun"], GenerationConfig(max_length=30, temperature=0, stop_strings=[stop]),
                        on_text=lambda i, piece: pieces.append(piece))[0]
    assert stop not in cut and plain.startswith(cut) and "".join(pieces) == cut
    two = generate_text(m, tok, ["The sun", "A gentle"], GenerationConfig(max_length=10, temperature=0.8, seed=1),
                        num_return_sequences=2)
    assert len(two) == 4


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_generate_streams_and_writes_files(trained, tmp_path):
    proc = run_cli("--model-dir", str(trained), "--checkpoint", "latest", "--prompt", "The sun", "--max-length", "15",
                   "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "2",
                   "--output-file", str(tmp_path / "out.txt"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "out.txt").read_text()
    assert text.startswith("The sun") and proc.stdout.strip() == text.strip()
    proc = run_cli("--model-dir", str(trained), "--prompt", "The sun", "--prompt", "A gentle", "--max-length", "5",
                   "--num-return-sequences", "2", "--output-file", str(tmp_path / "out.jsonl"), "--output-format", "jsonl",
                   "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The sun", "The sun", "A gentle", "A gentle"]
    assert rows[0]["settings"]["temperature"] == 0 and rows[0]["completion"] == rows[1]["completion"]


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p: must be <= 1"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["--prompt", "x", "--checkpoint", "12345"], "does not exist"),
    (["--prompt", "x", "--num-return-sequences", "0"], "--num-return-sequences: must be >= 1, got 0"),
])
def test_cli_generate_errors(trained, args, message):
    proc = run_cli("--model-dir", str(trained), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_generate_missing_model_dir(tmp_path):
    proc = run_cli("--model-dir", str(tmp_path / "nope"), "--prompt", "x")
    assert proc.returncode == 2 and "does not exist; train one first" in proc.stderr


def test_cli_prompts_file(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sun\n\nA gentle\n")
    proc = run_cli("--model-dir", str(trained), "--prompts-file", str(prompts), "--max-length", "4", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "--- [1.1] ---\nThe sun" in proc.stdout and "--- [2.1] ---\nA gentle" in proc.stdout


def test_evaluate_perplexity_matches_a_direct_computation(trained, tmp_path):
    import torch.nn.functional as F

    from sparse_ssm.train.evaluation import perplexity_on_file
    from sparse_ssm.data.tokenizer import EOS

    loaded = load_checkpoint(trained, "latest", "cpu")
    m, tok = loaded.model, loaded.tokenizer
    text = make_text(3, seed=11)
    path = tmp_path / "eval.txt"
    path.write_text(text)
    ids = torch.tensor([tok.encode(text).ids + [tok.token_to_id(EOS)]])
    with torch.no_grad():
        logits = m(ids).logits[0]
    direct = F.cross_entropy(logits[:-1], ids[0, 1:]).item()
    one_window = perplexity_on_file(m, tok, path, max_seq_len=ids.shape[1])
    assert math.isclose(one_window["loss"], direct, rel_tol=1e-5)
    assert math.isclose(one_window["bits_per_byte"], direct * (ids.shape[1] - 1) / math.log(2) / len(text.encode()),
                        rel_tol=1e-5)
    # sliding windows score every token once, with less context: same count, close loss
    sliding = perplexity_on_file(m, tok, path, max_seq_len=16, stride=8)
    assert sliding["tokens_scored"] == ids.shape[1] - 1
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "evaluate", "--model-dir", str(trained), "--task",
                           "perplexity", "--data", str(path), "--output-file", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["tokens_scored"] == ids.shape[1] - 1
