"""Sliding windows over a token stream, and batching.

Training windows of `length` tokens start every `stride` tokens.  Evaluation windows
(`score_once`) use the same stride but score only the tokens not scored by the previous window
(labels -100 elsewhere), so perplexity counts every token once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
