"""Quality filters of synthetic samples: empty, too short or looping texts, and exact or near
duplicates (MinHash of word 5-grams); and the statistics of a dataset's texts."""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def quality_problem(text: str, min_words: int) -> str | None:
    """Why a sample is unusable ("empty", "too_short", "repetitive"), or None."""
    w = words(text)
    if not w:
        return "empty"
    if len(w) < min_words:
        return "too_short"
    trigrams = list(zip(w, w[1:], w[2:]))
    if len(trigrams) >= 12 and len(set(trigrams)) < 0.5 * len(trigrams):
        return "repetitive"        # a loop: most word trigrams occur more than once
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 4 and Counter(lines).most_common(1)[0][1] > len(lines) / 2:
        return "repetitive"
    return None


class NearDuplicates:
    """Exact and near-duplicate detection: MinHash signatures of word 5-gram shingles with
    locality-sensitive banding to find candidates, then the exact Jaccard similarity of the
    shingle sets against `threshold`."""

    def __init__(self, threshold: float, num_hashes: int = 64, bands: int = 16):
        self.threshold, self.bands, self.rows = threshold, bands, num_hashes // bands
        rng = np.random.default_rng(12345)
        self.prime = (1 << 61) - 1
        self.a = rng.integers(1, self.prime, num_hashes, dtype=np.uint64).astype(object)
        self.b = rng.integers(0, self.prime, num_hashes, dtype=np.uint64).astype(object)
        self.exact: set[str] = set()
        self.buckets: dict[tuple, list[int]] = {}
        self.shingles: list[frozenset] = []

    @staticmethod
    def _shingles(text: str) -> frozenset:
        w = words(text)
        n = 5 if len(w) >= 5 else max(1, len(w))
        return frozenset(hashlib.blake2b(" ".join(w[i:i + n]).encode(), digest_size=8).digest()
                         for i in range(max(1, len(w) - n + 1)))

    def _signature(self, shingles: frozenset) -> list[int]:
        values = [int.from_bytes(s, "little") for s in shingles]
        return [min((a * v + b) % self.prime for v in values) for a, b in zip(self.a, self.b)]

    def check_and_add(self, text: str) -> str | None:
        """"duplicate" / "near_duplicate" when an earlier sample matches, else remember it, None."""
        key = hashlib.sha256(" ".join(words(text)).encode()).hexdigest()
        if key in self.exact:
            return "duplicate"
        shingles = self._shingles(text)
        signature = self._signature(shingles)
        bands = [(b, tuple(signature[b * self.rows:(b + 1) * self.rows])) for b in range(self.bands)]
        candidates = {i for band in bands for i in self.buckets.get(band, [])}
        for i in candidates:
            other = self.shingles[i]
            if len(shingles & other) / len(shingles | other) >= self.threshold:
                return "near_duplicate"
        self.exact.add(key)
        index = len(self.shingles)
        self.shingles.append(shingles)
        for band in bands:
            self.buckets.setdefault(band, []).append(index)
        return None


def text_statistics(texts: list[str]) -> dict:
    """Words and distinct-n (distinct n-grams / all n-grams, n = 1, 2, 3) over all samples."""
    all_words = [words(t) for t in texts]
    stats = {"words": sum(len(w) for w in all_words)}
    for n in (1, 2, 3):
        grams = [tuple(w[i:i + n]) for w in all_words for i in range(len(w) - n + 1)]
        stats[f"distinct_{n}"] = round(len(set(grams)) / max(1, len(grams)), 4)
    return stats
