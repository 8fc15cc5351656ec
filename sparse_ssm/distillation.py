"""Knowledge distillation from a teacher's stored top-k log-probabilities
(a `create-synthetic --distillation` dataset; `distillation.enabled: true`).

The student reads the teacher's own token ids, so it uses the teacher's tokenizer, with the
vocabulary compacted to the ids that occur in the dataset (plus the special tokens): Gemma's
262,144 ids would otherwise dominate a small student.  `CompactTokenizer` wraps the teacher's
tokenizer with that map and is saved as tokenizer.json + vocab_map.json beside each checkpoint,
so generation encodes and decodes through it.

Loss (per position with teacher targets; the cross-entropy runs over every labelled position)::

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(q_T || s_T)

over k + 1 outcomes: the teacher's top-k tokens and "any other token".  The teacher's
probabilities p_i = exp(logprob_i) leave the remaining mass r = 1 - sum_i p_i for the last
outcome.  At temperature T the outcomes are re-weighted as q ∝ (p_1, ..., p_k, r) ** (1/T)
(exact at T = 1; for T != 1 the rest is treated as one token, since its split is unknown).  The
student's outcomes are s_i = softmax(z / T)_i at the k ids and s_rest = 1 - sum_i s_i.  Empty
slots (-1 ids) are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DatasetConfig
from .data import DataError
from .tokenizer import EOS, PAD

VOCAB_MAP = "vocab_map.json"
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|pad|>", "<unk>")
UNK_NAMES = ("<unk>",)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                      alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kd).  logits (b, L, V); labels (b, L) (-100 ignored); top_ids / top_logprobs
    (b, L, k): row t is the teacher's distribution of token t (ids -1 where empty).  Position t
    predicts token t + 1, as in the model's own loss."""
    logits = logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()    # half precision: compute in float32
    targets, ids, teacher_lp = labels[:, 1:], top_ids[:, 1:], top_logprobs[:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    valid = ids >= 0                                                   # (b, L-1, k)
    rows = valid.any(-1) & (targets != -100)
    if alpha == 0 or not rows.any():
        kd = logits.new_zeros(())
        return (1 - alpha) * ce + alpha * kd, ce, kd
    z = logits[rows] / temperature                                     # (n, V)
    ids, valid, teacher_lp = ids[rows], valid[rows], teacher_lp[rows]
    student_lp = torch.log_softmax(z, -1).gather(-1, ids.clamp(min=0))    # (n, k)
    student_lp = student_lp.masked_fill(~valid, float("-inf"))
    student_rest = torch.log1p(-student_lp.exp().sum(-1).clamp(max=1 - 1e-6))           # (n,)
    teacher_lp = teacher_lp.masked_fill(~valid, float("-inf"))
    teacher_rest = torch.log1p(-teacher_lp.exp().sum(-1).clamp(max=1 - 1e-6))
    teacher_all = torch.cat([teacher_lp, teacher_rest[:, None]], -1) / temperature
    q_log = torch.log_softmax(teacher_all, -1)                          # renormalised at temperature T
    s_log = torch.cat([student_lp, student_rest[:, None]], -1)
    q = q_log.exp()
    kl = (q * (q_log - s_log)).nan_to_num(0.0).sum(-1)                  # 0 * log 0 = 0 on empty slots
    kd = temperature ** 2 * kl.mean()
    return (1 - alpha) * ce + alpha * kd, ce, kd


class CompactTokenizer:
    """The teacher's tokenizer seen through a compacted vocabulary: student id s is teacher id
    `student_to_teacher[s]`.  Offers the methods of `tokenizers.Tokenizer` that sparse-ssm uses;
    `token_to_id` also answers our generic EOS / PAD names with the teacher's own tokens."""

    def __init__(self, teacher, student_to_teacher: np.ndarray):
        self.teacher = teacher
        self.student_to_teacher = np.asarray(student_to_teacher, dtype=np.int64)
        self.teacher_to_student = {int(t): s for s, t in enumerate(self.student_to_teacher)}
        vocab = teacher.get_vocab(with_added_tokens=True)
        pick = lambda names: next((vocab[n] for n in names if n in vocab and vocab[n] in self.teacher_to_student), None)
        self.eos_teacher, self.pad_teacher, self.unk_teacher = pick(EOS_NAMES), pick(PAD_NAMES), pick(UNK_NAMES)

    def get_vocab_size(self) -> int:
        return len(self.student_to_teacher)

    def to_student(self, teacher_ids) -> list[int]:
        """Teacher ids → student ids; ids outside the compact vocabulary become <unk> (or end-of-text)."""
        fallback = self.teacher_to_student.get(self.unk_teacher if self.unk_teacher is not None else self.eos_teacher, 0)
        return [self.teacher_to_student.get(int(t), fallback) for t in teacher_ids]

    def encode(self, text: str):
        encoding = self.teacher.encode(text)
        return _Encoding(self.to_student(encoding.ids))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.teacher.decode([int(self.student_to_teacher[i]) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        if token == EOS and self.eos_teacher is not None:
            return self.teacher_to_student[self.eos_teacher]
        if token == PAD and self.pad_teacher is not None:
            return self.teacher_to_student[self.pad_teacher]
        teacher_id = self.teacher.token_to_id(token)
        return self.teacher_to_student.get(teacher_id) if teacher_id is not None else None

    def to_str(self) -> str:
        return json.dumps(self.student_to_teacher.tolist()) + self.teacher.to_str()[:4096]

    def save(self, path: str):
        """tokenizer.json (the teacher's) and vocab_map.json beside it."""
        self.teacher.save(str(path))
        (Path(path).parent / VOCAB_MAP).write_text(json.dumps({"student_to_teacher": self.student_to_teacher.tolist()}))

    @classmethod
    def load(cls, path: Path) -> "CompactTokenizer":
        from tokenizers import Tokenizer
        mapping = json.loads((Path(path).parent / VOCAB_MAP).read_text())["student_to_teacher"]
        return cls(Tokenizer.from_file(str(path)), np.array(mapping))


@dataclass
class _Encoding:
    ids: list[int]


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


def prepare(ds: DatasetConfig, teacher_tokenizer=None):
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
