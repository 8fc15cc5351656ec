"""What the Ollama and OpenAI routes share: the served model, the prompt and sampling settings of a
request checked against the limits, and the bridge from the decode thread to a request's events."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from ..data.tokenizer import EOS
from ..generate.settings import GenerationConfig
from ..util.errors import ConfigError
from .config import ServeConfig
from .engine import BatchEngine, EngineFull, Event, Job

USER_STOP = "\nUser:"          # the chat template's next user turn ends an assistant answer


class RequestError(Exception):
    """A request the server refuses: each API turns it into its own error shape."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


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

    def knows(self, model: str | None) -> bool:
        return model is None or model in (self.name, f"{self.name}:latest")

    def check_model(self, model: str | None):
        if not self.knows(model):
            raise RequestError(404, f"model '{model}' not found; this server serves '{self.name}'", "model")

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt; an empty prompt starts a new document (end-of-text)."""
        ids = self.tokenizer.encode(prompt).ids if prompt else []
        if not ids:
            ids = [self.tokenizer.token_to_id(EOS) or 0]
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                                    f"{self.limits.max_prompt_tokens} (--max-prompt-tokens)", "prompt")
        return ids

    def settings(self, max_new_tokens: int | None, param: str, **sampling) -> GenerationConfig:
        """Sampling settings of a request: None values take the GenerationConfig defaults; a
        max_new_tokens over the limit is refused."""
        limit = self.limits.max_tokens
        if max_new_tokens is not None and max_new_tokens > limit:
            raise RequestError(400, f"{param}={max_new_tokens} is over this server's limit of {limit} new tokens "
                                    f"(--max-tokens)", param)
        values = {k: v for k, v in sampling.items() if v is not None}
        try:
            return GenerationConfig(max_length=max_new_tokens if max_new_tokens else limit, **values)
        except ConfigError as e:
            key = str(e).split(":")[0].removeprefix("generation.")
            raise RequestError(400, str(e).removeprefix("generation."), key) from None

    async def events(self, job: Job, request=None) -> AsyncIterator[Event]:
        """Submit `job` and yield its events until the last; leaving early (a client that went
        away) cancels it, which frees its row at the next step."""
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
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                yield event
                if event.done:
                    return
        finally:
            job.cancel()


def chat_prompt(messages: list[dict]) -> str:
    """The plain chat template: one "Role: content" line per message, then "Assistant:"."""
    lines = [f"{str(m.get('role', 'user')).capitalize()}: {m.get('content') or ''}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"
