"""Every request the server refuses gets a clear answer in its API's own error shape, and none
harms the server: sampling values at their edges, wrong types, bodies that are not JSON, too deep,
too large or too slow, unknown routes and methods, the API key, a failing decode step; and the
`serve` command's own errors (a port in use) and its warning when listening beyond loopback."""

import json
import logging
import socket
import time

import httpx
import ollama
import openai
import pytest

from helpers import tiny_language_model, write_checkpoint
from server_fixture import http_head, raw_exchange, running_server
from sparse_ssm import cli
from sparse_ssm.generate import GenerationConfig, generate_text
from sparse_ssm.serve.app import exposure_warning

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=4)


@pytest.fixture(scope="module")
def server(lm):
    with running_server(*lm, max_batch=4, max_tokens=64, max_prompt_tokens=50, max_body_bytes=BODY_LIMIT,
                        read_timeout=1.0) as (url, served):
        yield url, served


def greedy(lm, prompt, n):
    return generate_text(*lm, [prompt], GenerationConfig(max_length=n, temperature=0))[0]


def post(url, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, timeout=30, **kw)


def test_tiny_temperature_and_penalty_decode_like_greedy(server, lm):
    url, _ = server
    for options in ({"temperature": 1e-45, "repeat_penalty": 1.0}, {"temperature": 0, "repeat_penalty": 1e-45}):
        reply = post(url, "/api/generate", {"model": "tiny", "prompt": "The sun", "stream": False,
                                            "options": {"num_predict": 8, "seed": 1, **options}})
        assert reply.status_code == 200 and reply.json()["done"] and reply.json()["eval_count"] >= 1
    reply = post(url, "/api/generate", {"model": "tiny", "prompt": "The sun", "stream": False,
                                        "options": {"num_predict": 8, "temperature": 1e-45, "repeat_penalty": 1.0}})
    assert reply.json()["response"] == greedy(lm, "The sun", 8)


def test_seeds_up_to_the_largest_and_one_past_it(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    two = client.completions.create(model="tiny", prompt="The", max_tokens=4, seed=2**64 - 1, n=2)
    assert len(two.choices) == 2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="The", max_tokens=4, seed=2**64)
    assert e.value.body["param"] == "seed" and "must be <= 18446744073709551615" in e.value.body["message"]


DEEP = b"[" * 30_000 + b"]" * 30_000            # far past the parser's recursion limit, within the body limit


@pytest.mark.parametrize("path, body, status, text", [
    ("/api/generate", DEEP, 400, "nested too deeply"),
    ("/api/generate", b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    ("/api/generate", b'{"prompt": "x", "options": {"temperature": NaN}}', 400, "NaN is not JSON"),
    ("/api/generate", {"prompt": "x", "system": ["a"]}, 400, "system: expected a string"),
    ("/api/generate", {"prompt": "x", "stream": "no"}, 400, "stream: expected true or false"),
    ("/api/generate", {"prompt": "x", "options": {"repeat_penalty": 0}}, 400, "repeat_penalty: must be > 0"),
    ("/api/generate", {"prompt": "x", "options": {"stop": ["a", 3]}}, 400, "stop: a non-empty string or a list"),
    ("/api/generate", {"prompt": "x", "options": {"stop": [""]}}, 400, "stop: a non-empty string or a list"),
    ("/api/generate", {"prompt": "x", "options": {"seed": -1}}, 400, "seed: must be >= 0"),
    ("/api/generate", {"prompt": "x", "logprobs": "yes"}, 400, "logprobs: expected true or false"),
    ("/api/chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content: expected a string"),
    ("/api/chat", {"messages": [{"role": ["user"], "content": "x"}]}, 400, "messages[0].role"),
    ("/api/generate", {"prompt": "x" * 20_000}, 400, "characters, more than 50 tokens can hold"),
])
def test_ollama_refusals(server, path, body, status, text):
    url, _ = server
    reply = post(url, path, body)
    assert reply.status_code == status and text in reply.json()["error"], reply.text


@pytest.mark.parametrize("path, body, param, text", [
    ("/v1/completions", DEEP, None, "nested too deeply"),
    ("/v1/completions", b"\x80\x81", None, "not UTF-8"),
    ("/v1/completions", {"prompt": "x", "stream": "no"}, "stream", "expected true or false"),
    ("/v1/completions", {"prompt": ["x"] * 500, "n": 2}, "prompt", "more sequences than this server takes at once"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": "yes"},
     "stream_options", "expected an object"),
])
def test_openai_refusals(server, path, body, param, text):
    url, _ = server
    reply = post(url, path, body)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["type"] == "invalid_request_error", reply.text
    assert error["param"] == param and text in error["message"]


def test_openai_chat_reads_text_parts(server, lm):
    url, _ = server
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]
    reply = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}], "max_tokens": 6,
                                               "temperature": 0})
    expected = generate_text(*lm, ["User: Hi there\nAssistant:"],
                             GenerationConfig(max_length=6, temperature=0, stop_strings=["\nUser:"]))[0]
    assert reply.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("method, path, status", [("GET", "/api/nope", 404), ("GET", "/api/generate", 405),
                                                  ("GET", "/v1/nope", 404), ("DELETE", "/v1/models", 405)])
def test_unknown_routes_and_methods_answer_in_the_apis_shape(server, method, path, status):
    url, _ = server
    reply = httpx.request(method, f"{url}{path}")
    assert reply.status_code == status
    error = reply.json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert (path in message) and (("/api/" in message) if status == 404 else method in message)


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    url, _ = server
    answer = raw_exchange(url, http_head("/api/generate", length=50_000_000) + b'{"prompt": "')
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in body
    piece = b"x" * 8192
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(BODY_LIMIT // len(piece) + 1))
    answer = raw_exchange(url, http_head("/v1/completions", chunked=True) + chunked)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and "--max-body-bytes" in json.loads(body)["error"]["message"]


def test_slow_heads_are_closed_and_slow_bodies_get_408(server):
    url, _ = server
    assert raw_exchange(url, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n", timeout=10) == b""
    answer = raw_exchange(url, http_head("/api/generate", length=100) + b'{"pro', timeout=10)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer


def test_a_failing_step_ends_the_stream_with_an_error_and_the_server_goes_on(server, lm, monkeypatch):
    url, served = server
    real_step, calls = served.engine.model.step, []

    def step_failing_once(tokens, cache):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real_step(tokens, cache)
    monkeypatch.setattr(served.engine.model, "step", step_failing_once)
    body = {"model": "tiny", "prompt": "The sun", "options": {"num_predict": 20, "temperature": 0}}
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=30) as reply:
        last = json.loads(list(reply.iter_lines())[-1])
    assert "RuntimeError: device lost" in last["error"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model="tiny", prompt="The sun", max_tokens=5, temperature=0).choices[0].text == \
        greedy(lm, "The sun", 5)


def test_the_api_key_guards_every_route_but_the_root(lm):
    with running_server(*lm, api_key="s3cret") as (url, _):
        assert httpx.get(f"{url}/").status_code == 200
        refused = httpx.get(f"{url}/api/tags")
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["error"]
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret").models.list().data] == ["tiny"]
        client = ollama.Client(host=url, headers={"Authorization": "Bearer s3cret"})
        assert client.generate(model="tiny", prompt="x", options={"num_predict": 2}).done


def test_listening_beyond_loopback_warns():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, has_key=False) is None
    assert "set an API key with --api-key or $SPARSE_SSM_API_KEY" in exposure_warning("0.0.0.0", has_key=False)
    assert "needs the API key" in exposure_warning("192.168.1.5", has_key=True)


def test_serve_on_a_port_in_use_says_so(lm, tmp_path, capsys):
    write_checkpoint(tmp_path / "tinyrun" / "best", *lm)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = cli.main(["serve", "--model-dir", str(tmp_path / "tinyrun"), "--host", "127.0.0.1", "--port", str(port),
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}: port {port} is in use" in err and "--port" in err


def test_a_client_that_hangs_up_on_a_plain_answer_is_cancelled_quietly():
    """The request ends with done="cancelled" (not an error inside the server) and frees its row."""
    errors = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = errors.append
    with running_server(*tiny_language_model(seed=0), max_tokens=100_000) as (url, served):
        logging.getLogger("uvicorn.error").addHandler(handler)
        try:
            body = {"model": "tiny", "prompt": "The quick", "stream": False,       # greedy never ends here
                    "options": {"num_predict": 100_000, "temperature": 0, "repeat_penalty": 1.0}}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/api/generate", json=body, timeout=0.5)
            assert served.engine.wait_until(lambda s: s["running"] == 0 and s["steps"] > 0, timeout=10)
            time.sleep(0.2)                                      # the route's answer to no one
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert [e.getMessage() for e in errors] == []
