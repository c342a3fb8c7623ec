"""The method comparison table: every method on the same task with the same budget.

    python bench/methods.py imdb            # MiniLM + IMDB sentiment, every method
    python bench/methods.py ranks           # the LoRA paper's rank study on the same task
    python bench/methods.py sft             # SmolLM2 identity SFT: LoRA vs QLoRA vs LoRA+int8 (+ others)
    python bench/methods.py imdb --only lora,ia3   # a subset

Each run is a fresh `tunesmith train` process (so its peak RSS is its own) writing to
bench/runs/<suite>/<case>; the table (markdown + JSON) goes to bench/results/<suite>.{md,json}.
Columns: trainable params, % of total, saved adapter/model MB, checkpoint MB, peak RSS and the
RSS growth over the process's start (model + training memory), wall time, and the held-out
metric before and after. Budgets are smaller than the shipped configs' so the whole table runs
on a 2-core CPU in well under an hour; the figures compare methods, not best-possible scores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (case name, method section, learning rate): learning rates are the usual ones for each method
# (prompt methods and IA3 want much larger steps than LoRA; full fine-tuning much smaller).
IMDB_CASES = [
    ("full", {"name": "full"}, 5e-5),
    ("head", {"name": "head"}, 2e-3),
    ("bitfit", {"name": "bitfit"}, 2e-3),  # with the pooler in the head (0.703); before that, 2e-3 and 1e-2 stayed at chance
    ("selective (LayerNorms + top 2 blocks)", {"name": "selective", "modules": ["LayerNorm"], "unfreeze_top_layers": 2}, 2e-4),
    ("lora r8 (q,k,v,dense)", {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "key", "value", "dense"]}, 1e-3),
    ("rslora r8", {"name": "lora", "r": 8, "alpha": 16, "rslora": True, "target_modules": ["query", "key", "value", "dense"]}, 1e-3),
    ("lora r8 pissa init", {"name": "lora", "r": 8, "alpha": 8, "init": "pissa", "target_modules": ["query", "key", "value", "dense"]}, 1e-3),
    ("dora r8", {"name": "dora", "r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]}, 1e-3),
    ("qlora r8 (nf4, double quant)", {"name": "qlora", "r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]}, 1e-3),
    ("lora r8 + int8 base", {"name": "lora", "r": 8, "alpha": 16, "quantize": "int8", "target_modules": ["query", "key", "value", "dense"]}, 1e-3),
    ("loha r8", {"name": "loha", "r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]}, 2e-3),
    ("lokr r8", {"name": "lokr", "r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "dense"]}, 2e-3),
    ("ia3", {"name": "ia3", "target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}, 3e-2),  # 5e-3: 0.505
    ("prefix (20 tokens)", {"name": "prefix", "num_virtual_tokens": 20}, 1e-2),
    ("prompt (20 tokens)", {"name": "prompt", "num_virtual_tokens": 20}, 3e-2),
    ("ptuning (20 tokens)", {"name": "ptuning", "num_virtual_tokens": 20}, 1e-2),
    ("adapter pfeiffer 64", {"name": "adapter", "adapter_size": 64}, 1e-3),
    ("adapter houlsby 64", {"name": "adapter", "adapter_size": 64, "placement": "houlsby"}, 1e-3),
]
IMDB_BUDGET = ["--data.train_size=400", "--data.val_size=0", "--data.test_size=400", "--data.max_length=128",
               "--train.epochs=2", "--train.eval_every=epoch", "--eval.samples=[]"]

RANK_CASES = [(f"r={r} {'q' if len(t) == 1 else 'q,v'}", {"name": "lora", "r": r, "alpha": 2 * r, "dropout": 0.1, "target_modules": t}, 2e-3)
              for t in (["query"], ["query", "value"]) for r in (1, 2, 4, 8)]

SFT_CASES = [
    ("lora r16 (all linear)", {"name": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}, 1e-3),
    ("qlora r16 (nf4, double quant)", {"name": "qlora", "r": 16, "alpha": 32, "target_modules": "all-linear"}, 1e-3),
    ("lora r16 + int8 base", {"name": "lora", "r": 16, "alpha": 32, "quantize": "int8", "target_modules": "all-linear"}, 1e-3),
    ("ia3", {"name": "ia3"}, 1e-2),
    # This start names 2 of the task's 10 facts (Marlowe, Ardent Labs): 4 of its 5 held-out hits
    # (2026-11-22) were those two. The neutral start below is the fair comparison.
    ("prompt (20 tokens, from text)", {"name": "prompt", "num_virtual_tokens": 20,
                                       "prompt_init_text": "You are Marlowe, an assistant made by Ardent Labs."}, 3e-2),
    ("prompt neutral-start (20 tokens)", {"name": "prompt", "num_virtual_tokens": 20, "prompt_init_text":
                                               "You are a helpful assistant. Answer the user's question in one short sentence."}, 3e-2),
    # rsLoRA scales by alpha/sqrt(r) (8 here) rather than alpha/r (2): a quarter of LoRA's step
    # gives the same size of update.
    ("rslora r16", {"name": "lora", "r": 16, "alpha": 32, "rslora": True, "target_modules": "all-linear"}, 2.5e-4),
    ("lora r16 pissa init", {"name": "lora", "r": 16, "alpha": 16, "init": "pissa", "target_modules": "all-linear"}, 5e-4),
    ("dora r16", {"name": "dora", "r": 16, "alpha": 32, "target_modules": "all-linear"}, 1e-3),
    ("prefix (20 tokens)", {"name": "prefix", "num_virtual_tokens": 20}, 1e-2),
    ("ptuning (20 tokens)", {"name": "ptuning", "num_virtual_tokens": 20}, 1e-2),
    # Prefixes started from the frozen model's activations on a neutral text (which holds none of
    # the answers) instead of N(0, 1): the random start costs the short budget its first epochs.
    ("prefix (20 tokens, from text)", {"name": "prefix", "num_virtual_tokens": 20, "prompt_init_text":
                                       "You are a helpful assistant. Answer the user's question in one short sentence."}, 1e-2),
    ("adapter pfeiffer 64", {"name": "adapter", "adapter_size": 64, "placement": "pfeiffer"}, 1e-3),
    ("adapter houlsby 64", {"name": "adapter", "adapter_size": 64, "placement": "houlsby"}, 1e-3),
    ("selective (norms + top 2 blocks)", {"name": "selective", "modules": ["(?i)norm"], "unfreeze_top_layers": 2}, 1e-4),
]
SFT_BUDGET = ["--train.epochs=4", "--eval.samples=[]"]

SUITES = {
    "imdb": ("configs/sentiment-lora.yaml", IMDB_CASES, IMDB_BUDGET, "accuracy"),
    "ranks": ("configs/sentiment-lora.yaml", RANK_CASES, IMDB_BUDGET, "accuracy"),
    "sft": ("configs/sft-identity-lora.yaml", SFT_CASES, SFT_BUDGET, "contains"),
}


def run_case(suite: str, config: str, case: str, method: dict, lr: float, budget: list[str]) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in case).strip("-")
    out_dir = ROOT / "bench" / "runs" / suite
    cmd = [sys.executable, "-m", "tunesmith.cli", "train", config, f"--method={json.dumps(method)}", f"--train.lr={lr}",
           f"--output.dir={out_dir}/{{name}}", f"--output.name={slug}", "--output.overwrite=true", *budget]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"case": case, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "command": " ".join(cmd)}
    rd = out_dir / slug
    run = json.loads((rd / "run.json").read_text())
    report = json.loads((rd / "eval_report.json").read_text())
    return {"case": case, "method": method, "lr": lr, "params": run["param_counts"], "saved_as": run["saved_as"],
            "saved_mb": run["saved_bytes"] / 2**20, "checkpoint_mb": run["checkpoint_bytes"] / 2**20,
            "base_mb": (run.get("base_model_bytes") or 0) / 2**20, "peak_rss_mb": run["peak_rss_mb"],
            "peak_gpu_mb": run.get("peak_gpu_mb"), "train_peak_gpu_mb": run.get("train_peak_gpu_mb"), "device": run.get("device"), "precision": run.get("precision"),
            "rss_start_mb": run.get("rss_start_mb"), "model_mb": run.get("model_memory_mb"),
            "wall_s": wall, "train_s": run["train_seconds"], "before": report["before"]["metrics"],
            "after": report["after"]["metrics"], "command": " ".join(cmd[1:])}


def table(rows: list[dict], metric: str) -> str:
    head = (f"| method | trainable params | % of total | saved MB | checkpoint MB | peak RSS MB | RSS growth MB | "
            f"model MB | wall s | {metric} before | {metric} after |\n|---|---|---|---|---|---|---|---|---|---|---|")
    gpu = any(r.get("peak_gpu_mb") for r in rows)
    if gpu:  # on a GPU the memory that counts is the device's, not the process's RSS
        head = head.replace("| model MB |", "| peak GPU MB (training) | model MB |").replace(
            "|---|---|---|---|---|---|---|---|---|---|---|", "|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |" + " |" * 9)
            continue
        growth = r["peak_rss_mb"] - r["rss_start_mb"] if r.get("rss_start_mb") else float("nan")
        lines.append(f"| {r['case']} | {r['params']['trainable']:,} | {r['params']['percent']:.3f} | {r['saved_mb']:.2f} | "
                     f"{r['checkpoint_mb']:.2f} | {r['peak_rss_mb']:.0f} | {growth:.0f} | "
                     + (f"{r.get('peak_gpu_mb') or float('nan'):.0f} ({r.get('train_peak_gpu_mb') or float('nan'):.0f}) | " if gpu else "")
                     + f"{r.get('model_mb') or float('nan'):.0f} | "
                     f"{r['wall_s']:.0f} | {r['before'][metric]:.3f} | {r['after'][metric]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--only", help="comma-separated case-name prefixes")
    ap.add_argument("--tag", default="", help="suffix for the results files, e.g. 'gpu' -> results/sft-gpu.md")
    # anything else (e.g. --model.name_or_path=X) is a config override passed to every case
    args, overrides = ap.parse_known_args()
    config, cases, budget, metric = SUITES[args.suite]
    budget = budget + overrides
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        cases = [c for c in cases if any(c[0].startswith(k) for k in keep)]
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case, method, lr in cases:
        print(f"[{args.suite}] {case} ...", flush=True)
        rows.append(run_case(args.suite, config, case, method, lr, budget))
        print("   ", {k: rows[-1].get(k) for k in ("error", "peak_rss_mb", "wall_s")},
              (rows[-1].get("after") or {}).get(metric), flush=True)
        name = f"{args.suite}-{args.tag}" if args.tag else args.suite
        (results_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
        (results_dir / f"{name}.md").write_text(
            f"Produced by `python bench/methods.py {args.suite}` on {config} with {' '.join(budget)}.\n\n{table(rows, metric)}\n")
    print(table(rows, metric))


if __name__ == "__main__":
    main()
