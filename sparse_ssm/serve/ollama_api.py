"""The Ollama API (https://github.com/ollama/ollama/blob/main/docs/api.md) on the served model:

    POST /api/generate   {model, prompt, system?, stream=true, options, logprobs?, top_logprobs?}
    POST /api/chat       {model, messages, stream=true, options}   (the plain "Role: content" template)
    GET  /api/tags, POST /api/show, GET /api/ps, GET /api/version

Streams are NDJSON (one object per new piece of text, then a final one with done_reason and the
counts).  `options`: temperature, top_k, top_p, num_predict (-1: the server's limit), seed, stop,
repeat_penalty; Ollama's defaults when absent (0.8, 40, 0.9, -1, random, none, 1.1).  Errors are
Ollama's: {"error": "..."} with 400 / 401 / 404 / 405 / 408 / 413 / 500 / 503; a request that fails
while it streams ends its stream with such an object.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .common import USER_STOP, RequestError, Served, chat_prompt, failed, flag, read_body, stop_list, text_field
from .engine import Event, Job

OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 16


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def error(e: RequestError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


OPTION_NAMES = {"repetition_penalty": "repeat_penalty", "stop_strings": "stop", "max_length": "num_predict"}


async def job_of(served: Served, body: dict, prompt: str, extra_stops=()) -> Job:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, f"options: expected an object, got {type(options).__name__}", "options")
    opt = {**OLLAMA_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    num_predict = opt.get("num_predict")                  # (its type is checked by served.settings)
    if isinstance(num_predict, (int, float)) and not isinstance(num_predict, bool) and num_predict <= 0:
        num_predict = None                                # -1 (or 0): up to the server's limit
    settings = served.settings(num_predict, "num_predict", OPTION_NAMES, temperature=opt.get("temperature"),
                               top_k=opt.get("top_k"), top_p=opt.get("top_p"),
                               repetition_penalty=opt.get("repeat_penalty"), seed=opt.get("seed"),
                               stop_strings=[*stop_list(opt.get("stop"), "stop", MAX_STOPS), *extra_stops])
    top = body.get("top_logprobs")
    top = 0 if top is None else top
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(400, f"top_logprobs: an integer between 0 and {MAX_TOP_LOGPROBS}, got {top!r}",
                           "top_logprobs")
    wants = flag(body, "logprobs", False) or top > 0
    return Job(await served.encode(prompt), settings, top_logprobs=top if wants else -1)


def logprobs_of(event: Event) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob,
             "top_logprobs": [{"token": t, "logprob": v} for t, v in lp.top]} for lp in event.logprobs]


async def respond(served: Served, request: Request, body: dict, job: Job, piece) -> object:
    """Run `job`; `piece(text)` is the body of a chunk carrying `text` (a response or a message)."""
    stream = flag(body, "stream", True)
    base = {"model": body.get("model") or served.name}
    start = time.perf_counter_ns()
    events = served.events(job, request)

    def final(last: Event, text: str, logprobs: list) -> dict:
        out = {**base, "created_at": now(), **piece(text), "done": True,
               "done_reason": last.done, "total_duration": time.perf_counter_ns() - start,
               "load_duration": 0, "prompt_eval_count": last.prompt_tokens, "eval_count": last.completion_tokens}
        return {**out, "logprobs": logprobs} if job.top_logprobs >= 0 else out

    if not stream:
        text, logprobs, last = [], [], None
        async for event in events:
            text.append(event.text)
            logprobs += logprobs_of(event)
            last = event
        if failed(last):
            raise failed(last)
        return JSONResponse(final(last, "".join(text), logprobs))
    first = await anext(events)            # errors (a full server, a failed prompt) before the 200 is sent
    if failed(first):
        raise failed(first)

    async def lines():
        event = first
        while True:
            if failed(event):                          # Ollama's way: an error object ends the stream
                yield json.dumps({"error": event.error}) + "\n"
                return
            if event.done:
                yield json.dumps(final(event, event.text, logprobs_of(event))) + "\n"
                return
            if event.text or event.logprobs:          # nothing to say while text is held back
                chunk = {**base, "created_at": now(), **piece(event.text), "done": False}
                if job.top_logprobs >= 0:
                    chunk["logprobs"] = logprobs_of(event)
                yield json.dumps(chunk) + "\n"
            event = await anext(events)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def generate(request: Request):
    served: Served = request.app.state.served
    try:
        body = await read_body(request)
        served.check_model(body.get("model"))
        prompt, system = text_field(body, "prompt"), text_field(body, "system")
        flag(body, "stream", True)
        if not prompt and not system:
            return JSONResponse({"model": body.get("model"), "created_at": now(), "response": "", "done": True,
                                 "done_reason": "load"})
        if system:
            prompt = f"{system}\n\n{prompt}"
        return await respond(served, request, body, await job_of(served, body, prompt), lambda t: {"response": t})
    except RequestError as e:
        return error(e)


async def chat(request: Request):
    served: Served = request.app.state.served
    try:
        body = await read_body(request)
        served.check_model(body.get("model"))
        job = await job_of(served, body, chat_prompt(body.get("messages")), extra_stops=[USER_STOP])
        return await respond(served, request, body, job, lambda t: {"message": {"role": "assistant", "content": t}})
    except RequestError as e:
        return error(e)


def model_entry(served: Served) -> dict:
    return {"name": f"{served.name}:latest", "model": f"{served.name}:latest",
            "modified_at": datetime.datetime.fromtimestamp(served.created, datetime.timezone.utc).isoformat(),
            "size": served.parameters * 4, "digest": "0" * 64, "details": details(served)}


def details(served: Served) -> dict:
    return {"format": "safetensors", "family": "sparse_ssm", "families": ["sparse_ssm"],
            "parameter_size": f"{served.parameters / 1e6:.2f}M", "quantization_level": "F32"}


async def tags(request: Request):
    return JSONResponse({"models": [model_entry(request.app.state.served)]})


async def ps(request: Request):
    served: Served = request.app.state.served
    return JSONResponse({"models": [{**model_entry(served), "expires_at": "2100-01-01T00:00:00Z",
                                     "size_vram": 0, "status": served.engine.status()}]})


async def show(request: Request):
    served: Served = request.app.state.served
    try:
        body = await read_body(request)
        served.check_model(body.get("model") or body.get("name"))
    except RequestError as e:
        return error(e)
    info = {f"sparse_ssm.{k}": v for k, v in served.details.items()}
    return JSONResponse({"modelfile": f"FROM {served.name}\n", "parameters": "",
                         "template": "{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}Assistant:",
                         "details": details(served), "model_info": {"general.architecture": "sparse_ssm",
                                                                    "general.parameter_count": served.parameters,
                                                                    **info},
                         "capabilities": ["completion"]})


async def version(request: Request):
    return JSONResponse({"version": importlib.metadata.version("sparse-ssm")})


ROUTES = [Route("/api/generate", generate, methods=["POST"]), Route("/api/chat", chat, methods=["POST"]),
          Route("/api/tags", tags, methods=["GET"]), Route("/api/ps", ps, methods=["GET"]),
          Route("/api/show", show, methods=["POST"]), Route("/api/version", version, methods=["GET"])]
