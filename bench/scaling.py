"""Scaling: time and peak memory as sequence length, model size and dataset size grow; a PNG plot.

    python bench/scaling.py           # about 15 min on 2 cores
    python bench/scaling.py --quick   # small points only
    python bench/scaling.py --dp      # only the data-parallel rows (sweep 4), a few minutes

Three sweeps, each point in its own process (so its peak RSS is its own):
1. Sequence length, SmolLM2-135M + LoRA r16 on every linear layer, batch 1, 128 to 4096 tokens,
   and with gradient checkpointing at 1024 and 2048. Random token ids, loss on every position.
2. Model size at 256 tokens x batch 4: MiniLM (22 M), SmolLM2 (135 M), and a 360 M Llama built
   from scratch with SmolLM2-360M's shape (random weights: the cost of a step does not depend
   on them).
3. Dataset size: real `tunesmith train` runs of configs/sentiment-lora.yaml for one epoch at 128
   tokens on 250, 500 and 1,000 reviews, each its own process; time per epoch is the run's own
   train_seconds, memory its peak RSS up to the end of training.

4. Data parallel on the CPU (gloo): the same configs/sentiment-lora.yaml epoch (MiniLM LoRA, 500
   reviews, 128 tokens, global batch 16) as one process with 2 threads, and as `--nproc 2` with one
   thread each. Both give the same weights (tests/test_distributed.py); the rows say what the
   split costs or saves in time and memory on this machine. GPU rows (DDP over NCCL, FSDP2, ZeRO)
   need a GPU machine: docs/DISTRIBUTED.md says what is verified.

For sweeps 1 and 2, "s / epoch of 1,000 examples" is computed from the measured step time
(1,000 / batch steps); sweep 3 measures whole epochs. Every step row also gets its MFU against
the matmul peak measured at the start of the run. The sequence sweep ends with a linear fit of
peak RSS against length and the longest sequence whose predicted peak fits in 8 GB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stepbench import ROOT, machine, matmul_peak, mfu, run_point

GB8 = 8 * 1024


def dataset_sweep(sizes: list[int]) -> list[dict]:
    """One real `tunesmith train` run per size, each in its own process (its own peak RSS)."""
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, "-m", "tunesmith", "train", str(ROOT / "configs/sentiment-lora.yaml"),
                            f"--data.train_size={n}", "--data.val_size=0", "--data.test_size=50", "--data.max_length=128",
                            "--train.epochs=1", "--eval.before=false", "--eval.samples=[]", f"--output.dir={out}/{{name}}"],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            s = json.loads((Path(out) / "sentiment-lora" / "run.json").read_text())
            rows.append({"examples": n, "epoch_s": s["train_seconds"], "peak_rss_mb": s["train_peak_rss_mb"]})
    return rows


def dp_sweep(n: int = 500) -> list[dict]:
    """configs/sentiment-lora.yaml for one epoch: 1 process x 2 threads, then 2 processes x 1 thread."""
    import os

    rows = []
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc), "GLOO_SOCKET_IFNAME": "lo"}
            launch = ["--nproc", "2"] if nproc == 2 else []
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tunesmith", "train", str(ROOT / "configs/sentiment-lora.yaml"), *launch,
                            f"--data.train_size={n}", "--data.val_size=0", "--data.test_size=50", "--data.max_length=128",
                            "--train.epochs=1", "--train.batch_size=16", f"--train.num_threads={2 // nproc}",
                            "--train.precision=fp32", "--eval.before=false", "--eval.samples=[]",
                            f"--output.dir={out}/{{name}}"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            s = json.loads((Path(out) / "sentiment-lora" / "run.json").read_text())
            rows.append({"processes": nproc, "threads_each": 2 // nproc, "examples": n, "epoch_s": s["train_seconds"],
                         "wall_s": wall, "peak_rss_mb_process0": s["train_peak_rss_mb"]})
    return rows


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def plot(seq_rows: list[dict], model_rows: list[dict], data_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for gc in (False, True):
        rs = [r for r in seq_rows if r["gc"] == gc]
        if rs:
            label = "gradient checkpointing" if gc else "plain"
            ax[0].plot([r["seq"] for r in rs], [r["peak_rss_mb"] / 1024 for r in rs], "o-", label=f"peak RSS GB, {label}")
    ax[0].axhline(GB8 / 1024, color="grey", ls=":", label="8 GB")
    ax0b = ax[0].twinx()
    rs = [r for r in seq_rows if not r["gc"]]
    ax0b.plot([r["seq"] for r in rs], [r["step_s"] for r in rs], "s--", color="tab:red", label="s / step (plain)")
    ax[0].set(xlabel="sequence length (tokens, batch 1)", ylabel="peak RSS (GB)", title="SmolLM2-135M + LoRA: length")
    ax0b.set_ylabel("seconds per step")
    ax[0].legend(loc="upper left", fontsize=8)
    ax0b.legend(loc="lower right", fontsize=8)
    short = {"builtin:all-MiniLM-L6-v2": "MiniLM", "builtin:SmolLM2-135M-Instruct": "SmolLM2", "scratch:360m": "Llama (scratch)"}
    names = [f"{short.get(r['model'], r['model'])}\n{r['params_m']:.0f} M" for r in model_rows]
    ax[1].bar(names, [r["step_s"] for r in model_rows], color="tab:blue")
    ax[1].set(ylabel="seconds per step (256 x 4)", title="model size")
    for i, r in enumerate(model_rows):
        ax[1].text(i, r["step_s"], f"{r['peak_rss_mb'] / 1024:.1f} GB", ha="center", va="bottom", fontsize=8)
    ax[2].plot([r["examples"] for r in data_rows], [r["epoch_s"] for r in data_rows], "o-")
    ax[2].set(xlabel="training examples (MiniLM LoRA, 128 tokens)", ylabel="seconds per epoch", title="dataset size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dp", action="store_true", help="only the data-parallel rows")
    args = ap.parse_args()
    if args.dp:
        dp = dp_sweep()
        print("\n| MiniLM LoRA, 500 reviews, global batch 16 | s / epoch | wall s (incl. start-up) | peak RSS MB, process 0 |")
        print("|---|---|---|---|")
        for r in dp:
            print(f"| {r['processes']} process(es) x {r['threads_each']} thread(s) | {r['epoch_s']:.0f} | {r['wall_s']:.0f} | "
                  f"{r['peak_rss_mb_process0']:.0f} |")
        res = ROOT / "bench" / "results"
        res.mkdir(parents=True, exist_ok=True)
        (res / "scaling-dp.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": dp}, indent=2))
        return
    device, precision = machine()
    peak = matmul_peak(precision)
    smol = "builtin:SmolLM2-135M-Instruct"
    seqs = [128, 256] if args.quick else [128, 256, 512, 1024, 2048, 4096]
    seq_rows = [run_point(model_name=smol, seq=s, batch=1, steps=1 if s >= 2048 else 2, gc=False) for s in seqs]
    seq_rows += [run_point(model_name=smol, seq=s, batch=1, steps=1 if s >= 2048 else 2, gc=True) for s in seqs[-3:-1]]
    models = ["builtin:all-MiniLM-L6-v2", smol] + ([] if args.quick else ["scratch:360m"])
    model_rows = [run_point(model_name=m, seq=256, batch=4, steps=2) for m in models]
    data_rows = dataset_sweep([100, 200] if args.quick else [250, 500, 1000])

    print(f"\nScaling, LoRA training, {device}, {precision}; matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| model | seq x batch | gradient ckpt | s / step | tokens/s | s / epoch of 1,000 examples | peak RSS MB | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in seq_rows + model_rows:
        print(f"| {r['model'].removeprefix('builtin:')} ({r['params_m']:.0f} M) | {r['seq']} x {r['batch']} | "
              f"{'yes' if r['gc'] else 'no'} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s'] * 1000 / r['batch']:.0f} | {r['peak_rss_mb']:.0f} | {mfu(r, peak):.0%} |")
    print("\n| MiniLM LoRA, 128 tokens: training examples | s / epoch (measured) | s per 100 examples | peak RSS MB |\n|---|---|---|---|")
    for r in data_rows:
        print(f"| {r['examples']} | {r['epoch_s']:.0f} | {100 * r['epoch_s'] / r['examples']:.1f} | {r['peak_rss_mb']:.0f} |")

    plain = [r for r in seq_rows if not r["gc"]]
    slope, icpt = fit_line([r["seq"] for r in plain], [r["peak_rss_mb"] for r in plain])
    fit_err = max(abs(r["peak_rss_mb"] - (icpt + slope * r["seq"])) / r["peak_rss_mb"] for r in plain)
    print(f"\npeak RSS ~ {icpt:.0f} MB + {slope:.2f} MB per token (batch 1, no checkpointing); "
          f"largest deviation from the line {fit_err:.0%}")
    print(f"longest sequence predicted to fit in 8 GB: {int((GB8 - icpt) / slope):,} tokens "
          f"(measured points up to {plain[-1]['seq']}: {plain[-1]['peak_rss_mb']:.0f} MB)")
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    tag = "-quick" if args.quick else ""
    plot(seq_rows, model_rows, data_rows, res / f"scaling{tag}.png")
    (res / f"scaling{tag}.json").write_text(json.dumps(
        {"device": device, "date": time.strftime("%Y-%m-%d"), "precision": precision, "peak_flops": peak,
         "seq": seq_rows, "model": model_rows, "data": data_rows, "fit_mb": [icpt, slope]}, indent=2))
    print(f"plot: {res / f'scaling{tag}.png'}")


if __name__ == "__main__":
    main()
