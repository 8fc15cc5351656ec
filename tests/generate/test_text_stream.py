"""TextStream decodes incrementally: the text it streams equals the tokenizer's decode of all the ids,
for the tokenizers sparse-ssm ships (its byte-level BPE; a teacher's sentencepiece-style tokenizer
with byte fallback through CompactTokenizer), while each token decodes only a few ids."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from sparse_ssm.data.tokenizer import CompactTokenizer, train_tokenizer
from sparse_ssm.generate.text import TextStream

TEXT = ("Olá, café crème — naïve façade! 日本語のテキスト and emoji 🙂🚀 with  two  spaces,\n"
        "Ünïcödé again: ß, €, 😀; the end. ") * 4


def byte_level():
    return train_tokenizer([TEXT.replace("🙂", "").replace("日本語", "") * 3, "plain words and spaces " * 50], 400)


def sentencepiece_with_byte_fallback():
    """Gemma / Llama style: '▁' for spaces, <0xNN> byte tokens for characters outside the vocabulary,
    a leading space stripped; seen as a teacher's tokenizer through CompactTokenizer."""
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.!:;'-\n") | {"▁", "é"})
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in alphabet + ["▁t", "he", "▁the", "▁a", "an", "▁and"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("a", "n"), ("▁a", "nd")]
    merges = [m for m in merges if "".join(m) in vocab]
    vocab.setdefault("nd", len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("n", "d"), ("a", "n"), ("▁a", "nd")]
    teacher = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    teacher.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    teacher.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return CompactTokenizer(teacher, np.arange(teacher.get_vocab_size()))


class Counting:
    """A tokenizer whose decode records how many ids each call decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("make", [byte_level, sentencepiece_with_byte_fallback], ids=["byte-level", "byte-fallback"])
@pytest.mark.parametrize("stop", [[], ["zzz"]], ids=["no-stop", "stop-strings"])
def test_streamed_text_equals_the_decode_of_all_ids_and_decodes_a_bounded_window(make, stop):
    tokenizer = make()
    ids = tokenizer.encode(TEXT).ids
    assert len(ids) > 150 and "\ufffd" not in tokenizer.decode(ids)
    counting = Counting(tokenizer)
    stream, pieces = TextStream(counting, stop), []
    for k, token in enumerate(ids, 1):
        stream.push(token)
        if not tokenizer.decode(ids[:k]).endswith("\ufffd"):      # after every token that ends a character
            assert stream.text == tokenizer.decode(ids[:k])
        pieces.append(stream.take())
    pieces.append(stream.take(final=True))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert max(counting.lengths) <= 12                             # not all the ids again at every token


def test_invalid_bytes_without_end_keep_the_window_bounded():
    tokenizer = sentencepiece_with_byte_fallback()
    lone = tokenizer.teacher.token_to_id("<0x80>")                 # a continuation byte, never a character
    counting = Counting(tokenizer)
    stream = TextStream(counting)
    for _ in range(40):
        stream.push(lone)
    assert stream.take(final=True) == tokenizer.decode([lone] * 40) and max(counting.lengths) <= 12
