"""Model FLOPs utilisation: achieved FLOP/s of a training step over this machine's matmul peak.

    python bench/mfu.py           # MiniLM and SmolLM2 LoRA steps, about 2 min on 2 cores
    python bench/mfu.py --quick   # one small step each

The peak is measured in the same run: the best of several 2048 x 2048 matmuls in the precision
training uses (fp32 here; bf16 where `precision: auto` picks it), on the same threads.
A step's FLOPs are counted by torch's FlopCounterMode over one real training step (forward and
backward; with LoRA the frozen weights get no weight gradients, so those FLOPs are not counted,
and neither are the elementwise operations, which take time but no matmul work). The counter
does not see the CPU attention kernel, so attention's matmuls are added by the usual formula
(12 x layers x hidden x seq^2 per sequence, forward + backward) where it saw none. MFU is
FLOPs per step / seconds per step / peak: the share of the machine's matmul speed that the step
turns into model work. Each row runs in its own process. Ratios (MFU) come last.
"""
from __future__ import annotations

import argparse
import json
import time

from stepbench import ROOT, machine, matmul_peak, mfu, run_point

POINTS = [  # (model, sequence length, batch): the shapes the shipped configs train
    ("builtin:all-MiniLM-L6-v2", 256, 16),
    ("builtin:all-MiniLM-L6-v2", 512, 16),
    ("builtin:SmolLM2-135M-Instruct", 128, 8),
    ("builtin:SmolLM2-135M-Instruct", 512, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device, precision = machine()
    peak = matmul_peak(precision)
    points = [(m, 64, 4) for m, _, _ in POINTS[::2]] if args.quick else POINTS
    rows = [run_point(model_name=m, seq=s, batch=b, steps=1 if args.quick else 3) for m, s, b in points]
    peak_after = matmul_peak(precision)  # the machine may drift during the run: report both ends
    print(f"\nTraining-step MFU, LoRA, {device}, {precision}\n")
    print(f"matmul peak ({precision}, 2048^3): {peak / 1e9:.1f} GFLOP/s at the start, {peak_after / 1e9:.1f} at the end\n")
    print("| model | seq x batch | GFLOP per step | s per step | achieved GFLOP/s | tokens/s | MFU |\n|---|---|---|---|---|---|---|")
    best_peak = max(peak, peak_after)
    for r in rows:
        print(f"| {r['model'].removeprefix('builtin:')} | {r['seq']} x {r['batch']} | {r['flops_per_step'] / 1e9:.1f} | "
              f"{r['step_s']:.2f} | {r['achieved_flops'] / 1e9:.1f} | {r['tokens_per_s']:.0f} | "
              f"**{mfu(r, best_peak):.0%}** |")
    print("\nMFU is against the higher of the two peaks.")
    out = ROOT / "bench" / "results" / ("mfu-quick.json" if args.quick else "mfu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "date": time.strftime("%Y-%m-%d"), "precision": precision,
                               "peak_flops": [peak, peak_after], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
