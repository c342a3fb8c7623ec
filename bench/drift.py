"""Does `tunesmith monitor` catch drift, and stay quiet when there is none? (issue 23, section 4)

    nice -n 5 .venv/bin/python bench/drift.py [--run RUN] [--windows 100] [--out bench/results/drift.json]

Reference: a MiniLM sentiment classifier trained on IMDB (a head-only run made here unless --run
names one); the monitor's reference is its held-out IMDB split. New inputs come in windows of
500 drawn from IMDB reviews the run never saw, and:
- clean: 500 IMDB reviews (a window that raises an alarm is a false alarm; target <= 5%);
- off-topic: 400 IMDB + 100 King James verses (target: detected in >= 95% of windows);
- other domain: 400 IMDB + 100 Rotten Tomatoes sentences (target >= 95%).
Windows are drawn at random from pools of unseen texts (1,500 IMDB, 500 verses, 500 RT), so
windows overlap; the model's predictions on each pool are computed once, as a deployed model's
log would hold them. Speed: the monitor's tests per 1,000 inputs (target < 10 s), and one
end-to-end `tunesmith monitor` over 1,000 logged predictions; the cost of computing predictions
when the log has none is reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunesmith import train  # noqa: E402
from tunesmith.data import load_records  # noqa: E402
from tunesmith.config import load_config  # noqa: E402
from tunesmith.monitor import build_reference, run_predictions, static_embeddings, test_window  # noqa: E402
from tunesmith.runs import load_run  # noqa: E402
from tunesmith.tasks import load_examples  # noqa: E402

# Small on purpose: on the shared 2-core CPU MiniLM reads about 10 reviews a second, and every
# reference and pool text needs one prediction. The drift tests do not depend on how good the
# classifier is, only on what it sees and says.
RUN_CONFIG = {
    "task": "classification", "model": {"name_or_path": "builtin:all-MiniLM-L6-v2"},
    "data": {"train": "builtin:imdb", "train_size": 320, "val_size": 0, "test_size": 500, "max_length": 64,
             "truncation_side": "left"},
    "method": {"name": "head"}, "train": {"max_steps": 20, "batch_size": 16, "lr": 5e-3, "load_best": False},
    "eval": {"before": False, "max_examples": 32},
}


def texts_of(source: str, cfg) -> list[str]:
    records, _ = load_records(source, cfg.data.model_copy(update={"where": {}, "columns": {}}))
    return [r.fields["text"] for r in records if isinstance(r.fields.get("text"), str) and r.fields["text"].strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="an IMDB classification run (default: train a head-only one under --workdir)")
    ap.add_argument("--workdir", default="/tmp/tunesmith-drift-bench")
    ap.add_argument("--windows", type=int, default=100, help="windows per condition")
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--share", type=float, default=0.2, help="share of each drifted window from the other source")
    ap.add_argument("--pool", type=int, default=1500, help="unseen IMDB reviews to draw windows from")
    ap.add_argument("--other-pool", type=int, default=500, help="verses / RT sentences to draw from")
    ap.add_argument("--reference", type=int, default=500, help="reference inputs (the run's test split)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "drift.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    t0 = time.perf_counter()
    if args.run:
        run_dir = Path(args.run)
    else:
        run_dir = work / "runs" / "drift-imdb-head"
        if not (run_dir / "run.json").is_file():
            cfg = {**RUN_CONFIG, "output": {"dir": str(work / "runs" / "{name}"), "name": "drift-imdb-head",
                                            "overwrite": True}}
            train(cfg)
    t_train = time.perf_counter()
    loaded = load_run(run_dir)
    ref = build_reference(loaded, run_dir, args.reference, seed=0)
    t_ref = time.perf_counter()
    print(f"reference: {ref.description} ({t_ref - t_train:.0f} s)", flush=True)

    cfg = loaded.cfg
    _, _, splits = load_examples(cfg)
    used = {e.text for s in splits.values() for e in s}
    rng = random.Random(0)
    imdb = [t for t in texts_of("builtin:imdb", cfg) if t not in used]
    pools = {"imdb": rng.sample(imdb, args.pool), "kjv": rng.sample(texts_of("builtin:kjv", cfg), args.other_pool),
             "rt": rng.sample(texts_of("builtin:rotten-tomatoes", cfg), args.other_pool)}
    preds, embs, pred_seconds = {}, {}, {}
    cache = work / "pool_predictions.json"  # a rerun (e.g. for the timing) skips the model's predictions
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, texts in pools.items():
        if saved.get(name, {}).get("texts") == texts:
            preds[name], pred_seconds[name] = saved[name]["preds"], saved[name]["seconds"]
        else:
            t = time.perf_counter()
            preds[name] = run_predictions(loaded, texts)
            pred_seconds[name] = time.perf_counter() - t
            saved[name] = {"texts": texts, "preds": preds[name], "seconds": pred_seconds[name]}
            cache.write_text(json.dumps(saved))
        embs[name] = static_embeddings(loaded, texts)
        print(f"pool {name}: {len(texts)} texts, predictions {pred_seconds[name]:.0f} s", flush=True)

    n_other = round(args.window * args.share)
    results: dict[str, list[dict]] = {"clean": [], "kjv": [], "rt": []}
    test_seconds = []
    for cond in results:
        for w in range(args.windows):
            idx = rng.sample(range(args.pool), args.window if cond == "clean" else args.window - n_other)
            items = [("imdb", i) for i in idx]
            if cond != "clean":
                items += [(cond, i) for i in rng.sample(range(len(pools[cond])), n_other)]
                rng.shuffle(items)
            texts = [pools[s][i] for s, i in items]
            t = time.perf_counter()
            emb = np.stack([embs[s][i] for s, i in items])
            r = test_window(ref, emb, texts, [preds[s][i] for s, i in items], seed=w)
            test_seconds.append(time.perf_counter() - t)
            results[cond].append({"drift": r["drift"], "fired": r["fired"],
                                  "p": {k: v["p"] for k, v in r["tests"].items()}})
        rate = np.mean([r["drift"] for r in results[cond]])
        print(f"{cond}: alarm in {rate:.1%} of {args.windows} windows", flush=True)

    # end to end: the CLI over 1,000 and over 3,000 logged predictions; the difference / 2 is what
    # each further 1,000 inputs cost (reading, embedding, testing), without the start-up (imports,
    # model, reference) that a long log pays once
    e2e = {}
    for n in (1000, 3000):
        log = work / f"log-{n}.jsonl"
        idx = [rng.randrange(args.pool) for _ in range(n)]
        log.write_text("".join(json.dumps({"input": pools["imdb"][i], **preds["imdb"][i]}) + "\n" for i in idx))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tunesmith", "monitor", str(run_dir), "--data", str(log),
                               "--reference", str(args.reference), "--out", str(work / f"monitor-{n}")],
                              check=False, cwd=ROOT, capture_output=True, text=True)
        e2e[n] = time.perf_counter() - t
        if proc.returncode not in (0, 1):  # 1: drift found; anything else failed
            raise SystemExit(f"tunesmith monitor failed:\n{proc.stderr[-2000:]}")
        print(f"cli end to end, {n} logged predictions: {e2e[n]:.1f} s", flush=True)
    embed_t = time.perf_counter()
    static_embeddings(loaded, pools["imdb"][:1000])
    embed_seconds = time.perf_counter() - embed_t

    per_window = float(np.mean(test_seconds))
    summary = {
        "run": str(run_dir), "reference": ref.description, "windows_per_condition": args.windows,
        "window": args.window, "share": args.share, "pool": args.pool,
        "detection": {c: float(np.mean([r["drift"] for r in rs])) for c, rs in results.items()},
        "fired_share": {c: {k: float(np.mean([k in r["fired"] for r in rs])) for k in rs[0]["p"]}
                        for c, rs in results.items()},
        "seconds_per_1000": {"tests (given embeddings)": per_window * 1000 / args.window,
                             "static embeddings": embed_seconds,
                             "cli end to end, 1000 logged predictions": e2e[1000],
                             "cli end to end, 3000 logged predictions": e2e[3000],
                             "cli, each further 1000 (difference / 2)": (e2e[3000] - e2e[1000]) / 2,
                             "predictions by the model (IMDB, max_length 64)": pred_seconds["imdb"] * 1000 / args.pool},
        "seconds": {"train": t_train - t0, "reference": t_ref - t_train, "total": time.perf_counter() - t0},
        "load_average_1_5_15_min_at_end": os.getloadavg(),  # 2 cores, shared with other jobs
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "windows": results}, indent=1))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
