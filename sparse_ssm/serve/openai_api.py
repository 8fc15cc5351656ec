"""The OpenAI API (https://platform.openai.com/docs/api-reference) on the served model:

    POST /v1/completions        {model, prompt (str or list), max_tokens=16, temperature=1, top_p=1, n=1,
                                 stop, seed, stream, logprobs (0..5)}
    POST /v1/chat/completions   {model, messages, max_tokens | max_completion_tokens, temperature, top_p, n,
                                 stop, seed, stream, stream_options.include_usage}
    GET  /v1/models

Each prompt x n choices is one sequence of the running batch (choice i samples with seed + i).
Streams are server-sent events ("data: {chunk}", then "data: [DONE]").  Errors are OpenAI's:
{"error": {"message", "type", "param", "code"}} with 400 / 401 / 404 / 405 / 408 / 413 / 500 / 503; a
request that fails while it streams ends its stream with "data: {"error": {...}}".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..generate.settings import MAX_SEED
from .common import USER_STOP, RequestError, Served, chat_prompt, failed, flag, read_body, stop_list
from .engine import Job

MAX_CHOICES = 16
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


def error_object(e: RequestError) -> dict:
    kind = "server_error" if e.status >= 500 else "not_found_error" if e.param == "model" else "invalid_request_error"
    code = {404: "model_not_found" if e.param == "model" else None, 401: "invalid_api_key"}.get(e.status)
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": code}}


def error(e: RequestError) -> JSONResponse:
    return JSONResponse(error_object(e), status_code=e.status)


def number(body: dict, key: str, kind=(int, float)):
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise RequestError(400, f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    return value


def top_logprobs_of(body: dict, key: str) -> int:
    top = number(body, key, int) or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(400, f"{key}: an integer between 0 and {MAX_TOP_LOGPROBS}, got {top}", key)
    return top


async def jobs_of(served: Served, body: dict, prompts: list[str], max_key: str, default_max: int | None,
                  top_logprobs: int, extra_stops=()) -> list[Job]:
    """One Job per prompt and choice: sampling from temperature / top_p / seed / stop / max tokens;
    choice i samples with seed + i (wrapped past the largest seed)."""
    n = number(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise RequestError(400, f"n: must be between 1 and {MAX_CHOICES}, got {n}", "n")
    most = served.limits.max_batch + served.limits.max_waiting
    if len(prompts) * n > most:
        raise RequestError(400, f"{len(prompts)} prompts x n={n} is more sequences than this server takes at once "
                                f"({most}: --max-batch + --max-waiting); split the request", "prompt")
    max_tokens = number(body, max_key, int)
    max_tokens = default_max if max_tokens is None else max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(400, f"{max_key}: must be at least 1, got {max_tokens}", max_key)
    stops = [*stop_list(body.get("stop"), "stop", MAX_STOPS), *extra_stops]
    seed = number(body, "seed", int)
    sampling = dict(temperature=number(body, "temperature"), top_p=number(body, "top_p"))
    settings = [served.settings(max_tokens, max_key, {"stop_strings": "stop"}, stop_strings=stops, **sampling,
                                seed=seed if seed is None or i == 0 else (seed + i) % (MAX_SEED + 1))
                for i in range(n)]                         # choice 0 checks the seed as given
    jobs = []
    for prompt in prompts:
        ids = await served.encode(prompt)
        jobs += [Job(ids, choice, top_logprobs=top_logprobs) for choice in settings]
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
        for _, last, _ in results:
            if failed(last):
                raise failed(last)
        return JSONResponse(response_of(results))
    try:
        firsts = [await anext(s) for s in streams]      # a refused or failed job fails before the 200 is sent
        for first in firsts:
            if failed(first):
                raise failed(first)
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
                if failed(event):                         # OpenAI's way: an error object ends the stream
                    yield f"data: {json.dumps(error_object(failed(event)))}\n\n"
                    return
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
    return flag(request.state.body, "stream", False)


def usage(results, n: int = 1) -> dict:
    """Token counts; each prompt counted once (results hold n choices per prompt)."""
    prompt = sum(last.prompt_tokens for _, last, _ in results[::n])
    completion = sum(last.completion_tokens for _, last, _ in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish(event) -> str:
    return "length" if event.done == "length" else "stop"


def completion_logprobs(logprobs, start: int) -> dict | None:
    """The legacy logprobs object; text_offset: each token's character offset from the start of the
    prompt (`start`: where the first of these tokens begins)."""
    if not logprobs:
        return None
    offsets = list(itertools.accumulate((len(lp.token) for lp in logprobs[:-1]), initial=start))
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [dict(lp.top) for lp in logprobs], "text_offset": offsets}


async def completions(request: Request):
    served: Served = request.app.state.served
    try:
        body = request.state.body = await read_body(request)
        served.check_model(body.get("model"))
        prompt = body.get("prompt", "")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "prompt: a string or a non-empty list of strings", "prompt")
        body_stream(request)                       # a "stream" that is not a boolean is refused before any work
        top = top_logprobs_of(body, "logprobs") if body.get("logprobs") is not None else -1
        jobs = await jobs_of(served, body, prompts, "max_tokens", 16, top)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model") or served.name}

        n = len(jobs) // len(prompts)
        offset = {}                                # choice -> where its next token begins (text_offset)

        def chunk_of(index, event):
            if event is None:
                return []
            start = offset.get(index, len(prompts[index // n]))
            offset[index] = start + sum(len(lp.token) for lp in event.logprobs)
            choice = {"index": index, "text": event.text, "logprobs": completion_logprobs(event.logprobs, start),
                      "finish_reason": finish(event) if event.done else None}
            return [{**head, "choices": [choice]}]

        def response_of(results):
            choices = [{"index": i, "text": text, "logprobs": completion_logprobs(lps, len(prompts[i // n])),
                        "finish_reason": finish(last)} for i, (text, last, lps) in enumerate(results)]
            return {**head, "choices": choices, "usage": usage(results, n)}

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
        prompt = chat_prompt(body.get("messages"))
        body_stream(request)                       # a "stream" that is not a boolean is refused before any work
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        top = top_logprobs_of(body, "top_logprobs") if flag(body, "logprobs", False) else -1
        jobs = await jobs_of(served, body, [prompt], key, None, top, extra_stops=[USER_STOP])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.get("model") or served.name}
        started, totals = set(), []
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError(400, f"stream_options: expected an object, got {type(options).__name__}",
                               "stream_options")
        include_usage = flag(options, "include_usage", False)

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
