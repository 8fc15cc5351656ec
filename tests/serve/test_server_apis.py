"""The server through the official `ollama` and `openai` clients: answers equal our own
`generate_text`, streams and not, concurrent clients decoded in one batch, the APIs' own error
shapes, a disconnecting client frees its slot, and requests over the limits are refused."""

import threading

import httpx
import ollama
import openai
import pytest

from helpers import tiny_language_model
from server_fixture import running_server
from sparse_ssm.generate import GenerationConfig, generate_text

PROMPTS = ["The quick brown fox", "Call me Ishmael", "It was the best", "A gentle rain"]


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=3)


@pytest.fixture(scope="module")
def server(lm):
    with running_server(*lm, max_batch=8, max_tokens=64) as (url, served):
        yield url, served


def ours(lm, prompt, **settings):
    model, tokenizer = lm
    return generate_text(model, tokenizer, [prompt], GenerationConfig(**settings))[0]


def test_ollama_generate_equals_our_generation_streamed_or_not(server, lm):
    url, _ = server
    client = ollama.Client(host=url)
    greedy = ours(lm, PROMPTS[0], max_length=20, temperature=0)
    options = {"num_predict": 20, "temperature": 0, "repeat_penalty": 1.0}
    answer = client.generate(model="tiny", prompt=PROMPTS[0], options=options)
    assert answer.response == greedy and answer.done and answer.done_reason in ("length", "stop")
    assert answer.eval_count == 20 or answer.done_reason == "stop"
    pieces = [chunk.response for chunk in client.generate(model="tiny:latest", prompt=PROMPTS[0], options=options,
                                                          stream=True)]
    assert "".join(pieces) == greedy and len(pieces) > 1
    sampled = ours(lm, PROMPTS[1], max_length=15, temperature=0.9, top_k=20, top_p=0.95, seed=11)
    answer = client.generate(model="tiny", prompt=PROMPTS[1], options={
        "num_predict": 15, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 11, "repeat_penalty": 1.0})
    assert answer.response == sampled


def test_ollama_chat_tags_show_and_logprobs(server):
    url, _ = server
    client = ollama.Client(host=url)
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    assert client.show("tiny").details.family == "sparse_ssm"
    reply = client.chat(model="tiny", messages=[{"role": "user", "content": "Hello"}], options={"num_predict": 8})
    assert reply.message.role == "assistant" and reply.done
    chunks = list(client.chat(model="tiny", messages=[{"role": "user", "content": "Hi"}],   # greedy: its text is
                              options={"num_predict": 8, "temperature": 0}, stream=True))  # whole characters early
    assert chunks[-1].done and not chunks[0].done
    answer = client.generate(model="tiny", prompt="The sun", logprobs=True, top_logprobs=3,   # (Ollama's default
                             options={"num_predict": 6, "temperature": 0, "repeat_penalty": 1.0})  # penalty is 1.1)
    assert 1 <= len(answer.logprobs) <= 6
    for entry in answer.logprobs:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)      # greedy: the top token


def test_openai_completions_and_chat_equal_our_generation(server, lm):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    greedy = ours(lm, PROMPTS[2], max_length=12, temperature=0)
    answer = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0)
    assert answer.choices[0].text == greedy and answer.usage.completion_tokens <= 12
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == greedy
    two = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=10, temperature=1.0, seed=5, n=2)
    assert [c.text for c in two.choices] == [ours(lm, PROMPTS[3], max_length=10, temperature=1.0, seed=5 + i)
                                             for i in range(2)]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0)
    expected = ours(lm, "User: Hi\nAssistant:", max_length=8, temperature=0, stop_strings=["\nUser:"])
    assert chat.choices[0].message.content == expected
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_openai_completion_logprobs_give_each_tokens_offset_from_the_prompts_start(server):
    """Legacy logprobs: text_offset[i] is where token i begins, counted from the start of the prompt;
    a stream's chunks continue the offsets of the chunks before them."""
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    ask = dict(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=2)
    lp = client.completions.create(**ask).choices[0].logprobs
    expected, at = [], len(PROMPTS[0])
    for token in lp.tokens:
        expected.append(at)
        at += len(token)
    assert len(lp.tokens) >= 2 and lp.text_offset == expected
    streamed = [o for c in client.completions.create(**ask, stream=True) if c.choices[0].logprobs
                for o in c.choices[0].logprobs.text_offset]
    assert streamed == expected

def test_concurrent_clients_are_decoded_in_one_batch(server, lm):
    url, served = server
    expected = [ours(lm, p, max_length=24, temperature=0) for p in PROMPTS]
    results, barrier = [None] * len(PROMPTS), threading.Barrier(len(PROMPTS))
    widest = []

    def watch():
        served.engine.wait_until(lambda s: widest.append(s["running"]) or s["running"] >= 2, timeout=60)

    def ask(i):
        client = ollama.Client(host=url)
        barrier.wait()
        stream = client.generate(model="tiny", prompt=PROMPTS[i], stream=True,
                                 options={"num_predict": 24, "temperature": 0, "repeat_penalty": 1.0})
        results[i] = "".join(chunk.response for chunk in stream)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    watcher.join()
    assert results == expected
    assert max(widest) >= 2          # at least two requests shared decode steps


@pytest.mark.parametrize("call, status, text", [
    (lambda c: c.generate(model="nope", prompt="x"), 404, "not found"),
    (lambda c: c.generate(model="tiny", prompt="x", options={"num_predict": 65}), 400, "--max-tokens"),
    (lambda c: c.generate(model="tiny", prompt="x", options={"temperature": -1}), 400, "temperature"),
    (lambda c: c.generate(model="tiny", prompt="x", options={"num_predict": "ten"}), 400, "num_predict"),
    (lambda c: c.generate(model="tiny", prompt="x", logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (lambda c: c.chat(model="tiny", messages=[{"role": "user", "content": "x"}], options={"top_p": 2}), 400, "top_p"),
])
def test_ollama_errors(server, call, status, text):
    url, _ = server
    with pytest.raises(ollama.ResponseError) as e:
        call(ollama.Client(host=url))
    assert e.value.status_code == status and text in e.value.error


@pytest.mark.parametrize("kwargs, error, param", [
    (dict(model="nope"), openai.NotFoundError, "model"),
    (dict(model="tiny", max_tokens=65), openai.BadRequestError, "max_tokens"),
    (dict(model="tiny", temperature=-1.0), openai.BadRequestError, "temperature"),
    (dict(model="tiny", n=0), openai.BadRequestError, "n"),
    (dict(model="tiny", stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, "stop"),
])
def test_openai_errors(server, kwargs, error, param):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(error) as e:
        client.completions.create(prompt="x", **kwargs)
    assert e.value.body["param"] == param and e.value.body["message"]


def test_malformed_json_gets_each_apis_error_shape(server):
    url, _ = server
    ollama_reply = httpx.post(f"{url}/api/generate", content=b"{not json")
    assert ollama_reply.status_code == 400 and "invalid JSON" in ollama_reply.json()["error"]
    openai_reply = httpx.post(f"{url}/v1/completions", content=b"[1, 2]")
    assert openai_reply.status_code == 400 and openai_reply.json()["error"]["type"] == "invalid_request_error"


def test_a_disconnected_client_frees_its_slot_and_a_full_server_refuses():
    """One slot, no queue: a second request is refused (503) while a long stream runs; once that
    client hangs up its row is dropped and the next request is served."""
    lm = tiny_language_model(seed=0)
    model, tokenizer = lm
    endless_text = ours(lm, "The quick", max_length=300, temperature=0)
    assert len(tokenizer.encode(endless_text).ids) >= 290          # greedy never ends here: a stream only a hang-up stops
    with running_server(*lm, max_batch=1, max_waiting=0, max_tokens=100_000) as (url, served):
        endless = {"model": "tiny", "prompt": "The quick", "options": {"num_predict": 100_000, "temperature": 0, "repeat_penalty": 1.0}}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{url}/api/generate", json=endless) as response:
                assert response.status_code == 200
                lines = response.iter_lines()          # kept: a dropped iterator closes the response
                next(lines)
                assert served.engine.status()["running"] == 1
                with pytest.raises(ollama.ResponseError) as e:
                    ollama.Client(host=url).generate(model="tiny", prompt="x", options={"num_predict": 2})
                assert e.value.status_code == 503 and "busy" in e.value.error
        assert served.engine.wait_until(lambda s: s["running"] == 0, timeout=60)
        answer = ollama.Client(host=url, timeout=60).generate(model="tiny", prompt="x", options={"num_predict": 2})
        assert answer.done
