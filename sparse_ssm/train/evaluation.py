"""Language-model evaluation: the loss over score-once windows (what validation during training
and `main.py evaluate --task perplexity` share), and the unigram baseline.

    result = perplexity_on_file(model, tokenizer, "notes.txt", max_seq_len=256, stride=128)

The documents of a file (.txt/.md: one per file; .jsonl/.json/.parquet: one per record) are
joined by <|endoftext|> into one token stream and scored with sliding windows of `max_seq_len`
tokens every `stride` tokens, each token predicted once with up to max_seq_len - stride tokens of
context from the previous window (`data.WindowDataset(score_once=True)`).  Bits per byte divide
the total loss by the UTF-8 size of the text (the stream's first token, never predicted, is the
only text not scored).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from ..data.sources import read_documents
from ..data.streams import encode_documents
from ..data.tokenizer import pad_id_of
from ..data.windows import WindowDataset, collate
from ..util.errors import ConfigError, DataError


@torch.no_grad()
def loss_sum(forward, windows: WindowDataset, pad_id: int, device, batch_starts, batch_size: int,
             autocast=nullcontext) -> tuple[float, int]:
    """(summed loss in nats, scored tokens) over the batches of `windows` starting at `batch_starts`."""
    total, count = 0.0, 0
    for start in batch_starts:
        ids, labels = collate([windows[i] for i in range(start, min(start + batch_size, len(windows)))], pad_id)[:2]
        n = int((labels[:, 1:] != -100).sum())
        if n == 0:
            continue
        with autocast():
            loss = forward(ids.to(device), labels=labels.to(device), return_logits=False).loss
        total += float(loss) * n
        count += n
    return total, count


def loss_metrics(total: float, count: int) -> dict:
    """Mean loss (nats per token), perplexity and bits per token of a summed loss."""
    if count == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "bits_per_token": float("nan"), "tokens": 0}
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700)), "bits_per_token": mean / math.log(2),
            "tokens": count}


def unigram_perplexity(train: np.ndarray, evaluate: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `evaluate` of the add-one-smoothed unigram distribution of `train`: the
    baseline a language model must beat."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[evaluate[1:]].mean()))


def perplexity_on_file(model, tokenizer, path, max_seq_len: int, stride: int | None = None, batch_size: int = 8,
                       text_field: str = "text") -> dict:
    """Loss, perplexity, bits per token and per byte of `model` on the documents of a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"evaluation data {path} does not exist; pass an existing file with --data (a text file, "
                        f"or JSON lines / parquet records with a --text-field)")
    docs = read_documents([path], text_field)
    if not docs:
        raise DataError(f"{path}: no non-empty documents (an empty file, or no --text-field {text_field!r} in its "
                        f"records); pass a file with text in it")
    stride = max_seq_len if stride is None else stride
    if not 1 <= stride <= max_seq_len:
        raise ConfigError(f"stride: must be in [1, max_seq_len = {max_seq_len}], got {stride}")
    windows = WindowDataset(encode_documents(tokenizer, docs).astype(np.int64), max_seq_len, stride, score_once=True)
    model.eval()
    total, count = loss_sum(model, windows, pad_id_of(tokenizer), next(model.parameters()).device,
                            range(0, len(windows), batch_size), batch_size)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    metrics = loss_metrics(total, count)
    return {"file": str(path), "documents": len(docs), "tokens_scored": count, "bytes": text_bytes,
            "loss": metrics["loss"], "perplexity": metrics["perplexity"], "bits_per_token": metrics["bits_per_token"],
            "bits_per_byte": total / math.log(2) / text_bytes, "max_seq_len": max_seq_len, "stride": stride}
