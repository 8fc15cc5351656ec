"""Sampling at the edges of its settings: a temperature or repetition penalty so small that a plain
division overflows behaves as greedy instead of crashing, seeds are bounded by what torch takes
(the last ones wrap for the sequences after the first), and out-of-range values are refused with
the key (or the CLI flag) named — in the API and on the command line."""

import pytest
import torch

from helpers import tiny_language_model, write_checkpoint
from sparse_ssm import cli
from sparse_ssm.generate import GenerationConfig, generate_text
from sparse_ssm.generate.sampling import next_token
from sparse_ssm.util.errors import ConfigError

TINY = 1e-45                     # a float32 denormal: logits / TINY overflows to inf


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=1, max_seq_len=1024)      # the default dataset.max_seq_len


def test_a_tiny_temperature_is_greedy():
    logits = torch.tensor([3.0, 9.5, -2.0, 9.0, 0.5])
    unseen = torch.zeros(5, dtype=torch.bool)
    settings = GenerationConfig(temperature=TINY)
    draws = {next_token(logits, unseen, settings, torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {1}


def test_a_tiny_repetition_penalty_keeps_a_proper_distribution():
    """Penalty 1e-45 lifts the seen positive logits to the largest float (not inf): the draw is
    among them, uniformly, and never fails."""
    logits = torch.tensor([3.0, 9.5, -2.0, 1.0, 0.5])
    seen = torch.tensor([True, False, True, True, False])
    draws = {next_token(logits, seen, GenerationConfig(repetition_penalty=TINY), torch.Generator().manual_seed(s))
             for s in range(40)}
    assert draws == {0, 3}          # the seen tokens with positive logits; -2.0 * 1e-45 is ~0, far below


def test_tiny_values_generate_text_like_greedy(lm):
    model, tokenizer = lm
    greedy = generate_text(model, tokenizer, ["The quick"], GenerationConfig(max_length=12, temperature=0))
    tiny = generate_text(model, tokenizer, ["The quick"], GenerationConfig(max_length=12, temperature=TINY, seed=3))
    assert tiny == greedy


def test_the_largest_seed_works_and_the_next_sequences_wrap(lm):
    model, tokenizer = lm
    last = 2**64 - 1
    texts = generate_text(model, tokenizer, ["The"], GenerationConfig(max_length=8, seed=last), num_return_sequences=2)
    assert texts[1] == generate_text(model, tokenizer, ["The"], GenerationConfig(max_length=8, seed=0))[0]


@pytest.mark.parametrize("values, message", [
    (dict(seed=2**64), "generation.seed: must be <= 18446744073709551615, got 18446744073709551616"),
    (dict(seed=-1), "generation.seed: must be >= 0, got -1"),
    (dict(temperature=float("inf")), "generation.temperature: expected a finite number"),
    (dict(temperature=float("nan")), "generation.temperature: expected a finite number"),
    (dict(repetition_penalty=float("inf")), "generation.repetition_penalty: expected a finite number"),
    (dict(top_p=float("nan")), "generation.top_p: expected a finite number"),
    (dict(stop_strings=["ok", ""]), "generation.stop_strings: an empty stop string"),
])
def test_out_of_range_settings_name_their_key(values, message):
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**values)
    assert str(e.value).startswith(message)


@pytest.fixture(scope="module")
def model_dir(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampling-cli") / "tinyrun"
    write_checkpoint(folder / "best", *lm)
    return folder


@pytest.mark.parametrize("flags", [["--temperature", "1e-45"], ["--repetition-penalty", "1e-45"],
                                   ["--seed", str(2**64 - 1), "--num-return-sequences", "2"]])
def test_cli_generate_takes_the_edge_values(model_dir, flags, capsys):
    code = cli.main(["generate", "--model-dir", str(model_dir), "--prompt", "The", "--max-length", "4",
                     "--device", "cpu", *flags])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2**64)], "error: --seed: must be <= 18446744073709551615, got 18446744073709551616"),
    (["--temperature", "inf"], "error: --temperature: expected a finite number"),
    (["--stop", ""], "error: --stop: an empty stop string"),
])
def test_cli_generate_refuses_out_of_range_values(model_dir, flags, message, capsys):
    code = cli.main(["generate", "--model-dir", str(model_dir), "--prompt", "The", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and "Traceback" not in err
