"""A local HTTP server on 127.0.0.1 that speaks the part of the documented Ollama REST API the
package uses, with a real language model behind it (no Ollama binary can be installed here).

Endpoints: POST /api/show, POST /api/generate with "stream": false (one JSON object;
"logprobs"/"top_logprobs" as Ollama >= 0.12.11 returns them: per generated token {token, logprob,
top_logprobs: [{token, logprob}]}).  Errors as Ollama sends them: {"error": "..."} with 404 for an
unknown model and 400 for top_logprobs > 20.  Test switches: `malformed` (answers cut-off JSON) and
`fail_after` (answers HTTP 500 to every generate request after the first `fail_after`).

`generate_fn(prompt, options, top_logprobs) -> (tokens, done_reason)` is the model: `tokens` a list
of {"token", "logprob", "top_logprobs"} dicts, token strings being decoded text.
"""

from __future__ import annotations

import datetime
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OllamaAPIServer:
    def __init__(self, generate_fn, models=("phi4-mini",), malformed: bool = False, fail_after: int | None = None):
        self.generate_fn, self.models = generate_fn, list(models)
        self.malformed, self.fail_after = malformed, fail_after
        self.requests: list[dict] = []
        self.accepted = 0                    # generate requests answered by the model
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload=None, raw: bytes | None = None):
                body = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def do_POST(self):
                body = self._body()
                server.requests.append({"path": self.path, **body})
                model = body.get("model", "").split(":")[0]
                if self.path in ("/api/show", "/api/generate") and model not in server.models:
                    return self._send(404, {"error": f"model '{body.get('model')}' not found"})
                if self.path == "/api/show":
                    return self._send(200, {"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                                            "details": {"format": "gguf", "family": "test"}, "model_info": {}})
                if self.path != "/api/generate":
                    return self._send(404, {"error": "not found"})
                k = body.get("top_logprobs") or 0
                if not 0 <= k <= 20:
                    return self._send(400, {"error": "top_logprobs must be between 0 and 20"})
                if body.get("stream", True):
                    return self._send(400, {"error": "this test server answers only \"stream\": false"})
                if server.malformed:
                    return self._send(200, raw=b'{"model": "x", "response": "unterminated')
                with server.lock:
                    refuse = server.fail_after is not None and server.accepted >= server.fail_after
                    server.accepted += not refuse
                if refuse:
                    return self._send(500, {"error": "llama runner process has terminated"})
                tokens, reason = server.generate_fn(body.get("prompt", ""), body.get("options") or {}, k)
                final = {"model": body["model"], "created_at": _now(), "response": "".join(t["token"] for t in tokens),
                         "done": True, "done_reason": reason, "eval_count": len(tokens),
                         "prompt_eval_count": len(body.get("prompt", "").split()), "total_duration": 1}
                if body.get("logprobs"):
                    final["logprobs"] = [_entry(t, k) for t in tokens]
                return self._send(200, final)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _entry(token: dict, k: int) -> dict:
    return {"token": token["token"], "logprob": token["logprob"], "top_logprobs": token["top_logprobs"][:k]}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def model_backed(teacher, token_text):
    """A generate_fn from one of our local teachers (a real LM): `token_text(id)` turns an id into
    the decoded text Ollama would return for it."""
    from sparse_ssm.teacher import Request

    lock = threading.Lock()

    def generate(prompt, options, k):
        request = Request(prompt=prompt, max_new_tokens=options.get("num_predict", 32),
                          temperature=options.get("temperature", 0.8), top_p=options.get("top_p", 1.0),
                          top_k=options.get("top_k", 0), seed=options.get("seed", 0), top_logprobs=max(k, 1))
        with lock:                                  # one decode at a time through the model
            out = teacher.complete(request)
        tokens = [{"token": token_text(i), "logprob": float(out.top_logprobs[j][list(out.top_ids[j]).index(i)])
                   if i in out.top_ids[j] else -20.0,
                   "top_logprobs": [{"token": token_text(int(a)), "logprob": float(b)}
                                    for a, b in zip(out.top_ids[j], out.top_logprobs[j])]}
                  for j, i in enumerate(out.token_ids)]
        return tokens, out.finish_reason

    return generate
