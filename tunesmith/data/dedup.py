"""Exact and near-duplicate texts, within one set or between two (leakage), by MinHash + LSH.

A text becomes the set of its word k-grams (ASCII lower-cased, punctuation dropped: a copy that
only changes case, spacing or punctuation is identical here). Near-duplicates are pairs whose
sets' Jaccard similarity reaches a threshold. datasketch supplies the MinHash scheme (its
"affine32" permutations and pre-mix; tests check our signatures equal `MinHash.update_batch`'s)
and the LSH banding (MinHashLSH's (bands, rows) optimised for the threshold; tests check our
candidates equal `MinHashLSH.query`'s). Every candidate is then checked with the exact Jaccard of
the two sets, so the LSH only costs recall near the threshold, never precision.

Why not datasketch's objects row by row: at 25,000 IMDB reviews, per-text `update_batch` and
MinHashLSH insert/query took about 30 s; the same arithmetic over all texts at once in numpy takes
a few seconds (bench/data_check.py times 100,000 rows).
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.minhash import _fmix  # the scheme's pre-mix; datasketch==2.0.0 is pinned and equality tested

NUM_PERM = 64  # 128 cost 8.5 of the 100,000-row check's CPU-seconds for the same recall (exact verification after)
SEED = 1
# LSH candidates are looked for below the verification threshold, so that pairs just above it are
# not lost to the banding's S-curve.
LSH_SLACK = 0.15
# Word characters: ASCII letters, digits, '_' and every byte of a multi-byte UTF-8 character.
_KEEP = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") | set(range(128, 256))
_TABLE = bytes(c if c in _KEEP else 32 for c in range(256))


@dataclass
class Words:
    """Every text's words as crc32 ids, concatenated: text i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # (total words,) uint32
    offsets: np.ndarray  # (n + 1,) int64

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Shingles:
    """Each text's k-gram hashes (in text order, repeats kept), concatenated: text i is
    hashes[offsets[i]:offsets[i+1]]."""

    hashes: np.ndarray  # uint32
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def of(self, i: int) -> np.ndarray:
        return self.hashes[self.offsets[i]: self.offsets[i + 1]]

    def set_of(self, i: int) -> np.ndarray:
        """Text i's k-grams as a sorted set."""
        return np.unique(self.of(i))


def words(texts: list[str]) -> Words:
    """Split every text into words (bytes translate + split: about 4x faster than a \\w+ regex)."""
    split = [t.encode("utf-8", "replace").lower().translate(_TABLE).split() for t in texts]
    counts = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
    flat = itertools.chain.from_iterable(split)
    ids = np.fromiter(map(zlib.crc32, flat), dtype=np.uint32, count=int(counts.sum()))
    return Words(ids, np.concatenate([[0], np.cumsum(counts)]))


def shingle(w: Words, k: int = 3) -> Shingles:
    """Word k-grams of each text, hashed to 32 bits. A text shorter than k words is one k-gram
    of all its words (two identical short texts still match); an empty text is the empty set."""
    n = len(w.offsets) - 1
    starts, counts = w.offsets[:-1], w.counts
    per_text = np.where(counts >= k, counts - k + 1, np.minimum(counts, 1))  # k-grams per text
    text_of = np.repeat(np.arange(n), per_text)  # (total k-grams,)
    first = np.arange(len(text_of)) - np.repeat(np.cumsum(per_text) - per_text, per_text) + starts[text_of]
    width = np.minimum(counts, k)[text_of]  # k, or the whole short text
    ids = np.concatenate([w.ids, np.zeros(k, dtype=np.uint32)]).astype(np.uint64)
    h = np.zeros(len(text_of), dtype=np.uint64)
    for j in range(k):  # polynomial hash of the k-gram's word ids (wrapping mod 2^64)
        h = h * np.uint64(1_000_003) + np.where(j < width, ids[first + j], np.uint64(0))
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's mixer; keep the top 32 bits
    h32 = (h >> np.uint64(32)).astype(np.uint32)
    # In text order, repeats kept: MinHash ignores repeats, and the exact Jaccard of a candidate pair
    # takes each set's unique values then (sorting all 25 M hashes of 100,000 reviews cost 3 s).
    return Shingles(h32, np.concatenate([[0], np.cumsum(per_text)]))


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2.4's np.unique took 55 s on 6 M uint64 here, a sort 0.5 s."""
    x = np.sort(x)
    keep = np.ones(len(x), dtype=bool)
    keep[1:] = x[1:] != x[:-1]
    return x[keep]


def signatures(sh: Shingles, num_perm: int = NUM_PERM, seed: int = SEED) -> np.ndarray:
    """MinHash signatures (n, num_perm) uint32, equal to datasketch's MinHash(num_perm, seed,
    hashfunc=identity).update_batch(set) of each set; an empty set keeps the initial max values."""
    a, b = MinHash(num_perm=num_perm, seed=seed).permutations  # (num_perm,) uint32 each
    out = np.full((len(sh), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    sizes = np.diff(sh.offsets)
    nonempty = np.flatnonzero(sizes)
    if not len(nonempty):
        return out
    mixed = _fmix(sh.hashes, 32)
    starts = sh.offsets[nonempty]
    for p in range(num_perm):  # one permutation over all texts at a time: (total,) -> (n nonempty,)
        out[nonempty, p] = np.minimum.reduceat(mixed * a[p] + b[p], starts)
    return out


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH picks for the candidate threshold."""
    lsh = MinHashLSH(threshold=max(0.05, threshold - LSH_SLACK), num_perm=num_perm)
    return lsh.b, lsh.r


def candidates(sig: np.ndarray, bands: int, rows: int, max_bucket: int = 64) -> np.ndarray:
    """Pairs (i < j) that share a whole band of their signatures: what MinHashLSH.query finds.

    Returns (m, 2) int64, unique. A bucket larger than max_bucket (many texts sharing a band) pairs
    each member with its first `max_bucket` members only, so a pathological file stays O(n).
    """
    found = []
    for band in range(bands):
        block = sig[:, band * rows: (band + 1) * rows]
        order = np.lexsort(block.T[::-1])  # rows with equal band values end up next to each other
        same = np.all(block[order[1:]] == block[order[:-1]], axis=1)
        run_starts = np.flatnonzero(np.concatenate([[True], ~same]))  # each bucket, in sorted order
        run_lens = np.diff(np.concatenate([run_starts, [len(order)]]))
        for start, size in zip(run_starts[run_lens > 1], run_lens[run_lens > 1]):  # few: most buckets hold one text
            group = order[start: start + size]
            lead = group[:max_bucket]
            i, j = np.meshgrid(lead, group, indexing="ij")
            keep = i < j
            found.append(np.stack([i[keep], j[keep]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    n = np.int64(len(sig))
    code = _sorted_unique(np.concatenate(found).astype(np.int64) @ np.array([n, 1]))
    return np.stack([code // n, code % n], axis=1)


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique arrays (an empty set matches nothing: 0)."""
    if len(x) == 0 or len(y) == 0:
        return 0.0
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


def near_pairs(sh: Shingles, threshold: float, split: int | None = None,
               num_perm: int = NUM_PERM) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard), i < j, with exact Jaccard >= threshold. Texts with the same set
    (identical once normalised) are found whatever the LSH does; each is paired with the first of
    them (and with that one's near matches) rather than with every other copy, so the pairs stay
    O(n) and `clusters` of them are the groups.

    split: texts [0, split) are one set and [split, n) another; only pairs across them are kept
    (leakage between a training file and a held-out one).
    """
    n = len(sh)
    sizes = np.diff(sh.offsets)
    sig = signatures(sh, num_perm)
    same: dict[bytes, int] = {}  # equal signatures (identical sets, or as near as 64 values can tell): one lead
    lead_of = np.arange(n)
    for i in np.flatnonzero(sizes):
        lead_of[i] = same.setdefault(sig[i].tobytes(), i)
    leads = np.flatnonzero((lead_of == np.arange(n)) & (sizes > 0))
    pairs: dict[tuple[int, int], float] = {}
    if len(leads) > 1:
        bands, rows = lsh_params(threshold, num_perm)
        for a, b in candidates(sig[leads], bands, rows):
            i, j = int(leads[a]), int(leads[b])
            jac = jaccard(sh.set_of(i), sh.set_of(j))
            if jac >= threshold:
                pairs[(i, j)] = jac
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(sizes):
        members.setdefault(int(lead_of[i]), []).append(int(i))
    for lead, group in members.items():  # identical sets: each pairs with its lead (a star, not n^2 pairs)
        for b in group[1:]:
            if (jac := jaccard(sh.set_of(lead), sh.set_of(b))) >= threshold:
                pairs[(lead, b)] = jac
    for (i, j), jac in list(pairs.items()):  # a near pair of leads stands for their copies too
        if j in members and i in members and lead_of[j] == j:
            for b in members[j][1:]:
                pairs.setdefault((i, b), jac)
            for a in members[i][1:]:
                pairs.setdefault((min(a, j), max(a, j)), jac)
    out = [(i, j, jac) for (i, j), jac in pairs.items() if split is None or (i < split) != (j < split)]
    return sorted(out)


def clusters(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (2+ members, each sorted) of the pair graph over 0..n-1 (union-find).
    A chain a~b~c is one cluster even when a and c are not themselves alike."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]
