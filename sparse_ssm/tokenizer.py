"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the training split.

Byte-level BPE never meets an unknown character and decodes to exactly the text it encoded.
`<|endoftext|>` separates documents (and ends generation); `<|pad|>` pads batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS, PAD = "<|endoftext|>", "<|pad|>"
MIN_VOCAB = 260  # 256 bytes + specials + a few merges


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
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    from .distillation import VOCAB_MAP, CompactTokenizer
    if (path.parent / VOCAB_MAP).is_file():
        return CompactTokenizer.load(path)
    return Tokenizer.from_file(str(path))
