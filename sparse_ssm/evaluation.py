"""Language-model evaluation of a checkpoint on a file: loss, perplexity, bits per token and byte.

    result = perplexity_on_file(model, tokenizer, "notes.txt", max_seq_len=256, stride=128)

The documents of the file (.txt/.md: one per file; .jsonl/.json/.parquet: one per record) are
joined by <|endoftext|> into one token stream and scored with sliding windows of `max_seq_len`
tokens every `stride` tokens, each token predicted once with up to max_seq_len - stride tokens of
context from the previous window (`data.WindowDataset(score_once=True)`).  Bits per byte divide
the total loss by the UTF-8 size of the text (the stream's first token, never predicted, is the
only text not scored).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .data import DataError, WindowDataset, _local_documents, collate
from .tokenizer import EOS, PAD


@torch.no_grad()
def perplexity_on_file(model, tokenizer, path, max_seq_len: int, stride: int | None = None, batch_size: int = 8,
                       text_field: str = "text") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} does not exist")
    docs = _local_documents([path], text_field)
    if not docs:
        raise DataError(f"{path}: no non-empty documents")
    stride = stride or max_seq_len
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be in [1, max_seq_len = {max_seq_len}], got {stride}")
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    windows = WindowDataset(np.asarray(ids, dtype=np.int64), max_seq_len, stride, score_once=True)
    pad = tokenizer.token_to_id(PAD) or 0
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch, labels = collate([windows[i] for i in range(start, min(start + batch_size, len(windows)))], pad)
        n = int((labels[:, 1:] != -100).sum())
        if n:
            loss = model(batch.to(device), labels=labels.to(device), return_logits=False).loss
            total += float(loss) * n
            count += n
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    mean = total / count
    return {"file": str(path), "documents": len(docs), "tokens_scored": count, "bytes": text_bytes,
            "loss": mean, "perplexity": math.exp(min(mean, 700)), "bits_per_token": mean / math.log(2),
            "bits_per_byte": total / math.log(2) / text_bytes, "max_seq_len": max_seq_len, "stride": stride}
