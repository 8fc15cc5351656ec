"""The `synthetic` section: settings of `main.py create-synthetic` (its flags override them),
and the default prompt material."""

from __future__ import annotations

from typing import List, Literal, Optional
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from ..util.schema import Section

DEFAULT_TOPICS = ["the ocean", "a small village", "space travel", "ancient history", "cooking", "music",
                  "a rainy day", "friendship", "mathematics", "a lost key", "gardening", "the railway",
                  "a market town", "winter", "a young inventor", "the forest", "a letter from abroad", "bees",
                  "a storm at sea", "learning to read", "the moon", "a river journey", "an old clock", "chess"]
DEFAULT_STYLES = ["short story", "encyclopedia entry", "letter", "news report", "dialogue", "lesson for children",
                  "diary entry", "description"]
DEFAULT_OPENINGS = ["Once upon a time, in a story about {topic},", "The following is a {style} about {topic}.\n\n",
                    "Chapter 1\n\nIt all began with {topic}.", "{Topic} has always fascinated people because",
                    "Dear friend,\n\nI am writing to tell you about {topic}.", "Here is what everyone should know "
                    "about {topic}:", "It was early morning when the subject of {topic} first came up."]


DEFAULT_OLLAMA_MODEL = "phi4-mini"


def host_problem(host: str) -> str | None:
    """What makes `host` no Ollama server address, or None.  Valid: HOST, HOST:PORT, :PORT,
    http(s)://HOST[:PORT][/path], IPv6 hosts in brackets (what the ollama client reads)."""
    scheme, sep, _ = host.partition("://")
    if sep and scheme not in ("http", "https"):
        return f"the scheme {scheme!r} is not http or https"
    try:
        parts = urlsplit(host if sep else "http://" + host)
        parts.port                              # raises for a port that is not a number in 0-65535
    except ValueError as e:
        return str(e)
    if not parts.hostname and not host.startswith(":"):
        return "it names no host"
    return None


def host_fix(host: str) -> str:
    return (f"{host!r} is not an Ollama server address ({host_problem(host)}); give http://HOST:PORT, e.g. "
            f"http://127.0.0.1:11434 (or HOST:PORT, or [IPv6]:PORT)")


class SyntheticConfig(Section):
    """Prompts: each sample draws a topic and a style; `prompt_style` "instruction" asks an
    instruction-tuned teacher (Ollama's phi4-mini) with `instruction` ("Write a {style} about
    {topic}."), "opening" gives a base model (the bundled Gemma 3 270M) the start of a text from
    `openings` to continue; "auto" picks instruction for ollama and opening for the local GGUF backends.

    backend "auto": the Ollama server when one answers with the model, otherwise a local GGUF
    teacher (llama.cpp when llama-cpp-python is installed, else transformers): the Ollama model's
    own blob when the local model store has it, else the bundled Gemma 3 270M -- but only when no
    Ollama model was named (`model` unset or the default phi4-mini): a named one that neither the
    server nor the local store has is a TeacherError, not a run with another model.
    """

    section = "synthetic"

    backend: Literal["auto", "ollama", "llama_cpp", "transformers"] = "auto"
    model: Optional[str] = None      # ollama: a model name (None: phi4-mini); llama_cpp/transformers: a .gguf
                                     # path or "gemma3-270m" (None: that bundled Gemma 3 270M)
    host: Optional[str] = None       # ollama server; None: $OLLAMA_HOST or http://127.0.0.1:11434
    num_samples: int = Field(1000, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)                 # 0: off
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 42
    output_dir: str = "data/synthetic"
    output_file: str = "phi4_dataset.json"
    distillation: bool = False       # also store the teacher's top-k token ids and log-probabilities
    top_logprobs: int = Field(8, ge=1, le=20)    # k of the distillation targets (Ollama allows at most 20)
    workers: int = Field(1, ge=1)    # concurrent requests (ollama); the local backends run one at a time
    threads: int = Field(1, ge=1)    # CPU threads of the local backends (1 is fastest on a busy machine)
    batch_size: int = Field(8, ge=1)  # transformers backend: samples decoded together (llama_cpp: one at a time)
    timeout_s: float = Field(600.0, gt=0.0)      # per request (ollama)
    prompt_style: Literal["auto", "instruction", "opening"] = "auto"
    instruction: str = "Write a {style} about {topic}. Use plain prose, about 150 words."
    topics: List[str] = Field(default_factory=lambda: list(DEFAULT_TOPICS), min_length=1)
    styles: List[str] = Field(default_factory=lambda: list(DEFAULT_STYLES), min_length=1)
    openings: List[str] = Field(default_factory=lambda: list(DEFAULT_OPENINGS), min_length=1)
    prompts_file: Optional[str] = None   # one prompt per line (or JSONL with "prompt"): used in turn instead
    min_words: int = Field(20, ge=0)     # shorter samples are rejected
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0)   # Jaccard of word 5-gram sets to drop a sample
    max_attempts_factor: int = Field(3, ge=1)    # stop after num_samples * this many requests

    @field_validator("host")
    @classmethod
    def _server_address(cls, value: str | None) -> str | None:
        if value is not None and host_problem(value):
            raise ValueError(f"{host_fix(value)} with --host")
        return value

    @field_validator("output_file")
    @classmethod
    def _json_file_name(cls, value: str) -> str:
        if not value or "/" in value or not value.endswith(".json"):
            raise ValueError(f"must be a file name ending in .json (the folder is output_dir), got {value!r}")
        return value

    def resolved_model(self, backend: str) -> str:
        if self.model:
            return self.model
        return DEFAULT_OLLAMA_MODEL if backend in ("ollama", "auto") else "gemma3-270m"

    def resolved_prompt_style(self, backend: str) -> str:
        """The prompt style for the teacher's actual backend."""
        if self.prompt_style != "auto":
            return self.prompt_style
        return "instruction" if backend == "ollama" else "opening"
