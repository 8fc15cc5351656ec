"""The data floor: dataset config, sources and splitting, tokenizers (byte-level BPE and the
compact teacher tokenizer), cached token streams, windows and batching, teacher-target files,
and the embedded corpus.  Imports only `sparse_ssm.util`."""

from .config import DatasetConfig
from .pipeline import LMData, prepare_lm_data
from .windows import WindowDataset, collate

__all__ = ["DatasetConfig", "LMData", "prepare_lm_data", "WindowDataset", "collate"]
