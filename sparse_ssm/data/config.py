"""The `dataset` section: where the text comes from, how it is split, tokenised and windowed."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..util.schema import Section


class DatasetConfig(Section):
    section = "dataset"

    type: Literal["synthetic", "wikitext103", "pile", "custom"] = "synthetic"
    max_seq_len: int = Field(1024, ge=2)
    stride: int = Field(512, ge=1)
    data_path: Optional[str] = "data/synthetic/phi4_dataset.json"
    val_split: float = Field(0.1, ge=0.0, lt=1.0)
    test_split: float = Field(0.1, ge=0.0, lt=1.0)
    text_field: str = "text"
    tokenizer_path: Optional[str] = None           # an existing tokenizer.json; None: train a byte-level BPE
    tokenizer_vocab_size: Optional[int] = Field(None, ge=260)   # None: model.vocab_size (capped for small data)
    cache_dir: str = "data/cache"
    split_seed: int = 1234
    max_documents: Optional[int] = Field(None, ge=1)   # cap on documents read (streamed datasets: required)

    @model_validator(mode="after")
    def _check_relations(self):
        if self.stride > self.max_seq_len:
            raise ValueError(f"stride: must be in [1, max_seq_len = {self.max_seq_len}], got {self.stride}")
        if self.val_split + self.test_split >= 1:
            raise ValueError(f"val_split: val_split + test_split must be < 1, got {self.val_split} + {self.test_split}")
        if self.type not in ("wikitext103", "pile") and not self.data_path:
            raise ValueError(f"data_path: is required for dataset type {self.type!r}")
        return self
