"""Data: documents from each dataset type, a deterministic split, tokenisation with an on-disk
cache, and sliding windows.

Dataset types (`dataset.type`):
- ``custom``: local .txt/.md (one document per file), .jsonl/.json and .parquet files (one
  document per record, field `dataset.text_field`), or a folder of them; read with the `datasets`
  local loaders.
- ``synthetic``: the JSON file of `create-synthetic`: a list of records with a `text` field, or
  an object with such a list under `records`.
- ``wikitext103``: `Salesforce/wikitext`, config `wikitext-103-raw-v1`, its own train /
  validation / test splits; with `data_path` the same schema from local files (a folder with
  train*/validation*/test* parquet, jsonl or text files).
- ``pile``: an uncopyrighted Pile mirror (`monology/pile-uncopyrighted`), streamed, the first
  `dataset.max_documents` documents (default 100,000); with `data_path`, local files.

Split (types without their own splits): documents are cut at line breaks into segments of at
most 8,192 characters; a permutation seeded by `dataset.split_seed` sends `test_split` of the
segments to test, `val_split` to validation and the rest to train.  The split does not depend on
the tokenizer, so the tokenizer trains on the training text only.

Windows: each split is one token stream (documents joined by <|endoftext|>); training windows
of `max_seq_len` tokens start every `stride` tokens.  Evaluation windows use the same stride but
score only the tokens not scored by the previous window (labels -100 elsewhere), so perplexity
counts every token once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DatasetConfig

SEGMENT_CHARS = 8192
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSON_SUFFIXES = {".json", ".jsonl"}
HUB = {"wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1"), "pile": ("monology/pile-uncopyrighted", None)}


class DataError(RuntimeError):
    """A data source is missing, unreadable or unreachable; the message says how to fix it."""


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"}
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{path} holds no .txt/.md/.json/.jsonl/.parquet files")
    return files


def _local_documents(files: list[Path], text_field: str, limit: int | None = None) -> list[str]:
    """Documents from local files through the `datasets` loaders."""
    import datasets

    datasets.disable_progress_bars()
    docs: list[str] = []
    by_kind = {"text": [f for f in files if f.suffix in TEXT_SUFFIXES],
               "json": [f for f in files if f.suffix in JSON_SUFFIXES],
               "parquet": [f for f in files if f.suffix == ".parquet"]}
    for kind, group in by_kind.items():
        if not group:
            continue
        kwargs = {"sample_by": "document"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in group], split="train", **kwargs)
        except Exception as e:  # noqa: BLE001 - the loaders raise many kinds; report the file group
            raise DataError(f"could not read {', '.join(map(str, group[:3]))}: {e}") from None
        field = "text" if kind == "text" else text_field
        if field not in ds.column_names:
            raise DataError(f"{group[0]}: records have no field {field!r} (fields: {ds.column_names}); "
                            f"set dataset.text_field")
        docs.extend(t for t in ds[field] if isinstance(t, str) and t.strip())
    return docs[:limit] if limit else docs


def _synthetic_documents(path: Path, text_field: str) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); expected the file written by create-synthetic") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of records (or an object with 'records'), got {type(data).__name__}")
    docs = [r.get(text_field) for r in records if isinstance(r, dict)]
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise DataError(f"{path}: no record has a non-empty {text_field!r} field")
    return docs


def _hub(dataset_type: str, split: str, limit: int | None):
    import datasets

    name, config = HUB[dataset_type]
    try:
        if dataset_type == "pile":
            stream = datasets.load_dataset(name, split=split, streaming=True)
            return [row["text"] for _, row in zip(range(limit or 100_000), stream)]
        return datasets.load_dataset(name, config, split=split)["text"]
    except Exception as e:  # noqa: BLE001 - offline errors come in many classes
        raise DataError(f"could not load {name}{'/' + config if config else ''} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e)[:200]}). Without network access, download it once "
                        f"elsewhere and set dataset.data_path to local files with a 'text' field.") from None


def _segments(docs: list[str]) -> list[str]:
    out = []
    for doc in docs:
        if len(doc) <= SEGMENT_CHARS:
            out.append(doc)
            continue
        piece = []
        size = 0
        for line in doc.splitlines(keepends=True):
            if size + len(line) > SEGMENT_CHARS and piece:
                out.append("".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            out.append("".join(piece))
    return out


def split_documents(docs: list[str], val_split: float, test_split: float, seed: int) -> dict[str, list[str]]:
    """Deterministic train / validation / test split of the segments of `docs`."""
    segs = _segments(docs)
    order = list(range(len(segs)))
    random.Random(seed).shuffle(order)
    n_test = round(test_split * len(segs))
    n_val = round(val_split * len(segs))
    if (test_split and not n_test) or (val_split and not n_val) or len(segs) - n_test - n_val < 1:
        raise DataError(f"only {len(segs)} text segments: too few for val_split {val_split} and test_split "
                        f"{test_split}; add data or lower the splits")
    pick = lambda idx: [segs[i] for i in sorted(idx)]
    return {"test": pick(order[:n_test]), "validation": pick(order[n_test:n_test + n_val]),
            "train": pick(order[n_test + n_val:])}


def load_splits(cfg: DatasetConfig) -> dict[str, list[str]]:
    """Documents of the train / validation / test splits for a dataset config."""
    path = Path(cfg.data_path) if cfg.data_path else None
    if path is not None and not path.exists():
        if "shakespeare" in str(path):
            hint = " For the embedded corpus run: python -m sparse_ssm.corpus data/shakespeare (or make demo)."
        elif cfg.type == "synthetic":
            hint = (" dataset.type 'synthetic' reads a JSON list of records with a 'text' field (what create-synthetic "
                    "writes); point dataset.data_path at one, use your own files with dataset.type 'custom', or "
                    "train on the embedded corpus with config/small_cpu.yaml.")
        else:
            hint = ""
        raise DataError(f"dataset.data_path {path} does not exist.{hint}")
    if cfg.type == "wikitext103":
        if path is None:
            splits = {s: ["\n".join(_hub("wikitext103", s, None))] for s in ("train", "validation", "test")}
        else:
            files = _files(path)
            splits = {}
            for s in ("train", "validation", "test"):
                group = [f for f in files if f.name.startswith(s)]
                if not group:
                    raise DataError(f"{path}: no {s}* file; a local wikitext folder needs train*, validation* "
                                    f"and test* files with a 'text' field")
                splits[s] = ["".join(line if line.endswith("\n") else line + "\n"
                                     for line in _local_documents(group, cfg.text_field))]
        return splits
    if cfg.type == "synthetic":
        docs = _synthetic_documents(path, cfg.text_field)
    elif cfg.type == "pile" and path is None:
        docs = _hub("pile", "train", cfg.max_documents)
    else:
        docs = _local_documents(_files(path), cfg.text_field, cfg.max_documents)
    if not docs:
        raise DataError(f"{path}: no non-empty documents")
    return split_documents(docs, cfg.val_split, cfg.test_split, cfg.split_seed)


def _fingerprint(cfg: DatasetConfig, tokenizer_json: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.type, cfg.data_path, cfg.val_split, cfg.test_split, cfg.split_seed, cfg.text_field,
                         cfg.max_documents, SEGMENT_CHARS]).encode())
    if cfg.data_path and Path(cfg.data_path).exists():
        for f in _files(Path(cfg.data_path)) if Path(cfg.data_path).is_dir() else [Path(cfg.data_path)]:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(hashlib.sha256(tokenizer_json.encode()).digest())
    return h.hexdigest()[:16]


def tokenize_splits(cfg: DatasetConfig, splits: dict[str, list[str]] | None, tokenizer) -> dict[str, np.ndarray]:
    """Token streams per split (documents joined by <|endoftext|>), cached under cfg.cache_dir.

    `splits` may be None when the cache is known to exist (it is then not read from the source)."""
    from .tokenizer import EOS

    cache = Path(cfg.cache_dir) / _fingerprint(cfg, tokenizer.to_str())
    names = ("train", "validation", "test")
    if all((cache / f"{n}.npy").is_file() for n in names):
        return {n: np.load(cache / f"{n}.npy") for n in names}
    if splits is None:
        splits = load_splits(cfg)
    eos = tokenizer.token_to_id(EOS)
    streams = {}
    for name in names:
        ids: list[int] = []
        for enc in tokenizer.encode_batch(splits[name]):
            ids.extend(enc.ids)
            ids.append(eos)
        streams[name] = np.asarray(ids, dtype=np.int32)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, arr in streams.items():
        np.save(tmp / f"{name}.npy", arr)
    if not cache.exists():
        tmp.rename(cache)
    return streams


@dataclass
class WindowDataset(torch.utils.data.Dataset):
    """Windows of `length` tokens every `stride` tokens of a stream.  With `score_once`, labels
    are -100 on the tokens an earlier window already scored (for evaluation).  With `targets`,
    items also carry the teacher rows of their tokens (ids, labels, top_ids, top_logprobs)."""

    stream: np.ndarray
    length: int
    stride: int
    score_once: bool = False
    targets: tuple[np.ndarray, np.ndarray] | None = None   # distillation: per-token teacher top ids, log-probs (N, k)

    def __post_init__(self):
        last = max(len(self.stream) - self.length, 0)
        self.starts = np.arange(0, last + 1, self.stride)
        if len(self.stream) >= self.length and self.starts[-1] != last:
            self.starts = np.append(self.starts, last)   # cover the tail
        if len(self.stream) < 2:
            self.starts = self.starts[:0]

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        start = int(self.starts[i])
        ids = torch.from_numpy(self.stream[start:start + self.length].astype(np.int64))
        labels = ids.clone()
        if self.score_once and i > 0:
            prev_end = int(self.starts[i - 1]) + self.length
            labels[:max(prev_end - start, 0)] = -100   # tokens start .. prev_end - 1 were scored before
        if self.targets is None:
            return ids, labels
        top_ids, top_logprobs = (torch.from_numpy(t[start:start + self.length]) for t in self.targets)
        return ids, labels, top_ids.long(), top_logprobs


def collate(batch, pad_id: int):
    """Stack items of different lengths: ids padded with pad_id, labels with -100 (and teacher
    rows with -1 ids / -inf log-probabilities)."""
    length = max(len(item[0]) for item in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (i, l, *_) in enumerate(batch):
        ids[row, :len(i)] = i
        labels[row, :len(l)] = l
    if len(batch[0]) == 2:
        return ids, labels
    k = batch[0][2].shape[-1]
    top_ids = torch.full((len(batch), length, k), -1, dtype=torch.long)
    top_logprobs = torch.full((len(batch), length, k), float("-inf"))
    for row, (_, _, t, lp) in enumerate(batch):
        top_ids[row, :len(t)] = t
        top_logprobs[row, :len(lp)] = lp
    return ids, labels, top_ids, top_logprobs
