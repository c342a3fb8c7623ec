"""Search vs grid on the IMDB main job (issue 24): is `tunesmith search` cheaper than a grid for
the same result, and what does pruning save?

    python bench/search.py            # the acceptance run: 1,000 train / 200 validation / 1,000 test reviews, 128 tokens
    python bench/search.py --quick    # a smoke run for a shared CPU: 48 / 48 / 300 reviews, 64 tokens, one thread a trial

Three arms on `configs/sentiment-lora.yaml` (MiniLM + LoRA), each a `run_search` study, in one run:
  1. grid: learning rate {2e-4, 5e-4, 1e-3, 2e-3} x rank {4, 16} x epochs {1, 2, 3}: 24 trials, no pruning;
  2. search: TPE over the same ranges (lr log-uniform, rank in {4, 8, 16}, epochs 1-3) with the
     median pruner, until it has trained 8 full-trial equivalents (a full trial: the grid's mean
     trial, in optimizer steps; trials that started before the budget ran out finish);
  3. the same search (same seed, as many trials as arm 2 ran) without pruning.

A study already finished in --work is reused (a rerun of a study continues it; a finished one
only reports), so `--work DIR --pruner asha` after a median run trains only the new arms.

Every trial evaluates twice an epoch on the validation split (keep-best; the pruner's input).
Each arm's best trial (by validation accuracy) is then scored on the held-out test reviews,
which no trial saw. Compute is counted in optimizer steps (all steps a trial trained, pruned or
not) and in seconds of the trial processes. The data: builtin:imdb shuffled with a fixed seed,
the first reviews for train+validation, the next ones held out as test.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LABELS = ["negative", "positive"]
FULL = {"train": 1000, "val": 200, "test": 1000, "max_length": 128, "batch": 16}
QUICK = {"train": 48, "val": 48, "test": 300, "max_length": 64, "batch": 8}
GRID = "train.lr: [2.0e-4, 5.0e-4, 1.0e-3, 2.0e-3]\nmethod.r: [4, 16]\ntrain.epochs: [1, 2, 3]\n"
SEARCH = "train.lr: {low: 2.0e-4, high: 2.0e-3, log: true}\nmethod.r: [4, 8, 16]\ntrain.epochs: {type: int, low: 1, high: 3}\n"


def write_data(out: Path, sizes: dict, seed: int = 0) -> tuple[Path, Path]:
    from tunesmith import assets

    with open(assets.data_source("builtin:imdb")["path"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "imdb"]
    random.Random(seed).shuffle(rows)
    n = sizes["train"] + sizes["val"]
    paths = []
    for name, part in (("trainval", rows[:n]), ("test", rows[n:n + sizes["test"]])):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": r["text"], "label": LABELS[int(r["label"])]}) + "\n" for r in part))
        paths.append(path)
    return paths[0], paths[1]


def arm(name: str, space: Path, work: Path, overrides: dict, threads: int | None, **kw) -> dict:
    from tunesmith.search import run_search

    t0 = time.perf_counter()
    r = run_search(ROOT / "configs" / "sentiment-lora.yaml", space, study=name, out=work / name, overrides=overrides,
                   seed=kw.pop("seed", 0), threads=threads, echo=True, **kw)
    return {"arm": name, "trials": len(r.table), "counts": r.counts, "steps": r.steps, "trial_seconds": round(r.seconds),
            "wall_seconds": round(time.perf_counter() - t0), "best": r.best, "table": r.table}


def test_accuracy(run_dir: str, test: Path) -> float:
    from tunesmith.runs import evaluate

    return evaluate(run_dir, test)["metrics"]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pruner", default="median", choices=["median", "asha"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per trial (default: all cores; --quick: 1, faster when other work shares the CPU)")
    ap.add_argument("--model", help="another base model than the config's MiniLM (e.g. a tiny one to try the script)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the studies (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = QUICK if args.quick else FULL
    threads = args.threads or (1 if args.quick else None)
    out = args.out or ROOT / "bench" / "results" / f"search{'-quick' if args.quick else ''}-{args.pruner}.json"
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    trainval, test = write_data(work, sizes)
    grid_space, search_space = work / "grid.yaml", work / "search.yaml"
    grid_space.write_text(GRID)
    search_space.write_text(SEARCH)
    steps_per_epoch = -(-sizes["train"] // sizes["batch"])
    ov = {"data.train": str(trainval), "data.train_size": None, "data.val_size": sizes["val"], "data.test_size": 0,
          "data.max_length": sizes["max_length"], "train.batch_size": sizes["batch"],
          "train.eval_every": max(1, steps_per_epoch // 2), "eval.samples": [], "eval.num_samples": 0,
          **({"model.name_or_path": args.model} if args.model else {})}
    t0, load_start = time.perf_counter(), os.getloadavg()
    grid = arm("grid", grid_space, work, ov, threads, sampler="grid", pruner="none")
    full_trial = grid["steps"] / grid["trials"]  # the grid's mean trial, in steps
    budget = round(8 * full_trial)
    pruned = arm(f"search-{args.pruner}", search_space, work, ov, threads, trials=100, pruner=args.pruner,
                 budget_steps=budget, seed=args.seed)
    unpruned = arm(f"search-none-{pruned['trials']}", search_space, work, ov, threads, trials=pruned["trials"],
                   pruner="none", seed=args.seed)
    arms = [grid, pruned, unpruned]
    for a in arms:
        a["best_test_accuracy"] = test_accuracy(a["best"]["run_dir"], test)
        a["full_trial_equivalents"] = round(a["steps"] / full_trial, 2)

    def pts(x: float) -> float:
        return round(100 * x, 2)

    ratios = {
        "search_vs_grid_validation_points": pts(pruned["best"]["value"] - grid["best"]["value"]),
        "search_vs_grid_test_points": pts(pruned["best_test_accuracy"] - grid["best_test_accuracy"]),
        "search_compute_share_of_grid": round(pruned["steps"] / grid["steps"], 3),
        "pruning_compute_saved": round(1 - pruned["steps"] / unpruned["steps"], 3),
        "pruning_validation_loss_points": pts(unpruned["best"]["value"] - pruned["best"]["value"]),
        "pruning_test_loss_points": pts(unpruned["best_test_accuracy"] - pruned["best_test_accuracy"]),
    }
    result = {"quick": args.quick, "sizes": sizes, "pruner": args.pruner, "seed": args.seed, "threads": threads,
              "full_trial_steps": full_trial, "budget_steps": budget, "wall_seconds": round(time.perf_counter() - t0),
              "load_average_start": load_start, "load_average_end": os.getloadavg(), "cpus": os.cpu_count(),
              "arms": arms, "ratios": ratios}
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\n| arm | trials (complete/pruned/failed) | steps | full-trial equiv. | trial s | best validation acc | "
          f"its test acc |\n|---|---|---|---|---|---|---|")
    for a in arms:
        c = a["counts"]
        print(f"| {a['arm']} | {a['trials']} ({c['complete']}/{c['pruned']}/{c['fail']}) | {a['steps']} | "
              f"{a['full_trial_equivalents']} | {a['trial_seconds']} | {a['best']['value']:.4f} | "
              f"{a['best_test_accuracy']:.4f} |")
    print("\n" + "\n".join(f"{k}: {v}" for k, v in ratios.items()) + f"\n\nwritten to {out}; studies in {work}")


if __name__ == "__main__":
    main()
