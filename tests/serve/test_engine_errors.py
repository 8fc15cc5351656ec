"""The decode engine outlives a failing request: a job whose prompt or draw fails ends with
done="error" and a message, the jobs beside it finish as usual, and a failed batched step ends
only the jobs in it; a stopped engine reports the tokens each cancelled job had produced."""

import math
import queue

import pytest

from helpers import tiny_language_model
from sparse_ssm.data.tokenizer import EOS
from sparse_ssm.generate import GenerationConfig, generate_text
from sparse_ssm.serve import BatchEngine, Job


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=2)


@pytest.fixture
def engine(lm):
    model, tokenizer = lm
    engine = BatchEngine(model, tokenizer, tokenizer.token_to_id(EOS), max_batch=4).start()
    yield engine
    engine.stop()


def submit(engine, prompt_ids, settings):
    """Submit a job; return a function that waits for its events: (its text, its last event)."""
    events = queue.Queue()
    engine.submit(Job(prompt_ids, settings, on_event=events.put))

    def outcome(timeout=30):
        text, event = [], None
        while event is None or not event.done:
            event = events.get(timeout=timeout)          # queue.Empty: the engine hung
            text.append(event.text)
        return "".join(text), event
    return outcome


def greedy(n):
    return GenerationConfig(max_length=n, temperature=0)


def test_a_failing_prompt_or_draw_ends_only_its_own_request(engine, lm):
    model, tokenizer = lm
    ids = tokenizer.encode("The quick").ids
    expected = generate_text(model, tokenizer, ["The quick"], greedy(10))[0]
    good = submit(engine, ids, greedy(10))
    out_of_vocabulary = submit(engine, [model.config.vocab_size + 5], greedy(10))        # its prefill fails
    unchecked = GenerationConfig.model_construct(**{**greedy(10).to_dict(), "temperature": math.nan})
    nan_temperature = submit(engine, ids, unchecked)                                       # its draw fails
    for failing in (out_of_vocabulary, nan_temperature):
        _, last = failing()
        assert last.done == "error" and "generation failed" in last.error and "not affected" in last.error
    assert good()[0] == expected
    again = submit(engine, ids, greedy(10))
    assert again()[0] == expected


def test_a_failed_step_ends_the_jobs_in_it_and_the_engine_goes_on(engine, lm, monkeypatch):
    model, tokenizer = lm
    ids = tokenizer.encode("Call me").ids
    real_step, calls = model.step, []

    def step_failing_once(tokens, cache):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real_step(tokens, cache)
    monkeypatch.setattr(model, "step", step_failing_once)
    text, last = submit(engine, ids, greedy(20))()
    assert last.done == "error" and "RuntimeError: device lost" in last.error and last.completion_tokens == 3
    expected = generate_text(model, tokenizer, ["Call me"], greedy(8))[0]
    assert submit(engine, ids, greedy(8))()[0] == expected


def test_stopping_reports_what_each_cancelled_job_produced(lm):
    model, tokenizer = lm
    engine = BatchEngine(model, tokenizer, None, max_batch=1, max_waiting=1).start()
    events = queue.Queue()
    engine.submit(Job(tokenizer.encode("The quick").ids, greedy(100_000), on_event=events.put))
    assert engine.wait_until(lambda s: s["steps"] >= 5, timeout=30)
    engine.stop()
    seen = []
    while not seen or not seen[-1].done:
        seen.append(events.get(timeout=30))
    assert seen[-1].done == "cancelled" and seen[-1].completion_tokens >= 5
    assert seen[-1].prompt_tokens == len(tokenizer.encode("The quick").ids)


def test_a_failing_prompt_read_in_a_batch_with_others_ends_only_its_own_request(lm):
    """Prompts of one length are read in one batched prefill; when one of them fails, they are read
    again one by one, so only the failing request ends with the error."""
    model, tokenizer = lm
    engine = BatchEngine(model, tokenizer, tokenizer.token_to_id(EOS), max_batch=4)
    ids = tokenizer.encode("The quick").ids
    expected = generate_text(model, tokenizer, ["The quick"], greedy(10))[0]
    good = submit(engine, ids, greedy(10))
    bad = submit(engine, [model.config.vocab_size + 5] * len(ids), greedy(10))        # same length, fails
    also_good = submit(engine, ids, greedy(10))
    engine.start()
    try:
        _, last = bad()
        assert last.done == "error" and "not affected" in last.error
        assert good()[0] == expected and also_good()[0] == expected
    finally:
        engine.stop()
