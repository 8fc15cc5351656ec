"""What the Ollama and OpenAI routes share: the served model, a request's body and fields checked
at the edge (types, ranges, the prompt's length before it is tokenized), and the bridge from the
decode thread to a request's events."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from ..data.tokenizer import EOS
from ..generate.settings import GenerationConfig
from ..util.errors import ConfigError
from .config import ServeConfig
from .engine import BatchEngine, EngineFull, Event, Job

DISCONNECT_CHECK_S = 1.0      # how often a request's client is checked for having gone away
USER_STOP = "\nUser:"          # the chat template's next user turn ends an assistant answer


class RequestError(Exception):
    """A request the server refuses: each API turns it into its own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON; send a finite number")


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object (empty: {}); anything else is a 400 that says what is wrong."""
    try:
        body = json.loads(raw.decode("utf-8") if raw else "{}", parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 text (byte {e.start}); send JSON encoded as UTF-8") from None
    except RecursionError:
        raise RequestError(400, "invalid JSON body: nested too deeply; send a flat JSON object") from None
    except ValueError as e:                              # JSONDecodeError, or NaN / Infinity
        raise RequestError(400, f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got a JSON {type(body).__name__}")
    return body


async def read_body(request) -> dict:
    """The request's JSON object (the body was read, within the size limit, by `guard.RequestGuard`)."""
    return parse_body(await request.body())


def flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"{key}: expected true or false, got {value!r}", key)
    return value


def text_field(body: dict, key: str) -> str:
    """An optional string field ("" when absent)."""
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(400, f"{key}: expected a string, got {type(value).__name__}", key)
    return value


def stop_list(value, param: str, most: int) -> list[str]:
    """A stop string or a list of at most `most` non-empty ones."""
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > most:
        raise RequestError(400, f"{param}: a non-empty string or a list of at most {most} non-empty strings", param)
    return stops


def message_text(content, where: str) -> str:
    """A message's content: a string, null, or (OpenAI) a list of {"type": "text", "text"} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"{where}.content: expected a string (or a list of text parts); this model reads text "
                            f"only", "messages")


def chat_prompt(messages) -> str:
    """The plain chat template: one "Role: content" line per message, then "Assistant:"."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError(400, "messages: a non-empty list of {role, content} objects", "messages")
    lines = []
    for i, m in enumerate(messages):
        role = m.get("role", "user")
        if not isinstance(role, str) or not role:
            raise RequestError(400, f"messages[{i}].role: expected a string such as \"user\", got {role!r}",
                               "messages")
        lines.append(f"{role.capitalize()}: {message_text(m.get('content'), f'messages[{i}]')}")
    return "\n".join(lines) + "\nAssistant:"


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token of the vocabulary decodes to (at least 1): a text of more
    bytes than max_prompt_tokens times this has more tokens than that, so it is refused untokenized."""
    sizes = (len(tokenizer.decode([i], skip_special_tokens=False).encode()) for i in range(tokenizer.get_vocab_size()))
    return max(1, *sizes)


@dataclass
class Served:
    """The model behind the routes."""

    engine: BatchEngine
    tokenizer: object
    name: str
    limits: ServeConfig
    parameters: int
    created: int                 # unix time the server started
    details: dict                # the model config, for /api/show
    max_prompt_chars: int        # a longer prompt is refused before it is tokenized

    def knows(self, model) -> bool:
        return model is None or model in (self.name, f"{self.name}:latest")

    def check_model(self, model):
        if not self.knows(model):
            raise RequestError(404, f"model {model!r} not found; this server serves '{self.name}'", "model")

    async def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt (tokenized in a worker thread, never on the event loop); an empty
        prompt starts a new document (end-of-text)."""
        limit = self.limits.max_prompt_tokens
        if len(prompt) > self.max_prompt_chars:
            raise RequestError(400, f"the prompt has {len(prompt)} characters, more than {limit} tokens can hold; "
                                    f"this server accepts at most {limit} tokens (--max-prompt-tokens)", "prompt")
        ids = (await asyncio.to_thread(self.tokenizer.encode, prompt)).ids if prompt else []
        if not ids:
            ids = [self.tokenizer.token_to_id(EOS) or 0]
        if len(ids) > limit:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit} "
                                    f"(--max-prompt-tokens)", "prompt")
        return ids

    def settings(self, max_new_tokens, param: str, names: dict[str, str], **sampling) -> GenerationConfig:
        """Sampling settings of a request: None values take the GenerationConfig defaults; a
        max_new_tokens over the limit is refused.  `names`: the API's name of a setting, for errors."""
        limit = self.limits.max_tokens
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool)):
            raise RequestError(400, f"{param}: expected an integer, got {max_new_tokens!r}", param)
        if max_new_tokens is not None and max_new_tokens > limit:
            raise RequestError(400, f"{param}={max_new_tokens} is over this server's limit of {limit} new tokens "
                                    f"(--max-tokens)", param)
        values = {k: v for k, v in sampling.items() if v is not None}
        try:
            return GenerationConfig(max_length=max_new_tokens if max_new_tokens else limit, **values)
        except ConfigError as e:
            key = str(e).split(":")[0].removeprefix("generation.").split(".")[0]
            name = names.get(key, key)
            raise RequestError(400, name + str(e).removeprefix("generation." + key), name) from None

    async def events(self, job: Job, request=None) -> AsyncIterator[Event]:
        """Submit `job` and yield its events until the last (done set); a client that went away
        ends them with done="cancelled".  Leaving early cancels the job, which frees its row at
        the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:                  # the event loop is gone (shutdown)
                pass

        job.on_event = deliver
        try:
            self.engine.submit(job)
        except EngineFull as e:
            raise RequestError(503, f"server busy: {e}; try again later") from None
        try:
            checked = loop.time()
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    event = None
                if request is not None and (event is None or loop.time() - checked >= DISCONNECT_CHECK_S):
                    checked = loop.time()             # (a plain answer's events never pause: look each second)
                    if await request.is_disconnected():
                        yield Event(done="cancelled", prompt_tokens=len(job.prompt_ids),
                                    completion_tokens=job.new_tokens)
                        return
                if event is not None:
                    yield event
                    if event.done:
                        return
        finally:
            job.cancel()


def failed(event: Event | None) -> RequestError | None:
    """The error of a job that failed in the engine (a 500), else None."""
    return RequestError(500, event.error) if event is not None and event.done == "error" else None
