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

from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.minhash import _fmix  # the scheme's pre-mix; datasketch==2.0.0 is pinned and equality tested

NUM_PERM = 64  # 128 cost 8.5 of the 100,000-row check's CPU-seconds for the same recall (exact verification after)
SEED = 1
# LSH candidates are looked for below the verification threshold, so that pairs just above it are
# not lost to the banding's S-curve.
LSH_SLACK = 0.15
# Candidates whose MinHash estimate of the Jaccard is this far below the threshold are not verified:
# P(estimate <= 0.35 | Jaccard 0.6, 64 values) = P(Binomial(64, 0.6) <= 22) = 3e-5.
ESTIMATE_MARGIN = 0.25
# Word characters: ASCII letters, digits, '_' and every byte of a multi-byte UTF-8 character.
_KEEP = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") | set(range(128, 256))
_TABLE = bytes(c if c in _KEEP else 32 for c in range(256))


@dataclass
class Words:
    """Every text's words as 32-bit ids (words()), concatenated: text i is ids[offsets[i]:offsets[i+1]]."""

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


def words(texts: list[str]) -> Words:
    """Split every text into words and hash each word to a 32-bit id, in numpy over the texts'
    concatenated bytes (a chunk of about 4 MB at a time). A Python bytes object per word (bytes.split,
    then crc32 of each) cost 5.6 of the 100,000-row check's CPU-seconds for 32 M words; this ~1.5."""
    enc = [t.encode("utf-8", "replace") for t in texts]
    sizes = np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)) + 1  # each text and one space
    ids: list[np.ndarray] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    i = 0
    while i < len(texts):  # texts [i, j): whole texts, about _CHUNK bytes (one longer text alone)
        j = min(len(texts), i + max(1, int(np.searchsorted(np.cumsum(sizes[i: i + _CHUNK]), _CHUNK))))
        # a space before and after: every word has a space on each side, so its start and end are edges
        buf = b" " + b" ".join(enc[i:j]).lower().translate(_TABLE) + b" "
        h, starts = _word_ids(buf)
        text_starts = np.concatenate([[1], 1 + np.cumsum(sizes[i:j])])  # where each text begins in buf
        counts[i:j] = np.diff(np.searchsorted(starts, text_starts))
        ids.append(h)
        i = j
    return Words(np.concatenate(ids) if ids else np.zeros(0, np.uint32), np.concatenate([[0], np.cumsum(counts)]))


_CHUNK = 1 << 22  # bytes of text per numpy pass in words(): 8 x that in uint64 temporaries
_R = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64
_BYTE_KEYS = np.random.default_rng(20261130).integers(0, 2 ** 64, size=256, dtype=np.uint64)
_powers: dict[int, np.ndarray] = {}


def _power_table(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(m-1) mod 2^64 for some m >= n (cached, grown by doubling)."""
    have = _powers.get(base)
    if have is None or len(have) < n:
        p = np.full(max(n, 2 * len(have) if have is not None else _CHUNK + 2), base, dtype=np.uint64)
        p[0] = 1
        have = _powers[base] = np.cumprod(p, out=p)  # wraps mod 2^64, as intended
    return have


def _word_ids(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(32-bit id of each word, its start offset) for the space-separated words of buf (which starts
    and ends with a space). A word's id is a polynomial hash of its bytes' random keys,
    sum_j key[c_j] R^(j - start) mod 2^64, from one prefix sum over the whole buffer, then mixed.
    The same word gets the same id wherever it is; distinct words collide about as often as 32-bit
    crc32 ids did."""
    a = np.frombuffer(buf, dtype=np.uint8)
    in_word = a != 32
    edges = np.flatnonzero(in_word[1:] != in_word[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    pw = _power_table(_R, len(a))
    inv = _power_table(pow(_R, -1, 2 ** 64), len(a))
    v = _BYTE_KEYS.take(a)
    v *= pw[: len(a)]
    cs = np.cumsum(v, out=v)
    h = (cs[ends - 1] - cs[starts - 1]) * inv[starts]  # the word's sum, shifted to start at R^0
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return (h >> np.uint64(32)).astype(np.uint32), starts


def shingle(w: Words, k: int = 3) -> Shingles:
    """Word k-grams of each text, hashed to 32 bits. A text shorter than k words is one k-gram
    of all its words (two identical short texts still match); an empty text is the empty set.

    The k-gram starting at each word of the concatenated ids is hashed at once, a polynomial of its
    (random 32-bit) word ids mod 2^32 with an odd base, so two k-grams collide about as often as two
    random 32-bit values (signatures() mixes the hashes before the permutations); then the positions
    that start no full k-gram (a text's last k - 1 words) are dropped. Per-k-gram index arrays in
    64 bits (np.repeat, gathers) cost 6 of the 100,000-row check's CPU-seconds; this about 1.
    """
    counts, total = w.counts, len(w.ids)
    per_text = np.where(counts >= k, counts - k + 1, np.minimum(counts, 1))  # k-grams per text
    p = np.uint32(1_000_003)
    ids = np.concatenate([w.ids, np.zeros(k, dtype=np.uint32)])
    h = ids[:total].copy()
    for j in range(1, k):  # wraps mod 2^32, as intended
        h *= p
        h += ids[j: total + j]
    full = np.ones(total, dtype=bool)
    for j in range(k - 1):  # a text's last k - 1 words start no full k-gram (a short text's: none)
        full[(w.offsets[1:] - 1 - j)[counts > j]] = False
    short = np.flatnonzero((counts > 0) & (counts < k))
    hs = np.zeros(len(short), dtype=np.uint32)  # a short text's one k-gram: its words, then zeros
    for j in range(k):
        hs = hs * p + np.where(j < counts[short], ids[np.minimum(w.offsets[short] + j, total)], np.uint32(0))
    offsets = np.concatenate([[0], np.cumsum(per_text)])
    if not len(short):
        return Shingles(h[full], offsets)  # the k-grams keep their text order
    out = np.empty(int(offsets[-1]), dtype=np.uint32)
    in_long = np.ones(len(out), dtype=bool)
    in_long[offsets[short]] = False
    out[in_long] = h[full]
    out[offsets[short]] = hs
    # In text order, repeats kept: MinHash ignores repeats, and the exact Jaccard of a candidate pair
    # takes each set's unique values then (sorting all 25 M hashes of 100,000 reviews cost 3 s).
    return Shingles(out, offsets)


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
    # Texts in blocks of about _SIG_BLOCK k-grams, each permutation over a block at a time: the
    # block's temporaries stay in the CPU cache (over all 32 M k-grams at once, every permutation
    # streamed 3 x 128 MB through memory, which a shared machine's other jobs contend for).
    block_of = starts // _SIG_BLOCK
    bounds = np.flatnonzero(np.diff(block_of, prepend=-1, append=block_of[-1] + 1))  # first text of each block
    tmp = np.empty(min(len(mixed), 2 * _SIG_BLOCK + int(sizes.max())), dtype=np.uint32)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        begin, end = starts[lo], (starts[hi] if hi < len(starts) else sh.offsets[-1])
        m, t = mixed[begin:end], tmp[: end - begin]
        local = starts[lo:hi] - begin
        for p in range(num_perm):  # (block k-grams,) -> (block texts,)
            np.multiply(m, a[p], out=t)
            t += b[p]
            out[nonempty[lo:hi], p] = np.minimum.reduceat(t, local)
    return out


_SIG_BLOCK = 1 << 18  # k-grams (1 MB of uint32)


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
        two = run_starts[run_lens == 2]  # most shared buckets hold two texts: their pairs at once
        found.append(np.sort(np.stack([order[two], order[two + 1]], axis=1), axis=1))
        for start, size in zip(run_starts[run_lens > 2], run_lens[run_lens > 2]):  # few: most buckets hold one text
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
    # equal signatures (identical sets, or as near as 64 values can tell): the first such text leads
    lead_of = np.arange(n)
    nonempty = np.flatnonzero(sizes)
    if len(nonempty):
        rowbytes = np.ascontiguousarray(sig[nonempty]).view(np.dtype((np.void, sig.shape[1] * sig.itemsize))).ravel()
        _, first, inverse = np.unique(rowbytes, return_index=True, return_inverse=True)  # first: earliest row
        lead_of[nonempty] = nonempty[first[inverse.ravel()]]
    leads = np.flatnonzero((lead_of == np.arange(n)) & (sizes > 0))
    sets: dict[int, set[int]] = {}  # a candidate's k-gram set, made once (np.unique + intersect1d per pair: 3x slower)

    def jac(i: int, j: int) -> float:
        a = sets[i] if i in sets else sets.setdefault(i, set(sh.of(i).tolist()))
        b = sets[j] if j in sets else sets.setdefault(j, set(sh.of(j).tolist()))
        inter = len(a & b)
        return inter / (len(a) + len(b) - inter) if a and b else 0.0  # an empty set matches nothing

    pairs: dict[tuple[int, int], float] = {}
    if len(leads) > 1:
        bands, rows = lsh_params(threshold, num_perm)
        cand = candidates(sig[leads], bands, rows)
        # Half the LSH's candidates share under a third of their MinHash values; the exact Jaccard
        # (a Python set per text) is kept for pairs whose estimate is within ESTIMATE_MARGIN of the
        # threshold: with 64 values, a pair at the threshold falls that far below in 3e-5 of cases.
        agree = (sig[leads[cand[:, 0]]] == sig[leads[cand[:, 1]]]).mean(axis=1)
        for a, b in cand[agree >= threshold - ESTIMATE_MARGIN].tolist():
            i, j = int(leads[a]), int(leads[b])
            if (jc := jac(i, j)) >= threshold:
                pairs[(i, j)] = jc
    members: dict[int, list[int]] = {}  # lead -> its group, for groups of 2+ (a text alone is its own group)
    copies = np.flatnonzero((lead_of != np.arange(n)) & (sizes > 0))
    for i in copies.tolist():  # ascending, so each group lists its lead first
        members.setdefault(int(lead_of[i]), [int(lead_of[i])]).append(i)
    for lead, group in members.items():  # identical sets: each pairs with its lead (a star, not n^2 pairs)
        for b in group[1:]:
            if (jc := jac(lead, b)) >= threshold:
                pairs[(lead, b)] = jc
    for (i, j), sim in list(pairs.items()):  # a near pair of leads stands for their copies too
        if lead_of[j] == j:
            for b in members.get(j, [j])[1:]:
                pairs.setdefault((i, b), sim)
            for a in members.get(i, [i])[1:]:
                pairs.setdefault((min(a, j), max(a, j)), sim)
    out = [(i, j, sim) for (i, j), sim in pairs.items() if split is None or (i < split) != (j < split)]
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
