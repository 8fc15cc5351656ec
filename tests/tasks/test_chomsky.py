"""The Chomsky-hierarchy tasks and group word problems: each generator against an independent
brute-force reference (strings decoded to text and evaluated by Python; walks; permutations composed
by hand), the answer-at-the-end layout, scaled accuracy, and the length-generalisation protocol."""

import json
from types import SimpleNamespace

import pytest
import torch

from sparse_ssm import cli
from sparse_ssm.tasks import chomsky
from sparse_ssm.tasks.chomsky import CHOMSKY_TASKS, ChomskyTask, DELETANG_TASKS, SYMBOLS, chomsky_task, scaled_accuracy
from sparse_ssm.tasks.length_generalization import (bucket_accuracies, bucket_lengths, run_length_generalization,
                                                    curriculum_lengths)
from sparse_ssm.tasks.state_tracking import GROUPS
from sparse_ssm.tasks.training import task_model_config
from sparse_ssm.util.errors import ConfigError


def sample(name, batch, length, seed=0):
    strings, answers = DELETANG_TASKS[name].sample(batch, length, torch.Generator().manual_seed(seed))
    return strings.tolist(), answers.tolist()


def text(row):
    return "".join(SYMBOLS[t] for t in row)


@pytest.mark.parametrize("length", [1, 2, 7, 40])
def test_parity_even_pairs_and_cycle_navigation_match_a_brute_force_reference(length):
    strings, answers = sample("parity-check", 64, length)
    assert answers == [row.count(1) % 2 for row in strings]
    strings, answers = sample("even-pairs", 64, length)
    pairs = [sum(text(row[i:i + 2]) in ("01", "10") for i in range(len(row) - 1)) for row in strings]
    assert answers == [p % 2 for p in pairs]
    strings, answers = sample("cycle-navigation", 64, length)
    for row, answer in zip(strings, answers):
        position = 0
        for action in row:
            position = {0: (position - 1) % 5, 1: position, 2: (position + 1) % 5}[action]
        assert answer == position
    assert {len(row) for row in strings} == {length}


@pytest.mark.parametrize("length", [1, 3, 8, 41])
def test_modular_arithmetic_is_python_arithmetic_mod_5_with_precedence(length):
    strings, answers = sample("modular-arithmetic", 200, length)
    assert {len(row) for row in strings} == {length - (length % 2 == 0)}        # odd, as in the source
    for row, answer in zip(strings, answers):
        expression = text(row)
        assert set(expression[1::2]) <= set("+-*") and set(expression[::2]) <= set("01234")
        assert answer == eval(expression) % 5, expression                         # noqa: S307 (digits, + - *)
    ops = {op for row in strings for op in text(row)[1::2]}
    assert length < 8 or ops == set("+-*")


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 9, 30, 120])
def test_bracketed_expressions_have_the_length_asked_for_and_python_s_value(length):
    strings, answers = sample("modular-arithmetic-brackets", 100, length, seed=length)
    assert {len(row) for row in strings} == {length}
    for row, answer in zip(strings, answers):
        expression = text(row)
        assert expression.count("(") == expression.count(")")
        assert answer == eval(expression) % 5, expression                         # noqa: S307
    if length >= 30:
        assert {"*", "+", "-"} <= set(text(strings[0]) + text(strings[1]) + text(strings[2]))


def test_the_answer_is_scored_once_at_the_query_token():
    task = chomsky_task("cycle-navigation")
    inputs, labels = task.batch(8, 10, torch.Generator().manual_seed(1))
    strings, answers = task.sample(8, 10, torch.Generator().manual_seed(1))
    assert inputs.shape == labels.shape == (8, 12) and inputs.max() < task.vocab == 5
    assert torch.equal(inputs[:, :10], strings) and (inputs[:, 10] == task.alphabet).all()
    assert torch.equal(labels[:, -1], answers) and (labels[:, :-1] == -100).all()
    assert chomsky_task("parity-check").vocab == 3 and chomsky_task("modular-arithmetic-brackets").vocab == 11


@pytest.mark.parametrize("group, order", [("s3", 6), ("a5", 60), ("s5", 120)])
def test_word_problems_label_every_prefix_with_its_product(group, order):
    task = chomsky_task("word-problem", group)
    elements = GROUPS[group]().elements                               # the permutations, index -> tuple
    inputs, labels = task.batch(4, 20, torch.Generator().manual_seed(2))
    assert task.classes == task.vocab == order and labels.shape == (4, 21) and (labels[:, 0] == -100).all()
    for word, products in zip(inputs.tolist(), labels.tolist()):
        product = tuple(range(len(elements[0])))
        for t in range(20):
            product = tuple(elements[word[t]][i] for i in product)        # p, then g: i -> g[p[i]]
            assert elements[products[t + 1]] == product


def test_scaled_accuracy_is_one_when_perfect_and_zero_at_chance():
    assert scaled_accuracy(1.0, 0.5) == 1.0 and scaled_accuracy(0.5, 0.5) == 0.0
    assert scaled_accuracy(0.75, 0.5) == 0.5 and scaled_accuracy(0.2, 0.2) == 0.0
    assert scaled_accuracy(0.0, 0.5) == -1.0
    assert [chomsky_task(name).chance for name in CHOMSKY_TASKS] == [0.5, 0.5, 0.2, 0.2, 0.2, 1 / 6]


def test_test_buckets_cover_their_lengths_ends_included():
    assert bucket_lengths(40, 64, True, 8)[0] == 40 and bucket_lengths(40, 64, True, 8)[-1] == 64
    assert bucket_lengths(64, 128, False, 8)[0] == 65 and len(bucket_lengths(64, 128, False, 8)) == 8
    assert bucket_lengths(3, 5, False, 8) == [4, 5] and bucket_lengths(3, 9, False, 1) == [9]


class Oracle(torch.nn.Module):
    """Knows the test labels: predicts them at the first `wrong_after` positions, class 0 after."""

    def __init__(self, task, labels, wrong_after):
        super().__init__()
        self.task, self.labels, self.wrong_after = task, labels, wrong_after

    def forward(self, ids):
        labels = self.labels[:len(ids), :ids.shape[1]]
        target = labels[:, 1:].clamp(min=0)
        logits = torch.nn.functional.one_hot(target, self.task.vocab).float()
        logits[:, self.wrong_after:] = torch.nn.functional.one_hot(torch.zeros_like(target[:, self.wrong_after:]),
                                                                   self.task.vocab).float()
        out = torch.cat([logits, torch.zeros(len(ids), 1, self.task.vocab)], 1)
        return SimpleNamespace(logits=out)


def test_word_problem_positions_are_scored_in_the_bucket_of_their_prefix_length():
    task = chomsky_task("word-problem", "s3")
    generator = torch.Generator().manual_seed(3)
    _, labels = task.batch(32, 30, torch.Generator().manual_seed(3))      # the batch the test will draw
    oracle = Oracle(task, labels, wrong_after=20)    # right on prefixes of up to 20 tokens
    accuracies = bucket_accuracies(oracle, task, (10, 20, 30), generator, 32, 4)
    assert accuracies[0] == 1.0 and accuracies[1] < 0.4


def test_evaluate_runs_a_chomsky_task_and_writes_scaled_accuracy_per_bucket(tmp_path, capsys):
    code = cli.main(["evaluate", "--task", "modular-arithmetic", "--variants", "diagonal,lti", "--steps", "20",
                     "--batch-size", "8", "--train-lengths", "3-12", "--test-buckets", "12,20,30",
                     "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "| variant | scaled @ 12-20 | scaled @ 20-30 | scaled @ 12-30 | seconds |" in out
    saved = json.loads((tmp_path / "modular-arithmetic.json").read_text())
    assert saved["chance"] == 0.2 and saved["train_lengths"] == [3, 12] and saved["test_buckets"] == [12, 20, 30]
    assert [r["variant"] for r in saved["rows"]] == ["diagonal", "lti"]
    row = saved["rows"][0]
    assert set(row["scaled"]) == {"12-20", "20-30"}
    assert row["scaled"]["12-20"] == pytest.approx((row["accuracy"]["12-20"] - 0.2) / 0.8)


@pytest.mark.parametrize("args, message", [
    (["--train-lengths", "40-3"], "argument --train-lengths: need 1 <= MIN <= MAX, got '40-3'"),
    (["--train-lengths", "3to40"], "argument --train-lengths: expected MIN-MAX (e.g. 3-40), got '3to40'"),
    (["--test-buckets", "64,40"], "--test-buckets 64,40: need at least two increasing lengths"),
    (["--test-buckets", "64"], "--test-buckets 64: need at least two increasing lengths"),
    (["--variants", "diagonal,nope"], "--variants: unknown variant 'nope'"),
])
def test_protocol_inputs_are_checked_before_anything_trains(monkeypatch, capsys, args, message):
    def refuse(*_, **__):
        raise AssertionError("a variant trained before the inputs were checked")
    monkeypatch.setattr("sparse_ssm.cli.tasks.run_length_generalization", refuse)
    try:
        code = cli.main(["evaluate", "--task", "parity-check", *args])
    except SystemExit as parser_exit:
        code = parser_exit.code
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["parity-check", "modular-arithmetic-brackets", "word-problem"])
def test_smoke_each_task_family_trains_on_random_lengths_and_tests_longer(name):
    task = chomsky_task(name, "s3")
    seen = []
    result = run_length_generalization(task, task_model_config("diagonal_signed", 96, task.vocab), 30, 8, (3, 9),
                                       (9, 16, 32), seed=0, test_sequences=16, lengths_per_bucket=2,
                                       log=seen.append)
    assert set(result.scaled) == {"9-16", "16-32"} and all(-1 <= s <= 1 for s in result.scaled.values())
    assert result.overall_accuracy == pytest.approx((8 * result.accuracy["9-16"] + 16 * result.accuracy["16-32"]) / 24)
    assert seen and result.final_loss == result.final_loss                  # logged, and not NaN


def test_each_training_batch_has_one_length_drawn_from_the_range():
    lengths = []

    def spy(n, length, generator):
        lengths.append(length)
        return chomsky.parity_check(n, length, generator)
    task = ChomskyTask("spy", 2, 2, spy)
    run_length_generalization(task, task_model_config("diagonal", 64, task.vocab), 60, 4, (3, 6), (6, 8),
                              test_sequences=4, lengths_per_bucket=1)
    assert set(lengths[:60]) == {3, 4, 5, 6} and lengths[60:] == [8]      # then the test length of the bucket


def test_a_length_curriculum_starts_short_and_reaches_the_whole_range_after_its_fraction():
    lengths = curriculum_lengths(1000, (3, 40), torch.Generator().manual_seed(0), curriculum=0.5)
    assert max(lengths[:50]) <= 7 and max(lengths[:250]) <= 22          # the longest grows linearly ...
    assert set(lengths[500:]) == set(range(3, 41))                      # ... and covers 3-40 after half the steps
    assert len(lengths) == 1000 and min(lengths) == 3
    with pytest.raises(ConfigError, match="--curriculum 1.5: the fraction of the steps must be in"):
        curriculum_lengths(10, (3, 40), torch.Generator(), curriculum=1.5)


@pytest.mark.parametrize("name, train_range, edges", [("even-pairs", (2, 5), (2, 5)), ("cycle-navigation", (2, 5), (2, 5)),
                                                      ("word-problem", (1, 3), (1, 2))])
def test_a_small_model_learns_the_lengths_it_trains_on(name, train_range, edges):
    """In distribution the harness can score 1: answers and the positions that predict them line up."""
    task = chomsky_task(name, "s3")
    config = task_model_config("diagonal_signed", 16, task.vocab, hidden_dim=32)
    result = run_length_generalization(task, config, 200, 32, train_range, edges, test_sequences=64, lengths_per_bucket=4)
    assert result.overall_scaled > 0.95, result.scaled


def test_the_library_refuses_a_protocol_it_cannot_run():
    task = chomsky_task("parity-check")
    config = task_model_config("diagonal", 64, task.vocab)
    with pytest.raises(ConfigError, match="--train-lengths 0-5: need 1 <= MIN <= MAX"):
        run_length_generalization(task, config, 1, 1, (0, 5))
    with pytest.raises(ConfigError, match="--test-buckets 40,40: need at least two increasing lengths"):
        run_length_generalization(task, config, 1, 1, (3, 5), (40, 40))
