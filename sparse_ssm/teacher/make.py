"""The teacher of a `synthetic` section (see `SyntheticConfig` for backend "auto")."""

from __future__ import annotations

from ..util.errors import TeacherError
from .backends import LlamaCppTeacher, Teacher, TransformersTeacher
from .config import DEFAULT_OLLAMA_MODEL, SyntheticConfig
from .gguf import BUNDLED_GGUF, ollama_model_blob
from .ollama import OllamaTeacher


def make_teacher(cfg: SyntheticConfig, log=print) -> Teacher:
    """The teacher of the `synthetic` section (see SyntheticConfig for backend "auto")."""
    model = cfg.resolved_model(cfg.backend)
    if cfg.backend == "ollama":
        return OllamaTeacher(model, cfg.host, cfg.timeout_s)
    if cfg.backend == "auto":
        try:
            return OllamaTeacher(model, cfg.host, cfg.timeout_s)
        except TeacherError as e:
            reason = e.summary
        if model != BUNDLED_GGUF and not model.endswith(".gguf"):
            try:
                model = str(ollama_model_blob(model))
            except TeacherError:
                if model != DEFAULT_OLLAMA_MODEL:      # a model was named: another one would not do
                    raise TeacherError(
                        f"--backend auto: {reason}, and the Ollama model {model!r} you named is not in the local "
                        f"Ollama model store, so no teacher here can run it: start Ollama (`ollama serve`, then "
                        f"`ollama pull {model}`) or point --host / OLLAMA_HOST at a server that has it; or run a "
                        f"local GGUF file with --backend llama_cpp --model PATH.gguf (--model {BUNDLED_GGUF}: "
                        f"the bundled Gemma 3 270M)", summary=reason) from None
                model = BUNDLED_GGUF
        try:
            import llama_cpp  # noqa: F401
            backend = "llama_cpp"
        except ImportError:
            backend = "transformers"
        log(f"note: {reason}; using the local teacher instead: {backend} with {model} "
            f"(choose with --backend / --model)")
    else:
        backend = cfg.backend
    if backend == "llama_cpp":
        return LlamaCppTeacher(model, cfg.threads, context=max(512, cfg.max_new_tokens + 256))
    return TransformersTeacher(model, cfg.threads, cfg.batch_size)
