"""Token streams: the documents of each split joined by <|endoftext|> into one array of ids,
cached on disk under `dataset.cache_dir`, keyed by the sources and the tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..util.files import atomic_directory
from .config import DatasetConfig
from .sources import SEGMENT_CHARS, data_files, load_splits
from .tokenizer import EOS

SPLITS = ("train", "validation", "test")


def encode_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """One stream of token ids: every document followed by <|endoftext|>."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def _fingerprint(cfg: DatasetConfig, tokenizer_json: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.type, cfg.data_path, cfg.val_split, cfg.test_split, cfg.split_seed, cfg.text_field,
                         cfg.max_documents, SEGMENT_CHARS]).encode())
    if cfg.data_path and Path(cfg.data_path).exists():
        for f in data_files(Path(cfg.data_path)) if Path(cfg.data_path).is_dir() else [Path(cfg.data_path)]:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(hashlib.sha256(tokenizer_json.encode()).digest())
    return h.hexdigest()[:16]


def tokenize_splits(cfg: DatasetConfig, splits: dict[str, list[str]] | None, tokenizer) -> dict[str, np.ndarray]:
    """Token streams per split, cached under cfg.cache_dir.  `splits` may be None (the documents
    are then read from the source when the cache misses)."""
    cache = Path(cfg.cache_dir) / _fingerprint(cfg, tokenizer.to_str())
    if all((cache / f"{n}.npy").is_file() for n in SPLITS):
        return {n: np.load(cache / f"{n}.npy") for n in SPLITS}
    if splits is None:
        splits = load_splits(cfg)
    streams = {name: encode_documents(tokenizer, splits[name]) for name in SPLITS}
    with atomic_directory(cache, keep_existing=True) as tmp:   # another process may have filled it meanwhile
        for name, arr in streams.items():
            np.save(tmp / f"{name}.npy", arr)
    return streams
