"""Teacher-target files: a `create-synthetic --distillation` dataset in the teacher's token ids,
with the teacher's top-k next-token distribution of every generated token.

Files (STEM = the dataset's name without .json), beside the dataset JSON:

- STEM.teacher.safetensors::

      token_ids (T,) int32, record_offsets (R+1,) int64    record r: token_ids[o[r]:o[r+1]]
      teacher_start (R,) int64                              first generated position in record r
      top_ids (G, k) int32, top_logprobs (G, k) float32     -1 / -inf where a slot is empty
      target_offsets (R+1,) int64                           rows of record r: top_*[g[r]:g[r+1]];
                                                            row j is the distribution of token
                                                            teacher_start[r] + j of the record
- STEM.tokenizer.json: the teacher's tokenizer.

`write_teacher_targets` writes the first (what `sparse_ssm.teacher` calls); `prepare_distillation`
reads both into the student's compacted vocabulary (see `tokenizer.CompactTokenizer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.errors import DataError
from ..util.files import atomic_path
from .config import DatasetConfig
from .tokenizer import EOS, EOS_NAMES, PAD_NAMES, CompactTokenizer

FORMAT_VERSION = 1


@dataclass
class TeacherData:
    """A distillation dataset in the teacher's ids: per record its tokens and, for the generated
    ones, the teacher's top-k (see `sparse_ssm.synthetic` for the file layout)."""

    token_ids: np.ndarray
    record_offsets: np.ndarray
    teacher_start: np.ndarray
    target_offsets: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    tokenizer_path: Path

    @property
    def num_records(self) -> int:
        return len(self.record_offsets) - 1


def load_teacher_data(json_path: str | Path) -> TeacherData:
    from safetensors.numpy import load_file

    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"dataset.data_path {path} does not exist; write a distillation dataset with "
                        f"python main.py create-synthetic --config ... --distillation")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    info = meta.get("distillation") if isinstance(meta, dict) else None
    if not info:
        raise DataError(f"{path} holds no teacher log-probabilities (distillation.enabled is true): write it with "
                        f"create-synthetic --distillation, or set distillation.enabled: false")
    files = {name: path.parent / info[name] for name in ("file", "tokenizer")}
    for file in files.values():
        if not file.is_file():
            raise DataError(f"{file}, named in {path}, is missing: the dataset is incomplete; create it again")
    try:
        arrays = load_file(str(files["file"]))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{files['file']} is corrupt ({type(e).__name__}: {e}); create the dataset again") from None
    return TeacherData(**{k: arrays[k] for k in ("token_ids", "record_offsets", "teacher_start", "target_offsets",
                                                 "top_ids", "top_logprobs")}, tokenizer_path=files["tokenizer"])


def prepare_distillation(ds: DatasetConfig, teacher_tokenizer=None):
    """(tokenizer, streams, targets) for training on a distillation dataset: records split by
    ds.val_split / ds.test_split (seeded by ds.split_seed), each split one stream of student ids
    (records separated by end-of-text) with per-token teacher rows (top ids in student ids, -1
    where the token has no teacher target)."""
    from tokenizers import Tokenizer

    data = load_teacher_data(ds.data_path)
    teacher_tokenizer = teacher_tokenizer or Tokenizer.from_file(str(data.tokenizer_path))
    vocab = teacher_tokenizer.get_vocab(with_added_tokens=True)
    specials = [vocab[n] for n in EOS_NAMES + PAD_NAMES + ("<bos>", "<s>") if n in vocab]
    used = np.unique(np.concatenate([data.token_ids, data.top_ids[data.top_ids >= 0], np.array(specials, dtype=np.int32)]))
    tokenizer = CompactTokenizer(teacher_tokenizer, used)
    if tokenizer.eos_teacher is None:
        raise DataError(f"the teacher tokenizer {data.tokenizer_path} has none of the end-of-text tokens {EOS_NAMES}")
    lookup = np.full(max(int(used.max()) + 1, len(vocab)), -1, dtype=np.int64)
    lookup[used] = np.arange(len(used))
    eos = tokenizer.token_to_id(EOS)
    k = data.top_ids.shape[1]

    order = np.random.default_rng(ds.split_seed).permutation(data.num_records)
    n_test = int(round(ds.test_split * data.num_records)) if ds.test_split else 0
    n_val = int(round(ds.val_split * data.num_records)) if ds.val_split else 0
    if data.num_records >= 3:
        n_test, n_val = max(n_test, 1 if ds.test_split else 0), max(n_val, 1 if ds.val_split else 0)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    streams, targets = {}, {}
    for name, records in parts.items():
        ids, tops, lps = [], [], []
        for r in sorted(records):
            tokens = data.token_ids[data.record_offsets[r]:data.record_offsets[r + 1]]
            rows = np.full((len(tokens) + 1, k), -1, dtype=np.int64)
            logps = np.full((len(tokens) + 1, k), -np.inf, dtype=np.float32)
            start, g0, g1 = int(data.teacher_start[r]), int(data.target_offsets[r]), int(data.target_offsets[r + 1])
            top = data.top_ids[g0:g1]
            rows[start:start + len(top)] = np.where(top >= 0, lookup[np.maximum(top, 0)], -1)
            logps[start:start + len(top)] = data.top_logprobs[g0:g1]
            ids.append(np.append(lookup[tokens], eos))
            tops.append(rows)
            lps.append(logps)
        empty = lambda dtype: np.zeros((0, k), dtype=dtype)
        streams[name] = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, dtype=np.int32)
        targets[name] = (np.concatenate(tops).astype(np.int32) if tops else empty(np.int32),
                         np.concatenate(lps) if lps else empty(np.float32))
    return tokenizer, streams, targets


def write_teacher_targets(path: Path, records: list[dict], k: int, with_prompt: bool):
    """Write STEM.teacher.safetensors from records with `token_ids`, `top_ids`, `top_logprobs` (and
    `prompt_ids`, stored in front of the text when `with_prompt`)."""
    from safetensors.numpy import save_file

    ids, starts, record_offsets, target_offsets, tops, logps = [], [], [0], [0], [], []
    for r in records:
        prompt_ids = r["prompt_ids"] if with_prompt else []
        ids.extend(prompt_ids + r["token_ids"])
        starts.append(len(prompt_ids))
        record_offsets.append(len(ids))
        tops.extend(r["top_ids"])
        logps.extend(r["top_logprobs"])
        target_offsets.append(len(tops))
    tensors = {"token_ids": np.array(ids, dtype=np.int32), "record_offsets": np.array(record_offsets, dtype=np.int64),
               "teacher_start": np.array(starts, dtype=np.int64),
               "target_offsets": np.array(target_offsets, dtype=np.int64),
               "top_ids": np.array(tops, dtype=np.int32).reshape(-1, k),
               "top_logprobs": np.array(logps, dtype=np.float32).reshape(-1, k)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"version": str(FORMAT_VERSION), "top_k": str(k)})
