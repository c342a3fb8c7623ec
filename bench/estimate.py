"""`tunesmith estimate` against the measured peak of the same runs (issue 25: within 15% for MiniLM
LoRA, SmolLM2 LoRA and SmolLM2 full fine-tuning on the CPU), each case estimated and then trained
for a few steps in the same run of this script.

Run: .venv/bin/python bench/estimate.py [--steps 3] [--only NAME ...] [--json OUT]

Each case runs `tunesmith estimate CONFIG ... --json` and then `tunesmith train CONFIG ...
--train.max_steps=3` with the same overrides, each in its own process (a fresh peak); the measured
figure is run.json's train_peak_rss_mb (ru_maxrss up to the end of training: loading included,
the final evaluation not). So that the few steps meet the batch the estimate is about (the longest),
each case trains on its config's longest examples: MiniLM on the longest IMDB reviews (every
micro-batch 16 x 512, as bench/memory.py), SmolLM2 on the longest identity prompt/completion pairs.
Evaluation before training is off, the validation set small or absent and the final test cut to
2 examples (it runs after the measured peak, but SFT generation is slow). Peak memory does not
depend on the machine's load; run cases one at a time (this script does) so that each is alone
in its process.

Cases marked "held out" played no part in choosing models/estimate.py's constants (its docstring
says which measurements did).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import longest_reviews  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parent.parent
LORA, SFT = "configs/sentiment-lora.yaml", "configs/sft-identity-lora.yaml"
FULL = ["--method.name=full", "--method.r=null", "--method.alpha=null", "--method.dropout=null",
        "--method.target_modules=null"]  # the LoRA config's method options do not apply to full
MINILM_DATA = ["--data.val_size=16", "--data.test_size=16"]
# name, config, overrides (both estimate and train), which data, role
CASES = [
    ("minilm-lora", LORA, [], "reviews", "calibration (bf16 activations)"),
    ("smollm2-lora", SFT, ["--train.precision=fp32"], "identity", "target, not calibrated on"),
    ("smollm2-full", SFT, ["--train.precision=fp32", *FULL], "identity", "shaped the model (gradient lifetimes)"),
    ("smollm2-full-b4x2", SFT, ["--train.precision=fp32", *FULL, "--train.batch_size=4", "--train.grad_accum=2"],
     "identity", "held out"),
    ("minilm-lora-8x256", LORA, ["--train.batch_size=8", "--data.max_length=256"], "reviews", "held out"),
    ("minilm-lora-fp32", LORA, ["--train.precision=fp32"], "reviews", "its shape set fp32 scores"),
    ("smollm2-lora-b16-ckpt", SFT, ["--train.precision=fp32", "--train.batch_size=16",
                                    "--train.gradient_checkpointing=true"], "identity", "held out"),
    # checkpointing at another batch (56 pairs: two whole batches an epoch); at batch 4 loading sets the peak
    ("smollm2-lora-b28-ckpt", SFT, ["--train.precision=fp32", "--train.batch_size=28",
                                    "--train.gradient_checkpointing=true"], "identity", "held out"),
]


def longest_identity(out: Path, n: int) -> Path:
    """The n longest prompt/completion pairs of the identity config's training files: every batch near
    the longest."""
    rows = [json.loads(line) for f in ("train.jsonl", "general.jsonl")
            for line in (ROOT / "examples" / "data" / "identity" / f).read_text().splitlines() if line.strip()]
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["completion"]), reverse=True)[:n]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # estimate exits 1 when the run will not fit: still a result
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def run_case(case: tuple, data: dict[str, list[str]], work: Path, steps: int, earlier: dict | None = None) -> dict:
    name, config, overrides, which, role = case
    args = [str(ROOT / config), *data[which], *overrides]
    t0 = time.perf_counter()
    est = json.loads(_run([sys.executable, "-m", "tunesmith", "estimate", *args, "--json"]).stdout)
    t1 = time.perf_counter()
    if earlier is not None:  # --measured: re-estimate against a peak measured by an earlier run of this script
        return _row(case, data, est, earlier["measured_mb"], t1 - t0, earlier["train_s"], "earlier run")
    nice = ["nice"] if os.nice(0) == 0 else []  # under `nice` already: do not push the runs lower still
    _run([*nice, sys.executable, "-m", "tunesmith", "train", *args, f"--train.max_steps={steps}", "--train.log_every=1",
          "--train.eval_every=1000", "--eval.before=false", "--eval.samples=[]", "--eval.max_examples=2",
          f"--output.dir={work}/{{name}}", f"--output.name={name}"])
    run = json.loads((work / name / "run.json").read_text())
    return _row(case, data, est, run["train_peak_rss_mb"], t1 - t0, time.perf_counter() - t1, "this run")


def _row(case: tuple, data: dict, est: dict, measured: float, est_s: float, train_s: float | None,
         when: str) -> dict:
    name, config, overrides, which, role = case
    m = est["memory"]
    return {"case": name, "role": role, "config": config, "overrides": data[which] + overrides,
            "precision": est["precision"], "batch_tokens": m["batch_tokens"], "estimated_mb": m["peak_mb"],
            "measured_mb": round(measured), "ratio": round(m["peak_mb"] / measured, 3), "measured_in": when,
            "parts": {k: m[k] for k in ("base", "weights", "gradients_optimizer", "activations", "logits",
                                        "load_peak_mb")},
            "estimate_s": round(est_s, 1), "train_s": None if train_s is None else round(train_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="+", help="run only these cases")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--measured", nargs="+", metavar="JSON", help="take each case's measured peak from these "
                    "earlier --json outputs instead of training again (re-estimating after a change to the model; "
                    "the table says which rows were measured earlier)")
    args = ap.parse_args()
    earlier = {r["case"]: r for f in args.measured or [] for r in json.loads(Path(f).read_text())}
    cases = [c for c in CASES if (not args.only or c[0] in args.only) and (not earlier or c[0] in earlier)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {"reviews": [f"--data.train={longest_reviews(work / 'longest.jsonl', 16 * args.steps + 48)}",
                            *MINILM_DATA],
                "identity": [f"--data.train={longest_identity(work / 'identity.jsonl', 16 * args.steps + 8)}",
                             "--data.val_size=0"]}
        for case in cases:
            rows.append(run_case(case, data, work, args.steps, earlier.get(case[0]) if earlier else None))
            r = rows[-1]
            print(f"{r['case']}: estimated {r['estimated_mb']} MB, measured {r['measured_mb']} MB, "
                  f"ratio {r['ratio']:.3f}", file=sys.stderr, flush=True)
    print(f"{'case':<24} {'role':<38} {'precision':<9} {'tokens':>6} {'estimated':>10} {'measured':>10} {'ratio':>6}  "
          "within 15%  measured in")
    for r in rows:
        ok = "yes" if abs(r["ratio"] - 1) <= 0.15 else "NO"
        print(f"{r['case']:<24} {r['role']:<38} {r['precision']:<9} {r['batch_tokens']:>6} {r['estimated_mb']:>7} MB "
              f"{r['measured_mb']:>7} MB {r['ratio']:>6.3f}  {ok:<10}  {r['measured_in']}")
    for r in rows:
        print(f"{r['case']}: {' '.join(r['overrides'][1:])}; parts {r['parts']}; estimate {r['estimate_s']} s, "
              f"train {r['train_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
