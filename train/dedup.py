"""Document-level deduplication (exact and near-duplicate) and a simple quality filter.

Exact duplicates: documents whose normalized text (lowercased, digits -> 0, whitespace
collapsed) hashes the same; the first one seen is kept.

Near duplicates: MinHash over word 5-gram shingles (``NUM_PERM`` permutations, computed with
numpy) and locality-sensitive hashing in ``BANDS`` bands of ``ROWS`` rows; a document is a
near duplicate when a band collides with a kept document and their estimated Jaccard
similarity is at least ``threshold`` (default 0.8). With 8 bands x 4 rows, pairs at Jaccard
0.8 collide with probability 1 - (1 - 0.8^4)^8 = 0.98, pairs at 0.5 with 0.4 (then rejected
by the estimate). Typical hits: the same page shipped by two packages or versions, generated
API pages that differ in one name.

Quality: :func:`quality_problem` names why a document is dropped ("" when it is kept):
too short, too few letters (tables of numbers, hex dumps), too few distinct lines
(boilerplate), or mostly very long "words" (base64, minified or generated data).
"""
from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

NUM_PERM = 32
BANDS, ROWS = 8, 4
SHINGLE = 5
THRESHOLD = 0.8
_MASK61 = (1 << 61) - 1
_WORD = re.compile(r"\w+")

MIN_CHARS = 200
MIN_ALPHA = 0.45  # letters / non-space characters
MIN_DISTINCT_LINES = 0.3  # distinct non-empty lines / non-empty lines
MAX_LONG_WORDS = 0.25  # share of characters in whitespace-free runs of 80+ characters (API names stay below)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\d", "0", text.lower())).strip()


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


def _params(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**31 - 1, size=n, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**31 - 1, size=n, dtype=np.uint64)
    return a, b


_A, _B = _params(NUM_PERM)


def minhash(text: str, num_perm: int = NUM_PERM) -> np.ndarray:
    """MinHash signature [num_perm] uint64 of text's word SHINGLE-grams (the whole text if shorter)."""
    words = _WORD.findall(normalize(text))
    grams = [" ".join(words[i:i + SHINGLE]) for i in range(max(len(words) - SHINGLE + 1, 1))]
    # 32-bit shingle hashes (CRC-32: deterministic and fast), so that a * h + b stays below 2^64
    h = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
    a, b = (_A, _B) if num_perm == NUM_PERM else _params(num_perm)
    return ((h[None, :] * a[:, None] + b[:, None]) & np.uint64(_MASK61)).min(axis=1)


class Deduper:
    """Streaming dedup: ``check(text)`` returns "" for a new document (and remembers it),
    "exact" or "near" for a duplicate of one seen before."""

    def __init__(self, threshold: float = THRESHOLD, bands: int = BANDS, rows: int = ROWS):
        self.threshold, self.bands, self.rows = threshold, bands, rows
        self.exact: set[bytes] = set()
        self.buckets: list[dict[bytes, int]] = [{} for _ in range(bands)]
        self.sigs: list[np.ndarray] = []
        self.counts = {"kept": 0, "exact": 0, "near": 0}

    def check(self, text: str) -> str:
        key = exact_key(text)
        if key in self.exact:
            self.counts["exact"] += 1
            return "exact"
        sig = minhash(text, self.bands * self.rows)
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        for band, k in enumerate(keys):
            j = self.buckets[band].get(k)
            if j is not None and float(np.mean(self.sigs[j] == sig)) >= self.threshold:
                self.counts["near"] += 1
                return "near"
        self.exact.add(key)
        idx = len(self.sigs)
        self.sigs.append(sig)
        for band, k in enumerate(keys):
            self.buckets[band].setdefault(k, idx)
        self.counts["kept"] += 1
        return ""


def quality_problem(text: str, min_chars: int = MIN_CHARS) -> str:
    """Why text fails the quality filter ("too short", "few letters", "repetitive",
    "long words"), or "" when it passes."""
    if len(text) < min_chars:
        return "too short"
    compact = re.sub(r"\s", "", text)
    if sum(c.isalpha() for c in compact) < MIN_ALPHA * len(compact):
        return "few letters"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 10 and len(set(lines)) < MIN_DISTINCT_LINES * len(lines):
        return "repetitive"
    if sum(len(w) for w in text.split() if len(w) >= 80) > MAX_LONG_WORDS * len(compact):
        return "long words"
    return ""
