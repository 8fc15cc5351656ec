"""The OpenAI API (https://platform.openai.com/docs/api-reference) on the served model:

    POST /v1/completions        {model, prompt (str or list), max_tokens=16, temperature=1, top_p=1, n=1,
                                 stop, seed, stream, logprobs (0..5)}
    POST /v1/chat/completions   {model, messages, max_tokens | max_completion_tokens, temperature, top_p, n,
                                 stop, seed, stream, stream_options.include_usage}
    GET  /v1/models

Each prompt x n choices is one sequence of the running batch (choice i samples with seed + i).
Streams are server-sent events ("data: {chunk}", then "data: [DONE]").  Errors are OpenAI's:
{"error": {"message", "type", "param", "code"}} with 400 / 404 / 503.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .common import USER_STOP, RequestError, Served, chat_prompt
from .engine import Job
from .ollama_api import read_body

MAX_CHOICES = 16


def error(e: RequestError) -> JSONResponse:
    kind = {404: "not_found_error", 503: "server_error"}.get(e.status, "invalid_request_error")
    code = "model_not_found" if e.status == 404 else None
    return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": code}},
                        status_code=e.status)


def number(body: dict, key: str, kind=(int, float)):
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise RequestError(400, f"{key}: expected a {'an integer' if kind is int else 'number'}, got {value!r}", key)
    return value


def jobs_of(served: Served, body: dict, prompts: list[str], max_key: str, default_max: int | None, extra_stops=()):
    """One Job per prompt and choice: sampling from temperature / top_p / seed / stop / max tokens."""
    n = number(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise RequestError(400, f"n: must be between 1 and {MAX_CHOICES}, got {n}", "n")
    max_tokens = number(body, max_key, int)
    max_tokens = default_max if max_tokens is None else max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(400, f"{max_key}: must be at least 1, got {max_tokens}", max_key)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError(400, "stop: a string or a list of at most 4 strings", "stop")
    seed = number(body, "seed", int)
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs") if isinstance(logprobs, bool) else logprobs      # chat: bool + top_logprobs
    if top is not None and (not isinstance(top, int) or not 0 <= top <= 20):
        raise RequestError(400, "logprobs / top_logprobs: an integer between 0 and 20", "logprobs")
    jobs = []
    for prompt in prompts:
        ids = served.encode(prompt)
        for i in range(n):
            settings = served.settings(max_tokens, max_key, temperature=number(body, "temperature"),
                                       top_p=number(body, "top_p"), seed=None if seed is None else seed + i,
                                       stop_strings=[*stop, *extra_stops])
            jobs.append(Job(ids, settings, top_logprobs=-1 if not (logprobs or top) else (top or 0)))
    return jobs


async def run(served: Served, request: Request, jobs: list[Job], chunk_of, response_of):
    """Decode the jobs together: a streamed SSE response of chunk_of(index, event) or, at the end,
    response_of(results) with results[i] = (text, last event, logprobs) of choice i."""
    streams = [served.events(job, request) for job in jobs]
    if not body_stream(request):
        async def collect(events):
            text, logprobs, last = [], [], None
            async for event in events:
                text.append(event.text)
                logprobs += event.logprobs
                last = event
            return "".join(text), last, logprobs
        try:
            results = await asyncio.gather(*(collect(s) for s in streams))
        finally:
            for job in jobs:
                job.cancel()
        return JSONResponse(response_of(results))
    try:
        firsts = [await anext(s) for s in streams]      # a refused job fails before the 200 is sent
    except RequestError:
        for job in jobs:
            job.cancel()
        raise

    async def sse():
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, first, events):
            await queue.put((index, first))
            if not first.done:
                async for event in events:
                    await queue.put((index, event))
        tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams))]
        try:
            finished = 0
            while finished < len(jobs):
                index, event = await queue.get()
                finished += event.done is not None
                if not (event.text or event.logprobs or event.done):
                    continue                              # text held back: nothing to send yet
                for chunk in chunk_of(index, event):
                    yield f"data: {json.dumps(chunk)}\n\n"
            for chunk in chunk_of(None, None):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            for job in jobs:
                job.cancel()

    return StreamingResponse(sse(), media_type="text/event-stream")


def body_stream(request: Request) -> bool:
    return bool(request.state.body.get("stream"))


def usage(results, n: int = 1) -> dict:
    """Token counts; each prompt counted once (results hold n choices per prompt)."""
    prompt = sum(last.prompt_tokens for _, last, _ in results[::n])
    completion = sum(last.completion_tokens for _, last, _ in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish(event) -> str:
    return "length" if event.done == "length" else "stop"


def completion_logprobs(logprobs) -> dict | None:
    if not logprobs:
        return None
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(lp.top) for lp in logprobs], "text_offset": []}


async def completions(request: Request):
    served: Served = request.app.state.served
    try:
        body = request.state.body = await read_body(request)
        served.check_model(body.get("model"))
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "prompt: a string or a non-empty list of strings", "prompt")
        jobs = jobs_of(served, body, prompts, "max_tokens", 16)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model") or served.name}

        def chunk_of(index, event):
            if event is None:
                return []
            choice = {"index": index, "text": event.text, "logprobs": completion_logprobs(event.logprobs),
                      "finish_reason": finish(event) if event.done else None}
            return [{**head, "choices": [choice]}]

        def response_of(results):
            choices = [{"index": i, "text": text, "logprobs": completion_logprobs(lps), "finish_reason": finish(last)}
                       for i, (text, last, lps) in enumerate(results)]
            return {**head, "choices": choices, "usage": usage(results, len(jobs) // len(prompts))}

        return await run(served, request, jobs, chunk_of, response_of)
    except RequestError as e:
        return error(e)


def chat_logprobs(logprobs) -> dict | None:
    if not logprobs:
        return None
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
                        for lp in logprobs]}


async def chat_completions(request: Request):
    served: Served = request.app.state.served
    try:
        body = request.state.body = await read_body(request)
        served.check_model(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "messages: a non-empty list of {role, content} objects", "messages")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        jobs = jobs_of(served, body, [chat_prompt(messages)], key, None, extra_stops=[USER_STOP])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.get("model") or served.name}
        started, totals = set(), []
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk_of(index, event):
            if event is None:
                return [{**head, "object": "chat.completion.chunk", "choices": [],
                         "usage": usage(totals, len(jobs))}] if include_usage else []
            delta = {"content": event.text}
            if index not in started:
                started.add(index)
                delta = {"role": "assistant", **delta}
            if event.done:
                totals.append(("", event, []))
            choice = {"index": index, "delta": delta, "logprobs": chat_logprobs(event.logprobs),
                      "finish_reason": finish(event) if event.done else None}
            return [{**head, "object": "chat.completion.chunk", "choices": [choice]}]

        def response_of(results):
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": chat_logprobs(lps),
                        "finish_reason": finish(last)} for i, (text, last, lps) in enumerate(results)]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage(results, len(jobs))}

        return await run(served, request, jobs, chunk_of, response_of)
    except RequestError as e:
        return error(e)


async def models(request: Request):
    served: Served = request.app.state.served
    return JSONResponse({"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                                     "owned_by": "sparse-ssm"}]})


ROUTES = [Route("/v1/completions", completions, methods=["POST"]),
          Route("/v1/chat/completions", chat_completions, methods=["POST"]),
          Route("/v1/models", models, methods=["GET"])]
