"""Peak memory and tokens/s of the main job's training steps, whole micro-batches against pieces of
`train.max_batch_tokens`, both measured in the same run (issue 19's memory target: peak RSS <= 3 GB
at no more than 10% lower tokens/s).

Run: .venv/bin/python bench/memory.py [--steps 4] [--budget 2048] [--precision fp32|bf16] [--together]

Each side is `tunesmith train configs/sentiment-lora.yaml` in its own process (a fresh peak), on
the worst case for memory: the longest IMDB training reviews, so every micro-batch is 16 x 512
tokens. Evaluation before training is off and the validation set small, so the peak is training's.
Prints each side's training peak RSS (run.json's train_peak_rss_mb: the process's peak up to the end
of training) and training tokens/s (metrics.jsonl), then the ratios.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "sentiment-lora.yaml"


def longest_reviews(out: Path, n: int) -> Path:
    """The n longest IMDB reviews (by characters) as JSONL: every batch at max_length."""
    import csv

    from tunesmith.assets import data_source

    src = data_source("builtin:imdb")
    with open(src["path"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if all(r[k] == v for k, v in src["where"].items())]
    rows = sorted(rows, key=lambda r: len(r["text"]), reverse=True)[:n]
    out.write_text("".join(json.dumps({"text": r["text"], "label": src["labels"][int(r["label"])]}) + "\n"
                           for r in rows))
    return out


def side_command(name: str, data: Path, work: Path, steps: int, precision: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tunesmith", "train", str(CONFIG), f"--data.train={data}",
            "--data.val_size=16", "--data.test_size=16", f"--train.max_steps={steps}", "--train.log_every=1",
            "--train.eval_every=1000", "--eval.before=false", f"--train.precision={precision}",
            f"--output.dir={work}/{{name}}", f"--output.name={name}", *extra]


def side_result(name: str, proc: subprocess.Popen, work: Path) -> dict:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    run = work / name
    info = json.loads((run / "run.json").read_text())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    return {"name": name, "train_peak_rss_mb": info["train_peak_rss_mb"],
            "tokens_per_s": train_rows[-1]["tokens_per_s"], "steps": len(train_rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--budget", type=int, default=2048, help="train.max_batch_tokens for the second side")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rows", type=int, default=96, help="longest reviews used (>= steps x 16 + 32)")
    ap.add_argument("--together", action="store_true", help="run both sides at once (each sees the same "
                    "machine load; tokens/s are then each side's share of the CPU)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = longest_reviews(work / "longest.jsonl", args.rows)
        names = ["whole", f"pieces-{args.budget}"]
        extras = [[], [f"--train.max_batch_tokens={args.budget}"]]
        cmds = [side_command(n, data, work, args.steps, args.precision, e) for n, e in zip(names, extras)]
        if args.together:  # both at once: on a machine shared with other work, both sides see the same load
            procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
            sides = [side_result(n, p, work) for n, p in zip(names, procs)]
        else:
            sides = [side_result(n, subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), work)
                     for n, c in zip(names, cmds)]
    print(f"main job config, {args.precision}, {args.steps} steps of 16 x 512 tokens (the longest IMDB reviews)"
          + (", both sides at once" if args.together else ""))
    print(f"{'side':<16} {'train peak RSS':>15} {'tokens/s':>10}")
    for s in sides:
        print(f"{s['name']:<16} {s['train_peak_rss_mb']:>12.0f} MB {s['tokens_per_s']:>10.1f}")
    a, b = sides
    print(f"ratio (pieces / whole): peak RSS {b['train_peak_rss_mb'] / a['train_peak_rss_mb']:.2f}x, "
          f"tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
