"""A load test on the real server (127.0.0.1 only): the bad requests of issue 35 — a tiny
temperature and penalty, a seed past the largest, JSON nested 200,000 deep, bodies over the limit
(declared or chunked), a prompt too long to tokenize, wrong types, bytes that are not UTF-8, a
stream its client drops, unknown routes — sent in rounds between good requests: every good one
still answers exactly as before, nothing is left running, and the server's memory returns near
where it started (VmRSS of this process, where the server runs)."""

import gc
import json

import httpx
import pytest

from helpers import tiny_language_model
from server_fixture import http_head, raw_exchange, running_server
from sparse_ssm.generate import GenerationConfig, generate_text

ROUNDS = 2
RSS_SLACK_MIB = 64               # what the allocator may keep; a 5 MB prompt once cost 800 MiB


def rss_mib() -> float:
    gc.collect()
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model(seed=5)


def bad_requests(http: httpx.Client, url: str, limit: int) -> dict:
    """name -> (a function that sends one bad request and returns the status it got, the status
    it must get)."""
    def post(path, body):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return http.post(f"{url}{path}", content=content).status_code

    def cancelled_stream():
        body = {"model": "tiny", "prompt": "The quick", "options": {"num_predict": 64, "temperature": 0}}
        with http.stream("POST", f"{url}/api/generate", json=body) as reply:
            next(reply.iter_lines())
        return 200

    def declared_too_large():
        return int(raw_exchange(url, http_head("/api/generate", length=5_000_000) + b'{"prompt": "').split()[1])

    def chunked_too_large():
        piece = b"x" * 65536
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(limit // len(piece) + 1))
        return int(raw_exchange(url, http_head("/v1/completions", chunked=True) + chunks).split()[1])

    return {
        "tiny temperature": (lambda: post("/api/generate", {"prompt": "A", "stream": False, "options": {
            "num_predict": 4, "temperature": 1e-45}}), 200),
        "tiny penalty": (lambda: post("/api/generate", {"prompt": "A", "stream": False, "options": {
            "num_predict": 4, "repeat_penalty": 1e-45}}), 200),
        "seed past the largest": (lambda: post("/v1/completions", {"prompt": "A", "seed": 2**64}), 400),
        "JSON 200,000 deep": (lambda: post("/api/chat", b"[" * 200_000 + b"]" * 200_000), 400),
        "declared body over the limit": (declared_too_large, 413),
        "chunked body over the limit": (chunked_too_large, 413),
        "prompt too long to tokenize": (lambda: post("/api/generate", {"prompt": "ab " * (limit // 4)}), 400),
        "system not a string": (lambda: post("/api/generate", {"prompt": "A", "system": ["a"]}), 400),
        "stream not a boolean": (lambda: post("/v1/completions", {"prompt": "A", "stream": "no"}), 400),
        "not UTF-8": (lambda: post("/v1/chat/completions", b'{"messages": "\xc3\x28"}'), 400),
        "cancelled stream": (cancelled_stream, 200),
        "no such route": (lambda: post("/api/nothing", {}), 404),
    }


def test_bad_requests_between_good_ones_leave_the_server_serving(lm):
    limit = 1 << 20                                       # the default body limit
    expected = generate_text(*lm, ["The sun"], GenerationConfig(max_length=10, temperature=0))[0]
    with running_server(*lm, max_batch=4, max_tokens=64, max_body_bytes=limit) as (url, served), \
            httpx.Client(timeout=30) as http:
        good = {"model": "tiny", "prompt": "The sun", "stream": False,
                "options": {"num_predict": 10, "temperature": 0, "repeat_penalty": 1.0}}

        def answer_is_right():
            reply = http.post(f"{url}/api/generate", json=good)
            return reply.status_code == 200 and reply.json()["response"] == expected

        assert answer_is_right()
        start = rss_mib()
        outcomes = []
        for _ in range(ROUNDS):
            for name, (send, status) in bad_requests(http, url, limit).items():
                outcomes.append((name, send() == status, answer_is_right()))
        assert [o for o in outcomes if not (o[1] and o[2])] == []
        assert served.engine.wait_until(lambda s: s["running"] == 0 and s["waiting"] == 0, timeout=30)
        assert rss_mib() - start < RSS_SLACK_MIB
