"""From a `dataset` section to what a trainer consumes: the tokenizer, the token stream of each
split and (for distillation) the teacher's per-token targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.errors import DataError
from .config import DatasetConfig
from .sources import load_splits
from .streams import tokenize_splits
from .teacher_targets import prepare_distillation
from .tokenizer import capped_vocab_size, load_tokenizer, pad_id_of, train_tokenizer
from .windows import WindowDataset


@dataclass
class LMData:
    """tokenizer, `streams[split]` (int32 ids), `targets[split]` (teacher top ids, log-probs) or None."""

    tokenizer: object
    streams: dict[str, np.ndarray]
    targets: dict | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    def windows(self, split: str, length: int, stride: int) -> WindowDataset:
        """Training windows of the train split (with teacher rows), score-once windows of the others."""
        if split == "train":
            return WindowDataset(self.streams["train"], length, stride,
                                 targets=self.targets["train"] if self.targets else None)
        return WindowDataset(self.streams[split], length, stride, score_once=True)


def prepare_lm_data(ds: DatasetConfig, vocab_size: int, tokenizer_file: Path | None = None,
                    distillation: bool = False, log=print) -> LMData:
    """The data of a training run.  The tokenizer is, in order: the teacher's (distillation), the
    file `tokenizer_file` when it exists (a resumed run's, or dataset.tokenizer_path), or a
    byte-level BPE trained on the training split with `vocab_size` (capped for small data)."""
    if distillation:
        if ds.type != "synthetic":
            raise DataError(f"distillation.enabled needs dataset.type 'synthetic' (a create-synthetic "
                            f"--distillation dataset), got {ds.type!r}")
        tokenizer, streams, targets = prepare_distillation(ds)
        log(f"distillation from {ds.data_path}: the teacher's tokenizer compacted to the "
            f"{tokenizer.get_vocab_size():,} ids in use")
        return LMData(tokenizer, streams, targets)
    splits = None
    if tokenizer_file is not None and tokenizer_file.is_file():
        tokenizer = load_tokenizer(tokenizer_file)
        log(f"tokenizer: {tokenizer_file} ({tokenizer.get_vocab_size()} tokens)")
    else:
        splits = load_splits(ds)
        chars = sum(len(t) for t in splits["train"])
        size = capped_vocab_size(vocab_size, chars)
        log(f"training a byte-level BPE tokenizer on {chars:,} characters: vocab {size}"
            + (f" (capped from {vocab_size} for this much text)" if size < vocab_size else ""))
        tokenizer = train_tokenizer(splits["train"], size)
    return LMData(tokenizer, tokenize_splits(ds, splits, tokenizer))
