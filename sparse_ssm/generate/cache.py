"""Row operations on a recurrent cache (`list[LayerState]`, one per layer; row r of every tensor is
sequence r).  Everything that batches sequences — `stream_generate`, transformers' `generate`
(beam reordering, `num_return_sequences`) and the server's running batch (requests join and leave
between steps) — goes through these functions, so a change of `LayerState` touches this file only.

    LayerState.conv (b, E, K-1)       LayerState.ssm (b, H, N, P)
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..model import LayerState

Cache = list[LayerState]


def stack_rows(caches: Sequence[Cache]) -> Cache:
    """Concatenate caches along the batch: rows of caches[0] first, then caches[1], ..."""
    return [LayerState(torch.cat([c[i].conv for c in caches]), torch.cat([c[i].ssm for c in caches]))
            for i in range(len(caches[0]))]


def select_rows(cache: Cache, rows: torch.Tensor | Sequence[int]) -> Cache:
    """The rows `rows` (in that order; repeats allowed) of every layer's state: drop finished
    sequences, reorder beams, or repeat a row."""
    index = torch.as_tensor(rows, dtype=torch.long, device=cache[0].ssm.device)
    return [LayerState(s.conv.index_select(0, index), s.ssm.index_select(0, index)) for s in cache]


def repeat_rows(cache: Cache, repeats: int) -> Cache:
    """Each row `repeats` times in a row (row 0, row 0, ..., row 1, ...), as `repeat_interleave`."""
    return [LayerState(s.conv.repeat_interleave(repeats, 0), s.ssm.repeat_interleave(repeats, 0)) for s in cache]


def batch_size(cache: Cache) -> int:
    return cache[0].ssm.shape[0]
