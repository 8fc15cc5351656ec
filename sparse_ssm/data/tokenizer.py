"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the training split.

Byte-level BPE never meets an unknown character and decodes to exactly the text it encoded.
`<|endoftext|>` separates documents (and ends generation); `<|pad|>` pads batches.

A model distilled from a teacher reads the teacher's own token ids through `CompactTokenizer`:
the teacher's tokenizer with its vocabulary compacted to the ids a dataset uses, saved as
tokenizer.json + vocab_map.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..util.errors import DataError
from ..util.files import atomic_write_text

EOS, PAD = "<|endoftext|>", "<|pad|>"
MIN_VOCAB = 260  # 256 bytes + specials + a few merges
VOCAB_MAP = "vocab_map.json"
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|pad|>", "<unk>")
UNK_NAMES = ("<unk>",)


def capped_vocab_size(requested: int, train_chars: int) -> int:
    """Keep the vocabulary sensible for the amount of training text: about one token type per
    400 characters (a 5 M character corpus gets at most ~12k), never below 512."""
    return max(MIN_VOCAB, min(requested, max(512, train_chars // 400)))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json; with a vocab_map.json beside it (a distilled model), the teacher's
    tokenizer seen through the student's compacted vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        if (path.parent / VOCAB_MAP).is_file():
            return CompactTokenizer.load(path)
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for damaged files
        raise DataError(f"{path} is not a valid tokenizer.json ({type(e).__name__}: {str(e)[:200]})") from None


def pad_id_of(tokenizer) -> int:
    """The id batches are padded with: <|pad|> (or the teacher's pad token), else end-of-text, else 0."""
    pad = tokenizer.token_to_id(PAD)
    return pad if pad is not None else (tokenizer.token_to_id(EOS) or 0)


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
        atomic_write_text(path, self.teacher.to_str())
        atomic_write_text(Path(path).parent / VOCAB_MAP, json.dumps({"student_to_teacher": self.student_to_teacher.tolist()}))

    @classmethod
    def load(cls, path: Path) -> "CompactTokenizer":
        mapping = json.loads((Path(path).parent / VOCAB_MAP).read_text())["student_to_teacher"]
        return cls(Tokenizer.from_file(str(path)), np.array(mapping))


@dataclass
class _Encoding:
    ids: list[int]


def save_tokenizer(tokenizer, path: str | Path):
    """Write a tokenizer (and a compact one's vocab_map.json) atomically."""
    if isinstance(tokenizer, CompactTokenizer):
        tokenizer.save(path)
    else:
        atomic_write_text(path, tokenizer.to_str(pretty=True))
