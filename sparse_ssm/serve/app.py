"""The server: a Starlette app with the Ollama and OpenAI routes over one `BatchEngine`, behind a
`guard.RequestGuard`, run by uvicorn.  SIGTERM / Ctrl-C stop accepting requests, end the running
ones (done_reason "cancelled") and exit 0.

    python main.py serve --model-dir outputs/small_cpu [--host 127.0.0.1 --port 11434] [--api-key KEY]
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ..data.tokenizer import EOS
from ..generate.loading import load_checkpoint
from ..util.errors import ConfigError
from . import ollama_api, openai_api
from .common import RequestError, Served, longest_token_bytes
from .config import API_KEY_ENV, ServeConfig
from .engine import BatchEngine
from .guard import RequestGuard, error_for, uvicorn_config

logger = logging.getLogger(__name__)


async def _http_error(request, exc: HTTPException):
    """404 (no such route) and 405 (wrong method) in the API's own error shape."""
    routes = "the Ollama API is under /api/ and the OpenAI API under /v1/ (see GET /api/tags, GET /v1/models)"
    message = {404: f"no route {request.url.path}: {routes}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return error_for(request.url.path, RequestError(exc.status_code, message))


async def _internal_error(request, exc: Exception):
    logger.error("a request failed: %s: %s", type(exc).__name__, exc)
    return error_for(request.url.path, RequestError(500, f"internal error ({type(exc).__name__}: {exc}); the server "
                                                         f"goes on serving, and the request may be sent again"))


def create_app(served: Served) -> RequestGuard:
    """The ASGI app (the routes behind the request guard); the engine starts and stops with the
    app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    async def root(request):
        return PlainTextResponse("sparse-ssm is running (Ollama and OpenAI APIs)")

    app = Starlette(routes=[Route("/", root, methods=["GET", "HEAD"]), *ollama_api.ROUTES, *openai_api.ROUTES],
                    lifespan=lifespan, exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.served = served
    return RequestGuard(app, served.limits)


def served_model(model, tokenizer, name: str, limits: ServeConfig) -> Served:
    engine = BatchEngine(model, tokenizer, tokenizer.token_to_id(EOS), limits.max_batch, limits.max_waiting,
                         limits.prefill_chunk_tokens)
    return Served(engine, tokenizer, name, limits, model.num_parameters(), int(time.time()), model.config.to_dict(),
                  limits.max_prompt_tokens * longest_token_bytes(tokenizer))


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM / SIGINT first ends the running generations (otherwise a
    graceful shutdown would wait for every open stream to finish)."""

    def __init__(self, config, engine: BatchEngine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.stop(wait=False)
        super().handle_exit(sig, frame)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port; a port in use or an address that is not this machine's is
    a ConfigError that says what to do."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1 (this "
                          f"machine only) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)                 # connections wait from now on, not refused while uvicorn starts
    except OSError as e:
        sock.close()
        fix = {errno.EADDRINUSE: f"port {port} is in use (another server, perhaps Ollama itself): stop it, or "
                                 f"choose another port with --port (0: any free port)",
               errno.EACCES: f"port {port} needs administrator rights: choose a port above 1023 with --port",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine: use 127.0.0.1 or 0.0.0.0"}
        raise ConfigError(f"cannot listen on {host}:{port}: {fix.get(e.errno, e.strerror)}") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def exposure_warning(host: str, has_key: bool) -> str | None:
    """What to tell the user about listening on `host` (None: loopback, this machine only)."""
    if is_loopback(host):
        return None
    guard = ("every request but GET / needs the API key" if has_key else
             f"anyone who can reach it can run the model: set an API key with --api-key or ${API_KEY_ENV}")
    return f"warning: listening on {host}, reachable from other machines; {guard} (traffic is not encrypted)"


def serve(model_dir: str | Path, checkpoint: str | None, limits: ServeConfig, log=print):
    """Load a checkpoint and serve it until SIGTERM / Ctrl-C (the API key: limits.api_key, else
    $SPARSE_SSM_API_KEY)."""
    if limits.api_key is None and os.environ.get(API_KEY_ENV):
        limits = limits.model_copy(update={"api_key": os.environ[API_KEY_ENV]})
    sock = listening_socket(limits.host, limits.port)
    try:
        loaded = load_checkpoint(model_dir, checkpoint, limits.device, limits.weights)
    except BaseException:
        sock.close()
        raise
    name = limits.name or Path(model_dir).resolve().name
    served = served_model(loaded.model, loaded.tokenizer, name, limits)
    port = sock.getsockname()[1]
    config = uvicorn_config(create_app(served), limits, log_level="warning", timeout_graceful_shutdown=10)
    log(f"serving {name} ({loaded.path}, {loaded.weights} weights) on http://{limits.host}:{port} — Ollama API /api/*, OpenAI API /v1/*; "
        f"up to {limits.max_batch} sequences decoded together", flush=True)
    warning = exposure_warning(limits.host, limits.api_key is not None)
    if warning:
        log(warning, flush=True)
    # uvicorn re-raises the signal that stopped it to the handler it found: let that be a no-op, so a
    # SIGTERM / Ctrl-C shutdown ends here, normally (exit 0), instead of killing the process
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _Server(config, served.engine).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("server stopped", flush=True)
