"""What every request passes before a route sees it, so that no single client can stop or starve
the server: the API key (when one is set), the body-size limit (from Content-Length at once, else
counted as the body arrives), a read timeout on the request head and between pieces of the body,
and errors in the shape of the API the path belongs to (OpenAI's under /v1, Ollama's elsewhere).

    app = RequestGuard(starlette_app, limits)             # the ASGI app uvicorn runs
    uvicorn.Config(app, http=HeadTimeoutH11, timeout_keep_alive=..., ...)    # `uvicorn_config`
"""

from __future__ import annotations

import asyncio
import hmac

import h11
import uvicorn
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import ollama_api, openai_api
from .common import RequestError
from .config import ServeConfig

OPEN_PATHS = ("/",)                       # answered without the API key (a liveness check)


def error_for(path: str, e: RequestError) -> JSONResponse:
    """`e` in the shape of the API `path` belongs to."""
    return (openai_api.error if path.startswith("/v1/") or path == "/v1" else ollama_api.error)(e)


class RequestGuard:
    """ASGI middleware: checks the API key, then reads the whole body (at most max_body_bytes,
    each piece within read_timeout seconds) before the app runs, and hands it on."""

    def __init__(self, app, limits: ServeConfig):
        self.app, self.limits = app, limits
        self.key = limits.api_key.encode() if limits.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.check_key(scope)
            body = await self.read_body(scope, receive)
        except RequestError as e:
            return await error_for(scope["path"], e)(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()                     # after the body: only http.disconnect
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def check_key(self, scope):
        if self.key is None or scope["path"] in OPEN_PATHS:
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            raise RequestError(401, "missing or wrong API key: send the header \"Authorization: Bearer KEY\" with "
                                    "the key the server was started with (--api-key or $SPARSE_SSM_API_KEY)")

    async def read_body(self, scope, receive) -> bytes:
        limit = self.limits.max_body_bytes
        too_large = RequestError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                      f"(--max-body-bytes); send a shorter prompt")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large if length.isdigit() else RequestError(400, "invalid Content-Length header")
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.limits.read_timeout)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the request body did not arrive within {self.limits.read_timeout:g} s; "
                                        f"send the whole body at once") from None
            if message["type"] != "http.request":          # the client went away
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                raise too_large
            more = message.get("more_body", False)
        return b"".join(chunks)


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head: a connection that has not sent a
    whole request line and headers within `read_timeout` seconds of opening (or of its previous
    response) is closed, so idle or trickling clients cannot hold connections forever."""

    read_timeout = 30.0                   # set per server by `uvicorn_config`

    def connection_made(self, transport):
        super().connection_made(transport)
        self._head_deadline = None
        self._arm_head_deadline()

    def data_received(self, data: bytes):
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._head_deadline is not None:
            self._head_deadline.cancel()                 # the head arrived
            self._head_deadline = None

    def on_response_complete(self):
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc):
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self):
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._head_deadline = self.loop.call_later(self.read_timeout, self._head_too_late)

    def _head_too_late(self):
        self._head_deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()


def uvicorn_config(app, limits: ServeConfig, **options) -> uvicorn.Config:
    """uvicorn's settings for `app` (a RequestGuard) under `limits`: the h11 protocol with the head
    deadline and an idle keep-alive of at most 5 s (uvicorn's default)."""
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11,), {"read_timeout": limits.read_timeout})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=max(1, min(5, int(limits.read_timeout))), **options)
