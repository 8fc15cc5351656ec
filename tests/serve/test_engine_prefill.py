"""Continuous batching without stalls: a long prompt is read one chunk between two decode steps of
the running streams, a short request that arrives meanwhile joins at the next round (before the
long prompt is done), and every stream decodes the greedy tokens it would alone.  The order of
the model's prefill and step calls is recorded (no timing)."""

import queue

import pytest

from helpers import make_text, tiny_language_model
from sparse_ssm.data.tokenizer import EOS
from sparse_ssm.generate import GenerationConfig, stream_generate
from sparse_ssm.serve import BatchEngine, Job

CHUNK = 8


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=4)


def alone(model, ids, n, eos):
    """The greedy tokens of `ids` generated on its own (end-of-text left out)."""
    steps = stream_generate(model, [ids], GenerationConfig(max_length=n, temperature=0), eos)
    tokens = [int(s.tokens[0]) for s in steps]
    return [t for t in tokens if t >= 0 and t != eos]


def recording(model, monkeypatch):
    """Record ("prefill", tokens) and ("step", rows) in call order."""
    calls, prefill, step = [], model.prefill, model.step

    def recorded_prefill(ids, *args, **kwargs):
        calls.append(("prefill", ids.shape[1]))
        return prefill(ids, *args, **kwargs)

    def recorded_step(tokens, cache):
        calls.append(("step", tokens.shape[0]))
        return step(tokens, cache)
    monkeypatch.setattr(model, "prefill", recorded_prefill)
    monkeypatch.setattr(model, "step", recorded_step)
    return calls


def decode_all(engine, prompts, n):
    """Submit greedy jobs of n new tokens for `prompts` to a stopped engine, start it, wait for them all,
    stop it: the jobs."""
    done = queue.Queue()
    jobs = [engine.submit(Job(p, GenerationConfig(max_length=n, temperature=0), on_event=lambda e: e.done and
                              done.put(e.done))) for p in prompts]
    engine.start()
    try:
        for _ in prompts:
            done.get(timeout=60)
    finally:
        engine.stop()
    return jobs


def test_a_long_prompt_is_read_one_chunk_between_decode_steps(lm, monkeypatch):
    model, tokenizer = lm
    eos = tokenizer.token_to_id(EOS)
    short_a, short_c = tokenizer.encode("The quick").ids, tokenizer.encode("Call me").ids
    long_b = tokenizer.encode(make_text(30, seed=5)).ids[:61]              # 7 whole chunks and 5 tokens
    calls = recording(model, monkeypatch)
    engine = BatchEngine(model, tokenizer, eos, max_batch=4, prefill_chunk_tokens=CHUNK)
    done, jobs = queue.Queue(), {}

    def submit(name, ids, n):
        jobs[name] = engine.submit(Job(ids, GenerationConfig(max_length=n, temperature=0),
                                       on_event=lambda e: e.done and done.put((name, e.done))))
    submit("a", short_a, 40)
    submit("b", long_b, 10)
    chunks = []
    real_prefill = model.prefill

    def prefill_then_submit_c(ids, *args, **kwargs):        # "c" arrives while "b"'s second chunk is read
        chunks.append(ids.shape[1])
        out = real_prefill(ids, *args, **kwargs)
        if len(chunks) == 3:
            submit("c", short_c, 30)
        return out
    monkeypatch.setattr(model, "prefill", prefill_then_submit_c)
    engine.start()
    try:
        finished = dict(done.get(timeout=60) for _ in range(3))
    finally:
        engine.stop()
    assert set(finished.values()) <= {"stop", "length"}

    prefills = [i for i, (kind, _) in enumerate(calls) if kind == "prefill"]
    sizes = [calls[i][1] for i in prefills]
    # round 1 reads "a" whole; "b" then goes one chunk a round; "c" (3rd prefill call, made during "b"'s
    # 2nd chunk) is read whole at the round after it, before "b"'s 3rd chunk
    assert sizes == [len(short_a), CHUNK, CHUNK, len(short_c)] + [CHUNK] * 5 + [5]
    assert all(calls[i + 1][0] == "step" for i in prefills), calls      # a decode step after every chunk
    c_joins = prefills[3]
    assert calls[c_joins + 1] == ("step", 2)                            # "c" decodes at the step right after
    assert ("step", 3) in calls[prefills[-1]:]                          # "b" joins the batch at its end
    for name, ids, n in (("a", short_a, 40), ("b", long_b, 10), ("c", short_c, 30)):
        assert jobs[name].stream.ids == alone(model, ids, n, eos), name


def test_short_prompts_that_fit_one_chunk_are_read_in_one_round(lm, monkeypatch):
    """Several waiting prompts whose tokens fit in one chunk together join at the same step."""
    model, tokenizer = lm
    eos = tokenizer.token_to_id(EOS)
    calls = recording(model, monkeypatch)
    engine = BatchEngine(model, tokenizer, eos, max_batch=4, prefill_chunk_tokens=CHUNK)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20]]
    jobs = decode_all(engine, prompts, 6)
    # fewest tokens first: [20], [8, 9], [5, 6, 7] (6 of 8 tokens) in round 1, then the long one's chunks
    assert calls[:4] == [("prefill", 1), ("prefill", 2), ("prefill", 3), ("step", 3)]
    assert calls[4] == ("prefill", CHUNK)
    for job, p in zip(jobs, prompts):
        assert job.stream.ids == alone(model, p, 6, eos)


def test_cancelling_a_job_while_its_prompt_is_read(lm, monkeypatch):
    model, tokenizer = lm
    engine = BatchEngine(model, tokenizer, None, max_batch=2, prefill_chunk_tokens=CHUNK)
    events, real_prefill = queue.Queue(), model.prefill
    job = Job(list(range(5, 45)), GenerationConfig(max_length=5, temperature=0), on_event=events.put)

    def prefill_then_cancel(ids, *args, **kwargs):
        job.cancel()
        return real_prefill(ids, *args, **kwargs)
    monkeypatch.setattr(model, "prefill", prefill_then_cancel)
    engine.submit(job)
    engine.start()
    try:
        last = events.get(timeout=30)
        assert last.done == "cancelled" and last.completion_tokens == 0
        assert engine.wait_until(lambda s: s["running"] == 0 and s["prefilling"] == 0, timeout=30)
    finally:
        engine.stop()
    assert job.prefilled == CHUNK                           # dropped after its first chunk, not read to the end


def test_a_long_prompt_is_not_starved_by_short_ones(lm, monkeypatch):
    """A new one-token request arrives at every prefill call; each is shorter than the long prompt,
    but a prompt passed over max_batch rounds in a row goes first."""
    model, tokenizer = lm
    calls = recording(model, monkeypatch)
    engine = BatchEngine(model, tokenizer, None, max_batch=2, prefill_chunk_tokens=CHUNK)
    done, real_prefill, shorts = queue.Queue(), model.prefill, []

    def submit(ids):
        engine.submit(Job(ids, GenerationConfig(max_length=1, temperature=0), on_event=lambda e: e.done and
                          done.put(e.done)))

    def prefill_then_submit(ids, *args, **kwargs):
        if len(shorts) < 8:
            shorts.append(1)
            submit([7])
        return real_prefill(ids, *args, **kwargs)
    monkeypatch.setattr(model, "prefill", prefill_then_submit)
    submit(list(range(5, 45)))                   # 40 tokens: 5 chunks
    engine.start()
    try:
        for _ in range(9):
            done.get(timeout=60)
    finally:
        engine.stop()
    sizes = [n for kind, n in calls if kind == "prefill"]
    assert sizes[:6] == [CHUNK, 1, 1, CHUNK, 1, 1]     # without the rule: [CHUNK, 1, 1, 1, 1, 1]


def test_the_server_reads_prompts_in_chunks_of_its_setting(monkeypatch):
    """Through the HTTP server (serve.prefill_chunk_tokens): the prompt goes in chunks of 3 tokens
    and the answer equals `generate`'s."""
    import ollama

    from server_fixture import running_server
    from sparse_ssm.generate import generate_text

    model, tokenizer = tiny_language_model(seed=3)
    prompt = "It was the best of times, it was the worst of times"
    expected = generate_text(model, tokenizer, [prompt], GenerationConfig(max_length=10, temperature=0))[0]
    calls = recording(model, monkeypatch)
    with running_server(model, tokenizer, max_batch=2, prefill_chunk_tokens=3) as (url, _):
        answer = ollama.Client(host=url).generate(model="tiny", prompt=prompt, options={
            "num_predict": 10, "temperature": 0, "repeat_penalty": 1.0})
    assert answer.response == expected
    sizes = [n for kind, n in calls if kind == "prefill"]
    assert sum(sizes) == len(tokenizer.encode(prompt).ids) and max(sizes) == 3 and len(sizes) > 3


def test_prompts_that_start_alike_are_read_in_one_batched_prefill(lm, monkeypatch):
    """Waiting prompts with as many tokens to read (all fresh) go through one prefill of all their rows;
    each request still decodes the greedy tokens it would alone."""
    model, tokenizer = lm
    eos = tokenizer.token_to_id(EOS)
    shapes, prefill = [], model.prefill

    def recorded_prefill(ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return prefill(ids, *args, **kwargs)
    monkeypatch.setattr(model, "prefill", recorded_prefill)
    engine = BatchEngine(model, tokenizer, eos, max_batch=8, prefill_chunk_tokens=CHUNK)
    prompts = [[5, 6, 7], [30, 31, 32], [8, 9], [40, 41, 42]]
    jobs = decode_all(engine, prompts, 6)
    assert shapes == [(1, 2), (2, 3), (1, 3)]      # 8 tokens a round: [8, 9], then two of the three alike, then one
    for job, p in zip(jobs, prompts):
        assert job.stream.ids == alone(model, p, 6, eos)
