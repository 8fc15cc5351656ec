"""Generation: exact filters, greedy = argmax of the full forward, seeds, batching, stop rules, CLI."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, make_text, tiny_config
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM, cli
from sparse_ssm.config import Config
from sparse_ssm.generate import (GenerationConfig, generate, generate_streams, generate_text, load_checkpoint,
                                 stream_generate)
from sparse_ssm.generate.text import TextStream
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


def test_generate_pads_the_rows_that_ended_with_eos():
    m = model()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    sample = dict(max_new_tokens=8, temperature=1.0, seed=2)
    free = generate(m, prompts, **sample)                         # no end token
    eos = int(free[0, 5])                                         # make row 0's third new token the end
    assert eos not in free[0, 3:5].tolist() and eos not in free[1, 3:].tolist()
    out = generate(m, prompts, eos_token_id=eos, **sample)
    assert out.shape == (2, 11) and torch.equal(out[1], free[1])  # row 1 runs on
    assert torch.equal(out[0, :6], free[0, :6]) and out[0, 6:].tolist() == [eos] * 5
    alone = generate(m, prompts[:1], eos_token_id=eos, **sample)
    assert torch.equal(alone, free[:1, :6])                       # every row ended: no padding columns


def test_invalid_settings_and_prompts():
    m = model()
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2), dict(max_length=0)):
        with pytest.raises(ValueError):
            list(stream_generate(m, [[1]], GenerationConfig(**bad)))
    with pytest.raises(ValueError, match="at least one token"):
        list(stream_generate(m, [[]], GenerationConfig()))


@pytest.fixture(scope="module")
def trained(corpus, corpus_tokenizer, tmp_path_factory):
    """A tiny model trained for a few steps through the real trainer."""
    from sparse_ssm.train import Trainer

    run = tmp_path_factory.mktemp("gen") / "run"
    config = tiny_config(corpus, run, tokenizer=corpus_tokenizer, training={"max_steps": 6})
    Trainer(config, log=lambda *_: None).train()
    return run


@pytest.fixture(scope="module")
def loaded(trained):
    return load_checkpoint(trained, "latest", "cpu")


def test_text_generation_with_stop_strings_and_streaming(loaded):
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


def test_text_stream_holds_back_only_an_unfinished_character(loaded):
    """A character split over two byte tokens is shown whole; invalid bytes without end do not stall."""
    tok = loaded.tokenizer
    first, second = tok.encode("é").ids            # its two UTF-8 bytes (no merge of them in this vocabulary)
    stream = TextStream(tok)
    stream.push(first)
    assert stream.take() == ""
    stream.push(second)
    assert stream.take() == "é"
    lone = TextStream(tok)                 # continuation bytes that can never become a character
    for _ in range(6):
        lone.push(second)
    assert lone.take() == "\ufffd" * 3 and lone.take(final=True) == "\ufffd" * 3


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_generate_streams_and_writes_files(trained, tmp_path):
    """The generate command's smoke test, in a fresh interpreter."""
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


@pytest.fixture
def continuation(trained, capsys):
    """continuation(*flags): the text `generate` adds to the prompt "The sun", in this process."""
    def run(*flags, prompt="The sun"):
        code = cli.main(["generate", "--model-dir", str(trained), "--checkpoint", "latest", "--prompt", prompt, *flags])
        out, err = capsys.readouterr()
        assert code == 0, err
        head = "" if "--no-stream" not in flags else "--- [1.1] ---\n"
        assert out.startswith(head + prompt) and out.endswith("\n")
        return out[len(head + prompt):-1]
    return run


def test_cli_generate_seed_reproduces_and_max_length_counts_the_new_tokens(continuation, loaded, trained, capsys):
    sampled = continuation("--seed", "3", "--temperature", "1.0", "--max-length", "20", "--no-stream")
    assert sampled == continuation("--seed", "3", "--temperature", "1.0", "--max-length", "20", "--no-stream")
    assert sampled != continuation("--seed", "4", "--temperature", "1.0", "--max-length", "20", "--no-stream")
    assert sampled == generate_text(loaded.model, loaded.tokenizer, ["The sun"],
                                    GenerationConfig(max_length=20, temperature=1.0, seed=3))[0]
    tok = loaded.tokenizer
    greedy = [int(s.tokens[0]) for s in stream_generate(loaded.model, [tok.encode("The sun").ids],
                                                          GenerationConfig(max_length=12, temperature=0))]
    assert len(greedy) == 12 and tok.token_to_id("<|endoftext|>") not in greedy
    for n in (1, 5, 12):          # greedy: n new tokens are the first n of a longer run
        assert continuation("--temperature", "0", "--max-length", str(n)) == tok.decode(greedy[:n])
    for seed in range(4):         # the report counts the ids sampled, not those of the text encoded again
        streams = generate_streams(loaded.model, tok, ["The sun"], GenerationConfig(max_length=20, temperature=1.0,
                                                                                    seed=seed))
        assert cli.main(["generate", "--model-dir", str(trained), "--checkpoint", "latest", "--prompt", "The sun",
                         "--max-length", "20", "--temperature", "1.0", "--seed", str(seed)]) == 0
        assert f"(1 sequence(s), {len(streams[0].ids)} new tokens in" in capsys.readouterr().err
        assert 0 < len(streams[0].ids) <= 20 and tok.decode(streams[0].ids).startswith(streams[0].text)


def test_cli_generate_repetition_penalty_and_stop_strings(continuation, loaded):
    greedy = ("--temperature", "0", "--max-length", "30")
    plain = continuation(*greedy)
    penalised = continuation(*greedy, "--repetition-penalty", "5")        # this barely trained model repeats itself
    assert penalised != plain and penalised == generate_text(
        loaded.model, loaded.tokenizer, ["The sun"], GenerationConfig(max_length=30, temperature=0,
                                                                       repetition_penalty=5.0))[0]
    stop = penalised[len(penalised) // 2:len(penalised) // 2 + 3]
    assert penalised.index(stop) > 0 and "\ufffd" not in stop
    assert continuation(*greedy, "--repetition-penalty", "5", "--stop", "no such text", "--stop", stop) == \
        penalised[:penalised.index(stop)]


def test_cli_generate_takes_its_defaults_from_the_config(trained, continuation, loaded, tmp_path, capsys):
    config = Config.load(trained / "config.yaml")
    config.generation.max_length, config.generation.temperature, config.generation.stop_strings = 7, 0.0, ["zzz"]
    config.save(tmp_path / "same.yaml")
    greedy = lambda n: generate_text(loaded.model, loaded.tokenizer, ["The sun"],
                                     GenerationConfig(max_length=n, temperature=0))[0]
    assert continuation("--config", str(tmp_path / "same.yaml")) == greedy(7)
    assert continuation("--config", str(tmp_path / "same.yaml"), "--max-length", "3") == greedy(3)   # flags win
    config.model.hidden_dim, config.model.num_layers = 64, 3
    config.save(tmp_path / "other.yaml")
    code = cli.main(["generate", "--config", str(tmp_path / "other.yaml"), "--model-dir", str(trained), "--checkpoint",
                     "latest", "--prompt", "The sun", "--no-stream"])
    out, err = capsys.readouterr()
    assert code == 0 and out == f"--- [1.1] ---\nThe sun{greedy(7)}\n"        # the checkpoint's model
    assert "describes another model than the checkpoint" in err and "hidden_dim: 64 (config) vs 32 (checkpoint)" in err


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p: must be <= 1"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["--prompt", "x", "--checkpoint", "12345"], "does not exist"),
    (["--prompt", "x", "--num-return-sequences", "0"], "--num-return-sequences: must be >= 1, got 0"),
])
def test_cli_generate_errors(trained, args, message, capsys):
    assert cli.main(["generate", "--model-dir", str(trained), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_missing_model_dir(tmp_path, capsys):
    assert cli.main(["generate", "--model-dir", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist; train one first" in capsys.readouterr().err


def test_cli_prompts_file(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sun\n\nA gentle\n")
    assert cli.main(["generate", "--model-dir", str(trained), "--prompts-file", str(prompts), "--max-length", "4",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "--- [1.1] ---\nThe sun" in out and "--- [2.1] ---\nA gentle" in out


def scored_once_loss(m, ids, length, stride):
    """The definition, by hand: windows of `length` every `stride` tokens (the last one ending at
    the end); each predicts the tokens after the previous window's end, with its own context."""
    n = ids.shape[1]
    starts = list(range(0, n - length + 1, stride))
    starts += [n - length] if starts[-1] != n - length else []
    total, count, scored_to = 0.0, 0, 0
    for start in starts:
        with torch.no_grad():
            logp = torch.log_softmax(m(ids[:, start:start + length]).logits[0].double(), -1)
        for p in range(max(scored_to, start) + 1, start + length):
            total -= float(logp[p - start - 1, ids[0, p]])
            count += 1
        scored_to = start + length - 1
    return total / count, count


def test_evaluate_perplexity_matches_a_direct_computation(loaded, tmp_path):
    from sparse_ssm.data.tokenizer import EOS
    from sparse_ssm.train.evaluation import perplexity_on_file

    m, tok = copy.deepcopy(loaded.model).double(), loaded.tokenizer     # float64: context effects >> rounding
    text = make_text(3, seed=11)
    path = tmp_path / "eval.txt"
    path.write_text(text)
    ids = torch.tensor([tok.encode(text).ids + [tok.token_to_id(EOS)]])
    n = ids.shape[1]
    assert n > 40
    one_window = perplexity_on_file(m, tok, path, max_seq_len=n)
    assert math.isclose(one_window["loss"], scored_once_loss(m, ids, n, n)[0], rel_tol=1e-10)
    assert math.isclose(one_window["bits_per_byte"], one_window["loss"] * (n - 1) / math.log(2) / len(text.encode()),
                        rel_tol=1e-5)
    # sliding windows: every token once (with stride < window), with the context of its window
    for length, stride in ((16, 8), (12, 5), (16, 16)):
        sliding = perplexity_on_file(m, tok, path, max_seq_len=length, stride=stride, batch_size=3)
        loss, count = scored_once_loss(m, ids, length, stride)
        assert sliding["tokens_scored"] == count and (count == n - 1 or stride == length)
        assert math.isclose(sliding["loss"], loss, rel_tol=1e-10), (length, stride)
    assert not math.isclose(scored_once_loss(m, ids, 16, 8)[0], one_window["loss"], rel_tol=1e-7)   # context counts


@pytest.mark.slow
def test_evaluate_command_in_a_fresh_interpreter(trained, loaded, tmp_path):
    """The evaluate command's smoke test: the default stride is half the checkpoint's window."""
    from sparse_ssm.train.evaluation import perplexity_on_file

    path = tmp_path / "eval.txt"
    path.write_text(make_text(6, seed=12))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "evaluate", "--model-dir", str(trained), "--task",
                           "perplexity", "--data", str(path), "--output-file", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    expected = perplexity_on_file(loaded.model, loaded.tokenizer, path, max_seq_len=32, stride=16)
    assert (result["max_seq_len"], result["stride"]) == (32, 16) and math.isclose(result["loss"], expected["loss"],
                                                                                  rel_tol=1e-5)
    assert f"perplexity {expected['perplexity']:.2f}" in proc.stdout
