"""The server: a Starlette app with the Ollama and OpenAI routes over one `BatchEngine`, run by
uvicorn.  SIGTERM / Ctrl-C stop accepting requests, end the running ones (done_reason
"cancelled") and exit 0.

    python main.py serve --model-dir outputs/small_cpu [--host 127.0.0.1 --port 11434]
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ..data.tokenizer import EOS
from ..generate.loading import load_checkpoint
from . import ollama_api, openai_api
from .common import Served
from .config import ServeConfig
from .engine import BatchEngine


def create_app(served: Served) -> Starlette:
    """The ASGI app; the engine starts and stops with the app's lifespan."""

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
                    lifespan=lifespan)
    app.state.served = served
    return app


def served_model(model, tokenizer, name: str, limits: ServeConfig) -> Served:
    engine = BatchEngine(model, tokenizer, tokenizer.token_to_id(EOS), limits.max_batch, limits.max_waiting)
    return Served(engine, tokenizer, name, limits, model.num_parameters(), int(time.time()), model.config.to_dict())


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM / SIGINT first ends the running generations (otherwise a
    graceful shutdown would wait for every open stream to finish)."""

    def __init__(self, config, engine: BatchEngine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.stop(wait=False)
        super().handle_exit(sig, frame)


def serve(model_dir: str | Path, checkpoint: str | None, limits: ServeConfig, log=print):
    """Load a checkpoint and serve it until SIGTERM / Ctrl-C."""
    loaded = load_checkpoint(model_dir, checkpoint, limits.device)
    name = limits.name or Path(model_dir).resolve().name
    served = served_model(loaded.model, loaded.tokenizer, name, limits)
    sock = socket.socket(socket.AF_INET6 if ":" in limits.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((limits.host, limits.port))
    sock.listen(2048)                     # connections wait from now on, not refused while uvicorn starts
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(served), log_level="warning", timeout_graceful_shutdown=10)
    log(f"serving {name} ({loaded.path}) on http://{limits.host}:{port} — Ollama API /api/*, OpenAI API /v1/*; "
        f"up to {limits.max_batch} sequences decoded together", flush=True)
    # uvicorn re-raises the signal that stopped it to the handler it found: let that be a no-op, so a
    # SIGTERM / Ctrl-C shutdown ends here, normally (exit 0), instead of killing the process
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _Server(config, served.engine).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("server stopped", flush=True)
