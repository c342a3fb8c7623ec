"""Peak memory and tokens/s of the main job before and after issue 19's memory work, measured in the
same run, in fp32 and bf16 (the target: whole-command peak RSS <= 3 GB at no more than 10% lower
tokens/s).

Run: .venv/bin/python bench/memory.py [--steps 3] [--precisions fp32,bf16] [--sides before,after] [--rounds 1]

Each side is `tunesmith train configs/sentiment-lora.yaml` in its own process (a fresh peak) with
its settings (SIDES below): `before` is the code before the work (peft's LoRA dropout, glibc's
default malloc), `after` the shipped config (today the same as `step`); `mmap` and `pieces`
(train.max_batch_tokens=4096) are the other measured choices. The data are the worst case for memory: the longest
IMDB reviews, so every training micro-batch is 16 x 512 tokens and every evaluation batch 32 x 512
(64 held-out reviews, evaluated before and after training as the main job does). Reported per side:
- whole peak RSS: run.json's peak_rss_mb, the process's peak over the whole command (data, model,
  evaluation before, training, evaluation after, saving);
- train peak RSS: run.json's train_peak_rss_mb, the peak up to the end of training;
- tokens/s: training tokens over training time (metrics.jsonl's last row).
Sides run one after another, alternated (with --rounds 2: before, after, after, before) so that on a
shared machine both see the same load on average; tokens/s is the mean over rounds. Compare
tokens/s only within one run of this script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "sentiment-lora.yaml"
TEST_ROWS, VAL_ROWS = 64, 16

SIDES = {
    "before": ["--train.lean_lora_dropout=false", "--train.return_memory=keep", "--train.max_batch_tokens=null"],
    "lean": ["--train.return_memory=keep", "--train.max_batch_tokens=null"],  # LoRA dropout's bool mask alone
    "step": ["--train.return_memory=step", "--train.max_batch_tokens=null"],  # and malloc_trim after each step
    "mmap": ["--train.return_memory=mmap", "--train.max_batch_tokens=null"],  # a mapping per tensor of 1 MB or more
    "pieces": ["--train.return_memory=step", "--train.max_batch_tokens=4096"],  # step, micro-batches cut in two
    "after": [],  # the shipped config
}


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


def run_side(side: str, precision: str, data: Path, work: Path, steps: int) -> dict:
    name = f"{side}-{precision}"
    cmd = [sys.executable, "-m", "tunesmith", "train", str(CONFIG), f"--data.train={data}",
           f"--data.val_size={VAL_ROWS}", f"--data.test_size={TEST_ROWS}", f"--train.max_steps={steps}",
           "--train.log_every=1", f"--train.precision={precision}", f"--output.dir={work}/{{name}}", f"--output.name={name}",
           "--output.overwrite=true", *SIDES[side]]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    info = json.loads((work / name / "run.json").read_text())
    rows = [json.loads(l) for l in (work / name / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    return {"whole": info["peak_rss_mb"], "train": info["train_peak_rss_mb"], "tokens_per_s": train_rows[-1]["tokens_per_s"],
            "loss": train_rows[-1]["loss"], "steps": len(train_rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps of 16 x 512 tokens per side")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--sides", default="before,after", help=f"comma-separated, of {', '.join(SIDES)}")
    ap.add_argument("--rounds", type=int, default=1, help="run each side this many times, alternating the order")
    args = ap.parse_args()
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown side(s) {unknown}; choose from {list(SIDES)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = longest_reviews(work / "longest.jsonl", args.steps * 16 + VAL_ROWS + TEST_ROWS)
        results: dict[tuple[str, str], list[dict]] = {}
        for precision in args.precisions.split(","):
            for r in range(args.rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    res = run_side(side, precision, data, work, args.steps)
                    print(f"  {precision} {side} round {r + 1}: whole {res['whole']:.0f} MB, train {res['train']:.0f} MB, "
                          f"{res['tokens_per_s']:.1f} tokens/s, loss {res['loss']:.6f}", flush=True)
                    results.setdefault((precision, side), []).append(res)
    print(f"\nmain job config, {args.steps} steps of 16 x 512 tokens (the longest IMDB reviews), evaluation of "
          f"{TEST_ROWS} x 512 before and after; {args.rounds} round(s), sides alternated")
    print(f"{'precision':<9} {'side':<8} {'whole peak RSS':>15} {'train peak RSS':>15} {'tokens/s':>9} {'vs ' + sides[0]:>18}")
    for (precision, side), runs in results.items():
        whole, train = max(r["whole"] for r in runs), max(r["train"] for r in runs)
        tps = sum(r["tokens_per_s"] for r in runs) / len(runs)
        ref = results[(precision, sides[0])]
        ref_tps = sum(r["tokens_per_s"] for r in ref) / len(ref)
        ratio = f"{whole / max(r['whole'] for r in ref):.2f}x RSS {tps / ref_tps:.2f}x tok/s"
        print(f"{precision:<9} {side:<8} {whole:>12.0f} MB {train:>12.0f} MB {tps:>9.1f} {ratio:>18}")


if __name__ == "__main__":
    main()
