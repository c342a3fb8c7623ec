"""`tunesmith data check` on IMDB with injected faults: near-duplicate recall and false positives,
label-flip precision, and the time to check 100,000 rows (issue 23).

    python bench/data_check.py                 # 100,000 rows, the whole `data check` timed
    python bench/data_check.py --rows 30000    # smaller, same recipe

The data (written to bench/results/data_check/train.csv, rebuilt each run from a fixed seed):
  - the 25,000 IMDB reviews that ship offline (builtin:imdb);
  - composite reviews up to rows - copies: each is a random half of the sentences of each of 3
    reviews (of 4+ sentences) of the same label, shuffled. IMDB ships 25,000 reviews, not 100,000; a composite shares
    about a quarter of its word 3-grams with any one source, so composites are new texts, not
    near-copies of each other or of IMDB (the false-positive count below would show it otherwise);
  - `copies` (2% of rows) edited copies of random rows, a quarter at each edit level:
    light (2% of words replaced, case and punctuation changed), medium (5% replaced), heavy (8% of
    words replaced, deleted or inserted), structural (a sentence dropped or added, plus 2% replaced);
  - label flips: 5% of the rows that are not copies get the other label.
Ground truth is the injected (copy, source) pairs and the flipped rows. Measured from the report's
own findings (file + line), as a user reads them:
  - near-duplicate recall: copies named as a duplicate (exact or near) of their source or of another
    copy of it;
  - false-positive rate: rows outside any injected pair that are named as a duplicate, over all such
    rows. IMDB's own repeated reviews count here; the rows are split into IMDB originals (IMDB's
    duplicates: the detector is right about them) and composites (constructed to be distinct);
  - label-flip precision: flagged rows that were flipped, over flagged rows (and recall).
Time: the wall clock of `check_data` on the file, with each stage's share (the CPU is shared with
other jobs: the load average is printed).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunesmith import assets  # noqa: E402
from tunesmith.data.readers import read_records  # noqa: E402

OUT = ROOT / "bench" / "results" / "data_check"
SENTENCE = re.compile(r"(?<=[.!?])\s+|<br\s*/?>\s*(?:<br\s*/?>)?")
LEVELS = ("light", "medium", "heavy", "structural")


def imdb() -> list[tuple[str, str]]:
    src = assets.data_source("builtin:imdb")
    recs = read_records(Path(src["path"]))
    return [(r.fields["text"], r.fields["label"]) for r in recs if r.fields.get("source") == "imdb"]


def composite(pool: list[str], rng: random.Random) -> str:
    """Half the sentences of each of 3 reviews of 4+ sentences (a review of one long sentence would
    otherwise come whole, and the composite would be a near-copy of it)."""
    parts = []
    sources: list[list[str]] = []
    while len(sources) < 3:
        sents = [s for s in SENTENCE.split(rng.choice(pool)) if s.strip()]
        if len(sents) >= 4:
            sources.append(sents)
    for sents in sources:
        parts += rng.sample(sents, len(sents) // 2)
    rng.shuffle(parts)
    return " ".join(parts)


def edit(text: str, level: str, vocab: list[str], rng: random.Random) -> str:
    words = text.split()
    rate = {"light": 0.02, "medium": 0.05, "heavy": 0.08, "structural": 0.02}[level]
    for _ in range(max(1, round(rate * len(words)))):
        i = rng.randrange(len(words))
        op = rng.choice(["replace", "delete", "insert"]) if level == "heavy" else "replace"
        if op == "replace":
            words[i] = rng.choice(vocab)
        elif op == "delete" and len(words) > 3:
            del words[i]
        else:
            words.insert(i, rng.choice(vocab))
    out = " ".join(words)
    if level == "light":
        out = out.lower().replace(",", "").replace(".", " .")
    if level == "structural":
        sents = [s for s in SENTENCE.split(out) if s.strip()]
        if len(sents) > 2 and rng.random() < 0.5:
            del sents[rng.randrange(len(sents))]
        else:
            sents.insert(rng.randrange(len(sents) + 1), "I watched it again last weekend with friends.")
        out = " ".join(sents)
    return out


def build(rows: int, seed: int) -> tuple[Path, dict]:
    rng = random.Random(seed)
    base = imdb()
    by_label: dict[str, list[str]] = {}
    for t, l in base:
        by_label.setdefault(l, []).append(t)
    n_copies = rows // 50
    data = list(base[: rows - n_copies])
    while len(data) < rows - n_copies:
        label = rng.choice(sorted(by_label))
        data.append((composite(by_label[label], rng), label))
    vocab = sorted({w for t, _ in base[:2000] for w in t.split()})  # sorted: a set's order changes per process
    n_orig = len(data)
    labels = [l for _, l in data]
    flipped = set(rng.sample(range(n_orig), n_orig // 20))
    names = sorted(by_label)
    true_labels = list(labels)
    for i in flipped:
        labels[i] = names[1 - names.index(labels[i])]
    copies = []  # (copy index, source index, level)
    for k in range(n_copies):
        src = rng.randrange(n_orig)
        level = LEVELS[k % 4]
        copies.append((len(data), src, level))
        data.append((edit(data[src][0], level, vocab, rng), true_labels[src]))
        labels.append(true_labels[src])
    order = list(range(len(data)))
    rng.shuffle(order)  # copies spread through the file, not all at its end
    position = {old: new for new, old in enumerate(order)}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "train.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for old in order:
            w.writerow([data[old][0].replace("\r", " ").replace("\n", " "), labels[old]])
    truth = {"copies": [(position[c], position[s], lvl) for c, s, lvl in copies],
             "imdb": sorted(position[i] for i in range(min(len(base), rows - n_copies))),
             "flipped": sorted(position[i] for i in flipped), "rows": len(data),
             "imdb_rows": min(len(base), rows - n_copies)}
    return path, truth


def score(report: dict, truth: dict) -> dict:
    """Recall / false positives / precision from the report's findings; row i of the file is line i + 2."""
    def idx(r: dict) -> int:
        return r["line"] - 2

    def of(s: str) -> int:
        return int(s.rsplit("line ", 1)[1]) - 2

    dup_pairs = set()
    flagged_dup = set()
    for f in report["findings"]:
        if f["check"] in ("duplicates", "near_duplicates"):
            for r in f["rows"]:
                a, b = idx(r), of(r["same_as"])
                dup_pairs.add((min(a, b), max(a, b)))
                flagged_dup.update((a, b))
    family: dict[int, set[int]] = {}  # a source and all its copies
    for c, s, _ in truth["copies"]:
        family.setdefault(s, {s}).add(c)
    fam_of = {m: s for s, members in family.items() for m in members}
    found = {lvl: [0, 0] for lvl in LEVELS}
    for c, s, lvl in truth["copies"]:
        hit = any((min(c, m), max(c, m)) in dup_pairs for m in family[s] if m != c)
        found[lvl][0] += hit
        found[lvl][1] += 1
    injected = set(fam_of)
    clean_rows = truth["rows"] - len(injected)
    false_pos = flagged_dup - injected
    fp_imdb = false_pos & set(truth["imdb"])  # IMDB's own repeated reviews, not composites
    cross = {(a, b) for a, b in dup_pairs if fam_of.get(a, -1) != fam_of.get(b, -2) and (a in injected) != (b in injected)}
    labels = next((f for f in report["findings"] if f["check"] == "label_issues"), {"rows": []})
    flagged = {idx(r) for r in labels["rows"]}
    flips = set(truth["flipped"])
    total = sum(v[1] for v in found.values())
    return {
        "near_duplicate_recall": round(sum(v[0] for v in found.values()) / max(total, 1), 4),
        "recall_by_level": {k: round(v[0] / max(v[1], 1), 4) for k, v in found.items()},
        "copies": total,
        "false_positive_rows": len(false_pos), "rows_outside_injected_pairs": clean_rows,
        "false_positive_rate": round(len(false_pos) / max(clean_rows, 1), 5),
        "false_positive_rows_among_imdb_originals": len(fp_imdb),
        "false_positive_rows_among_composites": len(false_pos - fp_imdb),
        "pairs_linking_a_copy_to_an_unrelated_row": len(cross),
        "label_flags": len(flagged), "label_flip_precision": round(len(flagged & flips) / max(len(flagged), 1), 4),
        "label_flip_recall": round(len(flagged & flips) / max(len(flips), 1), 4),
        "model_accuracy_on_noisy_labels": report.get("label_check", {}).get("model_accuracy"),
    }


def natural_duplicates(path: Path, report: dict, truth: dict) -> int:
    """False-positive rows whose text is, once normalised, identical to the row it was paired with:
    IMDB's own repeated reviews rather than detector errors."""
    with path.open(newline="", encoding="utf-8") as f:
        texts = [row[0] for row in csv.reader(f)][1:]
    injected = {m for c, s, _ in truth["copies"] for m in (c, s)}
    norm = lambda t: " ".join(re.findall(r"\w+", t.lower()))  # noqa: E731
    same = 0
    for f in report["findings"]:
        if f["check"] in ("duplicates", "near_duplicates"):
            for r in f["rows"]:
                a, b = r["line"] - 2, int(r["same_as"].rsplit("line ", 1)[1]) - 2
                if a not in injected and b not in injected and norm(texts[a]) == norm(texts[b]):
                    same += 1
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="builtin:all-MiniLM-L6-v2", help="whose tokenizer counts the tokens")
    ap.add_argument("--token-sample", type=int, default=5_000, help="as data check's --token-sample (0: all)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    path, truth = build(args.rows, args.seed)
    print(f"built {truth['rows']} rows ({truth['imdb_rows']} IMDB reviews, the rest composites; "
          f"{len(truth['copies'])} edited copies, {len(truth['flipped'])} flipped labels) in "
          f"{time.perf_counter() - t:.1f} s: {path}", flush=True)

    from tunesmith import check_data

    cfg = {"task": "classification", "model": {"name_or_path": args.model},
           "data": {"train": str(path), "labels": ["0", "1"], "max_length": 256}}
    load_before = os.getloadavg()
    t, cpu = time.perf_counter(), time.process_time()
    report = check_data(path, cfg, token_sample=args.token_sample or None)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    result = {"rows": truth["rows"], "check_seconds": round(wall, 1), "check_cpu_seconds": round(cpu, 1),
              "stages": report["timings"], "load_average_before": [round(x, 1) for x in load_before],
              "load_average_after": [round(x, 1) for x in os.getloadavg()], "cpus": os.cpu_count(),
              **score(report, truth), "false_positives_that_are_imdb_repeats": natural_duplicates(path, report, truth)}
    (OUT / f"result-{truth['rows']}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"report-{truth['rows']}.json").write_text(json.dumps(report, default=str) + "\n")  # every finding's rows
    print(json.dumps(result, indent=2))
    print(f"\nnear-duplicate recall {result['near_duplicate_recall']:.1%} [>= 90%] at false-positive rate "
          f"{result['false_positive_rate']:.3%} [<= 1%]; label-flip precision {result['label_flip_precision']:.1%} "
          f"[>= 50%]; {result['rows']} rows checked in {wall:.1f} s [< 60 s]")


if __name__ == "__main__":
    main()
