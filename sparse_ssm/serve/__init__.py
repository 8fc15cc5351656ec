"""The serve floor: an Ollama- and OpenAI-compatible HTTP server (Starlette + uvicorn) whose
requests are decoded together in one batch on the recurrent state (continuous batching).
Imports `model`, `data`, `generate` and `util` only."""

from .app import create_app, serve, served_model
from .config import ServeConfig
from .engine import BatchEngine, Event, Job

__all__ = ["ServeConfig", "BatchEngine", "Event", "Job", "create_app", "serve", "served_model"]
