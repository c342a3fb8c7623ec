"""Transfer learning with and without the frozen-bottom cache (tunesmith/train/frozen_cache.py), same run.

Run: .venv/bin/python bench/frozen_cache.py [--config configs/sentiment-head.yaml] [--set=--KEY=VALUE ...]
Trains the shipped head config (MiniLM body frozen, pooler + new classifier train; 1,000 IMDB
reviews, 3 epochs, validation every epoch) twice: `train.frozen_cache_gb` 0 (every epoch and
evaluation runs the whole body), then the default (the body runs once per example). Prints the
training clock (steps and validation evaluations), the held-out accuracy of each (they must
agree: the cache is exact) and the speed-up last.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from tunesmith.train import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/sentiment-head.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="--KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "bench/results/frozen_cache.json"))
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, gb in (("whole body every time", 0.0), ("frozen-bottom cache", None)):
            res = train(a.config, [*a.overrides, *([f"--train.frozen_cache_gb={gb}"] if gb is not None else []),
                                   "--eval.before=false", "--eval.samples=[]", f"--output.dir={tmp}/{{name}}",
                                   f"--output.name=run{len(rows)}"])
            rows[name] = {"train_seconds": res.summary["train_seconds"], "accuracy": res.after["metrics"]["accuracy"],
                          "loss": res.after["metrics"]["loss"], "steps": res.summary["steps"]}
    base, new = rows["whole body every time"], rows["frozen-bottom cache"]
    out = {"config": a.config, "overrides": a.overrides, "rows": rows, "speedup": base["train_seconds"] / new["train_seconds"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\n{Path(a.config).name} {' '.join(a.overrides)}")
    print(f"{'setting':24s} {'train s':>8s} {'steps':>6s} {'held-out acc':>13s} {'loss':>8s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['train_seconds']:8.1f} {r['steps']:6d} {r['accuracy']:13.4f} {r['loss']:8.4f}")
    print(f"speed-up of the training clock (same run): {out['speedup']:.2f}x")


if __name__ == "__main__":
    main()
