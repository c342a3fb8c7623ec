"""What tracking costs a run: opening each tracker, then each logged row (the training loop's
train/eval rows reach the trackers synchronously, on the training thread).

Run: PYTHONPATH=. nice .venv/bin/python bench/tracking.py [--rows 500]
Writes N training rows of 8 scalars to a TensorBoard tracker (tensorboardX) and to an MLflow tracker
on a fresh local SQLite store, and prints wall and CPU milliseconds per row, and the opening cost
(for MLflow on a new store, mostly creating its tables).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tunesmith.config import load_config
from tunesmith.train.tracking import MlflowTracker, TensorBoardTracker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500)
    args = ap.parse_args()
    row = {"kind": "train", "step": 0, "total_steps": args.rows, "epoch": 0.1, "loss": 0.5, "lr": 1e-4,
           "grad_norm": 1.2, "tokens_per_s": 900.0, "skipped_steps": 0, "accuracy": 0.7}
    print(f"load average {os.getloadavg()[0]:.1f}")
    for name, cls in (("tensorboard", TensorBoardTracker), ("mlflow", MlflowTracker)):
        d = Path(tempfile.mkdtemp())
        cfg = load_config({"data": {"train": "x"}, "track": {"mlflow": {
            "tracking_uri": f"sqlite:///{d}/m.db", "artifact_location": str(d / "artifacts")}}})
        c0, w0 = time.process_time(), time.perf_counter()
        tracker = cls(cfg, d, None)
        c1, w1 = time.process_time(), time.perf_counter()
        for step in range(1, args.rows + 1):
            tracker.row({**row, "step": step})
        tracker.close("FINISHED")
        c2, w2 = time.process_time(), time.perf_counter()
        print(f"{name}: open {w1 - w0:.2f} s wall, {c1 - c0:.2f} s CPU; {args.rows} rows: "
              f"{1000 * (w2 - w1) / args.rows:.2f} ms/row wall, {1000 * (c2 - c1) / args.rows:.2f} ms/row CPU")


if __name__ == "__main__":
    main()
