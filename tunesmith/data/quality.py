"""Row-level text checks for `data check`: empty or junk text, length outliers, class balance, size.

Pure functions over texts, word counts and label ids; tunesmith/tasks/check.py turns what they
return into findings that name each row's file and line. Thresholds are module constants so the
report can quote them and the tests can compute the expected answers by hand.
"""
from __future__ import annotations

import re

import numpy as np

from tunesmith.data.dedup import Words

MIN_ROWS_ERROR = 10  # fewer training rows than this: an error (nothing worth training on)
MIN_ROWS_WARNING = 50  # fewer than this: a warning (OpenAI's guide: gains show from 50-100 examples)
MIN_PER_CLASS = 10  # a class with fewer training rows than this: a warning
IMBALANCE_RATIO = 5.0  # largest class / smallest class at or above this: a warning
OUTLIER_K = 3.0  # Tukey's "far out" fences on log(1 + words): Q1 - k IQR, Q3 + k IQR
MIN_ROWS_FOR_OUTLIERS = 20
MARKUP_SHARE = 0.1  # share of a text's characters inside tags / entities that makes it markup
REPEAT_SHARE = 0.5  # one word making up this share of a text of >= REPEAT_MIN_WORDS words
REPEAT_MIN_WORDS = 10

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls but tab, newline, CR
_TAG = re.compile(r"<[A-Za-z/!][^<>]{0,500}>|&(?:#\d{1,7}|#x[0-9A-Fa-f]{1,6}|[A-Za-z]{2,8});")
_BR = re.compile(r"<br\s*/?>", re.I)  # scraped text's line breaks (about half of IMDB's reviews): a note, not junk
_DOCUMENT_TAG = re.compile(r"<\s*/?\s*(?:html|head|body|script|style|div|table|iframe)\b", re.I)
# UTF-8 bytes read as cp1252/latin-1: a lead byte (Ã, Â, â, ...) then continuation-byte characters,
# e.g. "Ã©" for "é", "â€™" for "’". Each match is confirmed by decoding it back (_is_mojibake).
_CP1252 = "€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"
_MOJIBAKE = re.compile(f"[\u00c2-\u00f4][\u0080-\u00bf{_CP1252}]{{1,3}}")
_LETTER = re.compile(r"[^\W\d_]")
_WORD = re.compile(r"\w+")

NOTE_REASONS = {"html_line_breaks"}  # reported as notes; the other reasons are warnings
JUNK_REASONS = {
    "empty": "empty or only whitespace",
    "no_letters": "no letters at all (only digits, punctuation or symbols)",
    "markup": f"markup: HTML/XML tags or entities (a document tag, or >= {MARKUP_SHARE:.0%} of the characters)",
    "html_line_breaks": "HTML line breaks (<br />) in the text: replace them with newlines if the model should not learn them",
    "mojibake": "broken encoding (mojibake: UTF-8 read as cp1252/latin-1, e.g. 'Ã©' for 'é')",
    "replacement_char": "broken encoding (U+FFFD replacement characters: bytes that did not decode)",
    "control_chars": "control characters (other than tab and newline)",
    "repetitive": f"one word repeated (>= {REPEAT_SHARE:.0%} of >= {REPEAT_MIN_WORDS} words)",  # see repetitive()
}


def _is_mojibake(s: str) -> bool:
    for codec in ("cp1252", "latin-1"):
        try:
            return s.encode(codec).decode("utf-8") != s
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
    return False


def junk_reasons(text: str, screen: frozenset[str] | None = None) -> list[str]:
    """Why a text looks like junk (keys of JUNK_REASONS), empty when it looks fine.

    screen: only these groups of checks (keys of _SCREENS; None: all), for a text whose bytes
        rule the others out (junk()'s screen, _screened)."""
    def on(group: str) -> bool:
        return screen is None or group in screen

    if on("letters") and not text.strip():
        return ["empty"]
    reasons = []
    if on("letters") and not _LETTER.search(text):
        reasons.append("no_letters")
    if on("markup") and ("<" in text or "&" in text):
        rest = _BR.sub("", text)
        tagged = sum(len(m) for m in _TAG.findall(rest))
        if _DOCUMENT_TAG.search(rest) or tagged >= MARKUP_SHARE * len(text):
            reasons.append("markup")
        elif len(rest) < len(text):
            reasons.append("html_line_breaks")
    if on("mojibake") and any(_is_mojibake(m) for m in _MOJIBAKE.findall(text)):
        reasons.append("mojibake")
    if on("replacement") and "\ufffd" in text:
        reasons.append("replacement_char")
    if on("control") and _CONTROL.search(text):
        reasons.append("control_chars")
    return reasons


def repetitive(w: Words) -> list[int]:
    """Texts of >= REPEAT_MIN_WORDS words where one word makes up >= REPEAT_SHARE of them
    ("good good good good ..."), over all texts at once.

    A cheap screen first: word ids hashed into _BUCKETS buckets per text and counted (one bincount);
    a word's share is at most its bucket's, so only texts with a bucket at the share are counted
    exactly (sorting every (text, word) pair of 100,000 reviews cost 3-4 CPU-seconds)."""
    n = len(w.offsets) - 1
    counts = w.counts
    if not len(w.ids):
        return []
    text_of = np.repeat(np.arange(n, dtype=np.int64), counts)
    bucket = np.bincount(text_of * _BUCKETS + (w.ids % _BUCKETS), minlength=n * _BUCKETS).reshape(n, _BUCKETS)
    maybe = np.flatnonzero((counts >= REPEAT_MIN_WORDS) & (bucket.max(axis=1) >= REPEAT_SHARE * counts))
    out = []
    for i in maybe.tolist():  # few: a bucket holding half a text's words
        _, reps = np.unique(w.ids[w.offsets[i]: w.offsets[i + 1]], return_counts=True)
        if reps.max() >= REPEAT_SHARE * counts[i]:
            out.append(i)
    return out


_BUCKETS = 64  # per text; the commonest English word ("the") is about 5% of a review's words


def junk(texts: list[str], w: Words) -> dict[str, list[int]]:
    """Indexes of junk texts by reason (only reasons that occur); `w` is dedup.words(texts)."""
    out: dict[str, list[int]] = {}
    for i, groups in _screened(texts):
        for r in junk_reasons(texts[i], groups):
            out.setdefault(r, []).append(i)
    if rep := repetitive(w):
        out["repetitive"] = rep
    return out


def _screened(texts: list[str]) -> list[tuple[int, frozenset[str]]]:
    """(index, groups of checks that could fire) of each text, ascending, for the texts where any could.

    A screen over all texts' UTF-8 bytes at once in numpy, looser than each check (it only has to
    miss nothing); the regexes then run on those rows and groups only. Run on every row they cost
    2-4 of the 100,000-row check's CPU-seconds. No letter (empty included) is a search per text.
    """
    enc = [t.encode("utf-8", "surrogatepass") for t in texts]
    ends = np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)) + 1)  # each text and b"\n"
    buf = b"\n".join(enc) + b"\n\n\n"  # two spare bytes: a[p + 2] exists
    a = np.frombuffer(buf, dtype=np.uint8)
    # bytes.translate to 0/1 is one C pass (a numpy table lookup makes an 8-byte index per byte first)
    p = np.flatnonzero(np.frombuffer(buf.translate(_LEADS), dtype=np.uint8)[:-2])
    c, b1, b2 = a[p], a[p + 1], a[p + 2]
    hits = {
        "markup": (c == ord("<")) | (c == ord("&")),
        # C0 controls, DEL; C1 controls are U+0080-U+009F: C2 80-9F
        "control": _C0.take(c) | ((c == 0xC2) & (b1 >= 0x80) & (b1 <= 0x9F)),
        # a lead U+00C2-U+00F4 (C3 82-B4) followed by a non-ASCII character (U+0080-00BF, cp1252's)
        "mojibake": (c == 0xC3) & (b1 >= 0x82) & (b1 <= 0xB4) & (b2 >= 0xC2),
        "replacement": c == 0xEF,  # U+FFFD is EF BF BD
    }
    hits = {group: p[hit] for group, hit in hits.items()}
    groups: dict[int, set[str]] = {}
    for group, hit in hits.items():
        for i in np.unique(np.searchsorted(ends, hit, side="right")).tolist():
            groups.setdefault(i, set()).add(group)
    for i, t in enumerate(texts):
        if not _LETTER.search(t):
            groups.setdefault(i, set()).add("letters")
    return [(i, frozenset(groups[i])) for i in sorted(groups)]


_C0 = np.zeros(256, dtype=bool)
_C0[[*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]] = True  # _CONTROL's C0 part and DEL
_LEADS = bytes(int(_C0[b] or b in b"<&\xc2\xc3\xef") for b in range(256))  # bytes where a screened check can start


def length_outliers(words: np.ndarray) -> tuple[list[int], list[int], tuple[float, float]]:
    """(too short, too long, (low, high) word-count fences): Tukey's far-out fences on log(1 + words).

    Lengths spread over orders of magnitude, so the fences are set on the log scale; with fewer than
    MIN_ROWS_FOR_OUTLIERS texts there are no fences (nothing is an outlier).
    """
    if len(words) < MIN_ROWS_FOR_OUTLIERS:
        return [], [], (0.0, float("inf"))
    logs = np.log1p(words.astype(float))
    q1, q3 = np.percentile(logs, [25, 75])
    lo, hi = q1 - OUTLIER_K * (q3 - q1), q3 + OUTLIER_K * (q3 - q1)
    fences = (float(np.expm1(lo)), float(np.expm1(hi)))
    return np.flatnonzero(logs < lo).tolist(), np.flatnonzero(logs > hi).tolist(), fences


def balance(counts: dict[str, int]) -> dict[str, float | str]:
    """Largest / smallest class (among classes present) and which they are."""
    present = {k: v for k, v in counts.items() if v > 0}
    if len(present) < 2:
        return {}
    big, small = max(present, key=present.get), min(present, key=present.get)
    return {"largest": big, "smallest": small, "ratio": round(present[big] / present[small], 2)}
