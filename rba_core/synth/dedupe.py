"""Exact and near-duplicate detection for generated texts.

Near duplicates are found with MinHash over word n-gram shingles and banded locality-sensitive
hashing: texts that share a band become candidates, and a candidate is a duplicate only when
the exact Jaccard similarity of the shingle sets reaches the threshold, so LSH can miss a pair
(rarely, near the threshold) but never reports a false one. Memory and time grow linearly with
the number of texts, which keeps tens of thousands of instructions cheap.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from rba_core.errors import ConfigError
from rba_core.synth.text import words_of

_PRIME = (1 << 31) - 1


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    """Word n-grams of ``text`` (lower-cased, punctuation dropped); a text shorter than ``n``
    words is one shingle of all its words."""
    words = words_of(text)
    if len(words) <= n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _stable_hash(shingle: tuple[str, ...]) -> int:
    digest = hashlib.blake2b(" ".join(shingle).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _PRIME


@dataclass
class DedupeConfig:
    """``threshold``: Jaccard similarity at which two texts count as near duplicates;
    ``ngram``: shingle size in words; ``bands * rows`` MinHash permutations."""

    threshold: float = 0.7
    ngram: int = 3
    bands: int = 16
    rows: int = 4

    def validate(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"dedupe threshold must be in (0, 1], got {self.threshold!r}")
        for name in ("ngram", "bands", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dedupe {name} must be an integer >= 1, got {value!r}")


class NearDuplicateIndex:
    """Texts seen so far; ``check(text)`` says whether a new one repeats one of them.

        index = NearDuplicateIndex()
        index.check_and_add("What is the capital of France?")   # None: new
        index.check_and_add("what is the capital of france")    # "exact_duplicate"
    """

    def __init__(self, config: DedupeConfig | None = None) -> None:
        self.config = config or DedupeConfig()
        self.config.validate()
        permutations = self.config.bands * self.config.rows
        # Fixed permutation parameters: an index rebuilt on resume behaves the same.
        rng = np.random.default_rng(0x5EED)
        self._a = rng.integers(1, _PRIME, size=permutations, dtype=np.int64)
        self._b = rng.integers(0, _PRIME, size=permutations, dtype=np.int64)
        self._exact: set[str] = set()
        self._shingles: list[frozenset] = []
        self._buckets: dict[tuple[int, bytes], list[int]] = {}

    def __len__(self) -> int:
        return len(self._shingles)

    @staticmethod
    def exact_key(text: str) -> str:
        return " ".join(words_of(text))

    def signature(self, shingle_set: frozenset) -> np.ndarray:
        """MinHash signature ``[bands * rows]`` of a shingle set."""
        values = np.fromiter((_stable_hash(s) for s in shingle_set), dtype=np.int64,
                             count=len(shingle_set))
        if values.size == 0:
            return np.full(self._a.shape, _PRIME, dtype=np.int64)
        # a * x < 2**62 for a, x < 2**31: no int64 overflow.
        return ((self._a[:, None] * values[None, :] + self._b[:, None]) % _PRIME).min(axis=1)

    def _band_keys(self, signature: np.ndarray) -> list[tuple[int, bytes]]:
        rows = self.config.rows
        return [(band, signature[band * rows:(band + 1) * rows].tobytes())
                for band in range(self.config.bands)]

    def check(self, text: str) -> str | None:
        """"exact_duplicate", "near_duplicate" or None, without adding ``text``."""
        return self._check(text)[0]

    def _check(self, text: str) -> tuple[str | None, frozenset, list[tuple[int, bytes]]]:
        shingle_set = shingles(text, self.config.ngram)
        keys = self._band_keys(self.signature(shingle_set))
        if self.exact_key(text) in self._exact:
            return "exact_duplicate", shingle_set, keys
        candidates = {i for key in keys for i in self._buckets.get(key, ())}
        for i in sorted(candidates):
            if jaccard(shingle_set, self._shingles[i]) >= self.config.threshold:
                return "near_duplicate", shingle_set, keys
        return None, shingle_set, keys

    def add(self, text: str) -> None:
        """Record ``text`` (whether or not it duplicates an earlier one)."""
        _, shingle_set, keys = self._check(text)
        self._insert(text, shingle_set, keys)

    def _insert(self, text: str, shingle_set: frozenset, keys: list[tuple[int, bytes]]) -> None:
        index = len(self._shingles)
        self._shingles.append(shingle_set)
        self._exact.add(self.exact_key(text))
        for key in keys:
            self._buckets.setdefault(key, []).append(index)

    def check_and_add(self, text: str) -> str | None:
        """The duplicate reason, or None after adding ``text`` to the index."""
        reason, shingle_set, keys = self._check(text)
        if reason is None:
            self._insert(text, shingle_set, keys)
        return reason
