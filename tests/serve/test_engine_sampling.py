"""The engine draws the rows that share their sampling settings together (`sample_group`), and every
request still samples the tokens it would alone, from its own seed."""

import queue

import torch

import sparse_ssm.serve.engine as engine_module
from helpers import tiny_language_model
from sparse_ssm.data.tokenizer import EOS
from sparse_ssm.generate import GenerationConfig, stream_generate
from sparse_ssm.generate.sampling import next_token, sample_group, seeded_generator
from sparse_ssm.serve import BatchEngine, Job

SHARED = dict(max_length=14, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2)
SETTINGS = ([GenerationConfig(**SHARED, seed=s) for s in range(5)]                  # one group of 5
            + [GenerationConfig(max_length=14, temperature=1.0, seed=s) for s in (7, 8)]   # a group of 2
            + [GenerationConfig(max_length=14, temperature=0.5, seed=9), GenerationConfig(max_length=14, temperature=0)])


def alone(model, ids, settings, eos):
    tokens = [int(s.tokens[0]) for s in stream_generate(model, [ids], settings, eos)]
    return [t for t in tokens if t >= 0 and t != eos]


def test_rows_that_share_settings_are_drawn_together_with_each_request_own_tokens(monkeypatch):
    model, tokenizer = tiny_language_model(seed=2)
    eos = tokenizer.token_to_id(EOS)
    groups = []

    def counted(logits, *args):
        groups.append(logits.shape[0])
        return sample_group(logits, *args)
    monkeypatch.setattr(engine_module, "sample_group", counted)
    engine = BatchEngine(model, tokenizer, eos, max_batch=len(SETTINGS))
    done, jobs = queue.Queue(), []
    prompts = [tokenizer.encode(f"Request {i}: the").ids for i in range(len(SETTINGS))]
    for ids, settings in zip(prompts, SETTINGS):
        jobs.append(engine.submit(Job(ids, settings, on_event=lambda e: e.done and done.put(e.done))))
    engine.start()
    try:
        assert {done.get(timeout=60) for _ in jobs} <= {"stop", "length"}
    finally:
        engine.stop()
    assert 5 in groups and 2 in groups and max(groups) <= 5          # the two groups, drawn together
    for job, ids, settings in zip(jobs, prompts, SETTINGS):
        assert job.stream.ids == alone(model, ids, settings, eos)


def test_sample_group_draws_the_tokens_of_next_token_row_by_row():
    torch.manual_seed(0)
    for settings in (GenerationConfig(temperature=1.0), GenerationConfig(**SHARED), GenerationConfig(temperature=0)):
        apart, together = [seeded_generator(s) for s in range(6)], [seeded_generator(s) for s in range(6)]
        for _ in range(50):
            logits, seen = torch.randn(6, 300) * 4, torch.rand(6, 300) < 0.1
            expected = [next_token(logits[i], seen[i], settings, apart[i]) for i in range(6)]
            assert sample_group(logits, seen, settings, together) == expected
    logits = torch.randn(2, 300)
    logits[1, 3] = float("nan")
    assert sample_group(logits, torch.zeros(2, 300, dtype=torch.bool), settings, [None, None]) is None
