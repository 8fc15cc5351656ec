"""The teacher floor: synthetic-data config and prompts, the teacher backends (Ollama, llama.cpp,
transformers), quality filters, and `create_synthetic`.  Never imports `train`."""

from .backends import Completion, Request, Teacher
from .config import SyntheticConfig
from .make import make_teacher
from .synthetic import create_synthetic

__all__ = ["Completion", "Request", "Teacher", "SyntheticConfig", "make_teacher", "create_synthetic"]
