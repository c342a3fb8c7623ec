"""Time-to-accuracy on IMDB sentiment: the tutorial `transformers.Trainer` + peft recipe against tunesmith.

    python bench/time_to_accuracy.py            # the full comparison (about 2 h on 2 cores: the baseline alone about 100 min)
    python bench/time_to_accuracy.py --quick    # 200 / 200 reviews, 2 epochs vs 1: a smoke run

Each side appends every evaluation to bench/results/time_to_accuracy-SIDE.progress.jsonl as it
happens, so a run cut short keeps what it reached.

Both sides get the same 1,000 training and 1,000 held-out IMDB reviews (builtin:imdb, disjoint,
drawn with a fixed seed) and evaluate held-out accuracy as they train.

Baseline, re-implemented faithfully from the recipe the tutorials teach: all-MiniLM-L6-v2 with the
model's own dropout, LoRA r 4, alpha 32, dropout 0.01 on the query projections, lr 1e-3 (linear
decay, no warmup), batch 4, 10 epochs, weight decay 0.01, evaluation and a checkpoint every
epoch, `load_best_model_at_end` on the lowest eval loss (Trainer's default criterion), max length
512 with left truncation, dynamic padding (DataCollatorWithPadding), uniform shuffling.

tunesmith: `configs/sentiment-lora.yaml` as shipped (LoRA r 8 on every attention and dense layer,
base dropout off, length-grouped batches of 16, 3 epochs, lr 1e-3 with warmup, max length 512
left-truncated, fp32 or bf16 as `precision: auto` picks), evaluating every half epoch and keeping
the checkpoint with the best held-out accuracy. `--first CONFIG` (with `--first-set`) makes it two
runs: CONFIG first, then `--config` starting from the model CONFIG saved, on one clock.

Both sides select their kept model on the held-out set (as the tutorial does), so "kept" accuracy
is optimistic for both alike. The clock of each side starts with its first training step and runs
through its evaluations and checkpoint saves; model loading and tokenisation are outside it.
Each side runs in its own process. The table, then the ratios, come last.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:all-MiniLM-L6-v2"
LABELS = ["negative", "positive"]


def write_split(out: Path, n_train: int, n_heldout: int, seed: int = 0) -> None:
    """The same disjoint train / held-out reviews for both sides, as JSONL (text, label name)."""
    from tunesmith import assets

    src = assets.data_source("builtin:imdb")
    with open(src["path"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "imdb"]
    random.Random(seed).shuffle(rows)
    for name, part in (("train", rows[:n_train]), ("heldout", rows[n_train:n_train + n_heldout])):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps({"text": r["text"], "label": LABELS[int(r["label"])]}) + "\n")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress(path: Path | None, row: dict) -> None:
    """Append one evaluation to the side's progress file as it happens, so a run cut short
    (the full comparison takes about two hours) still leaves every evaluation it reached."""
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run_flops(model, tok, data: Path, epochs: float, n_evals: int) -> float:
    """Model FLOPs of a side's training and evaluations up to its last evaluation, for its
    utilisation figure.

    Per token, the matmul FLOPs of one training step (forward + backward) and of one evaluation
    forward are counted by FlopCounterMode on one real review with the side's own model: frozen
    layers cost no weight gradient, LoRA's extra matmuls are counted, so the recipes differ as
    they really do. Attention's two seq^2 matmuls are added per review by formula (the CPU
    attention kernel is invisible to the counter; bench/stepbench.py). Real tokens only: padding
    is work that does not count, as usual for MFU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stepbench import _fused_attention_ops, _no_flops, attention_flops

    def length(text: str) -> int:
        return len(tok(text, truncation=True, max_length=512)["input_ids"])

    probe = _read(data / "heldout.jsonl")[0]["text"]
    enc = tok(probe, truncation=True, max_length=512, return_tensors="pt")
    n0 = enc["input_ids"].shape[1]
    mapping = {op: _no_flops for op in _fused_attention_ops()}
    model.train()
    with FlopCounterMode(display=False, custom_mapping=mapping) as c:
        model(**enc, labels=torch.tensor([0])).loss.backward()
    per_train = c.get_total_flops() / n0
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as c:
        model(**enc)
    per_eval = c.get_total_flops() / n0
    config = model.config if hasattr(model.config, "num_hidden_layers") else model.base_model.model.config

    def one_pass(name: str, per_token: float, attention_share: float) -> float:
        return sum(per_token * n + attention_share * attention_flops(config, n, 1)
                   for n in map(length, (r["text"] for r in _read(data / f"{name}.jsonl"))))

    # attention_flops is forward + backward (3x the forward's score and mix matmuls)
    return epochs * one_pass("train", per_train, 1.0) + n_evals * one_pass("heldout", per_eval, 1 / 3)


def run_baseline(data: Path, epochs: int, progress: Path | None = None) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sklearn.metrics import accuracy_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from tunesmith.models.load import resolve_model_path

    path = resolve_model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    tok.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32, lora_dropout=0.01,
                                             target_modules=["query"]))

    def dataset(name: str) -> Dataset:
        rows = _read(data / f"{name}.jsonl")
        ds = Dataset.from_list([{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=512), batched=True, remove_columns=["text"])

    def compute_metrics(p):
        return {"accuracy": accuracy_score(p.label_ids, np.argmax(p.predictions, axis=1))}

    evals: list[dict] = []

    class Clock(TrainerCallback):
        start = 0.0

        def on_train_begin(self, args, state, control, **kw):
            Clock.start = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            evals.append({"epoch": state.epoch, "elapsed_s": time.perf_counter() - Clock.start,
                          "accuracy": metrics["eval_accuracy"], "loss": metrics["eval_loss"]})
            _progress(progress, evals[-1])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, learning_rate=1e-3, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=4, num_train_epochs=epochs, weight_decay=0.01,
                                 eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                                 report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset("train"), eval_dataset=dataset("heldout"),
                          processing_class=tok, data_collator=DataCollatorWithPadding(tok), compute_metrics=compute_metrics,
                          callbacks=[Clock()])
        trainer.train()
    kept = min(evals, key=lambda e: e["loss"])  # load_best_model_at_end keeps the lowest eval loss
    flops = run_flops(trainer.model, tok, data, evals[-1]["epoch"], len(evals))
    return {"side": "transformers Trainer + peft (tutorial recipe)", "evals": evals, "kept_accuracy": kept["accuracy"],
            "kept_epoch": kept["epoch"], "flops": flops}


def _train_stage(data: Path, out: Path, name: str, config: Path, overrides: list[str], progress: Path | None,
                 clock_zero: float | None = None, epoch_offset: float = 0.0):
    """One tunesmith run on the split, evaluating the held-out set twice an epoch.

    Returns the run, its evaluations and the wall time its clock started. With `clock_zero` (an
    earlier stage's start), the evaluations' times count from then and their epochs continue
    from `epoch_offset`: a second stage continues the first one's clock."""
    from tunesmith.config import load_config
    from tunesmith.train import train

    t = load_config(config, overrides).train
    steps_per_epoch = -(-len(_read(data / 'train.jsonl')) // t.batch_size) // t.grad_accum
    eval_every = max(1, steps_per_epoch // 2)  # twice an epoch
    evals: list[dict] = []
    start: list[float] = []  # this stage's clock start (wall), known from its first evaluation

    def on_event(e: dict) -> None:
        if e.get("kind") == "eval" and "accuracy" in e:
            start[:] = start or [time.time() - e["elapsed_s"]]
            shift = start[0] - clock_zero if clock_zero is not None else 0.0
            evals.append({"epoch": round(e["epoch"] + epoch_offset, 3), "elapsed_s": round(e["elapsed_s"] + shift, 2),
                          "accuracy": e["accuracy"], "loss": e["loss"]})
            _progress(progress, evals[-1])

    res = train(config, [*overrides,
        f"--data.train={data / 'train.jsonl'}", f"--data.validation={data / 'heldout.jsonl'}",
        f"--data.test={data / 'heldout.jsonl'}", f"--data.labels={json.dumps(LABELS)}",
        f"--train.eval_every={eval_every}", "--eval.before=false", "--eval.samples=[]",
        f"--output.dir={out}/{{name}}", f"--output.name={name}"], on_event=on_event)
    return res, evals, start[0]


def run_tunesmith(data: Path, epochs: int | None, out: Path, progress: Path | None = None,
                  config: Path = ROOT / "configs/sentiment-lora.yaml", overrides: list[str] = (),
                  first: Path | None = None, first_overrides: list[str] = ()) -> dict:
    """tunesmith's side: `config`; or `first`, then `config` started from the model `first` trained
    (for example the head and top blocks on the frozen-bottom cache, then LoRA everywhere: LP-FT,
    Kumar et al. 2022). The second stage's clock continues from the first stage's start, so all
    that happens in between (the first stage's final evaluation and save, loading the second
    stage's model, tokenising) counts against tunesmith."""
    overrides = [*overrides, *([f"--train.epochs={epochs}"] if epochs else [])]
    evals, clock_zero, epoch_offset, side = [], None, 0.0, "tunesmith ("
    if first is not None:
        first_overrides = [*first_overrides, *([f"--train.epochs={epochs}"] if epochs else [])]
        first_run, evals, clock_zero = _train_stage(data, out, "tta-first", first, first_overrides, progress)
        epoch_offset = evals[-1]["epoch"]
        side += f"{Path(first).name}{' ' + ' '.join(first_overrides) if first_overrides else ''}, then "
    side += f"{Path(config).name}{' ' + ' '.join(overrides) if overrides else ''}"
    side += " from the model stage 1 saved)" if first is not None else ")"
    if first is not None:  # a finished run folder is a base (models/load.py)
        overrides = [*overrides, f"--model.name_or_path={first_run.run_dir}"]
    res, last, _ = _train_stage(data, out, "tta", config, overrides, progress, clock_zero, epoch_offset)
    flops = None
    if first is None:  # (a first stage on the frozen-bottom cache skips work a plain count would include)
        from tunesmith.runs import load_run

        loaded = load_run(res.run_dir)
        for name, p in loaded.model.named_parameters():  # as it trained: the adapter and the head
            p.requires_grad = "lora_" in name or "modules_to_save" in name
        flops = run_flops(loaded.model, loaded.tokenizer, data, last[-1]["epoch"], len(last))
    return {"side": side, "evals": [*evals, *last], "kept_accuracy": res.after["metrics"]["accuracy"],
            "kept_epoch": max(last, key=lambda e: e["accuracy"])["epoch"], "precision": res.summary.get("precision"),
            "flops": flops}


def first_best(evals: list[dict]) -> dict:
    best = max(e["accuracy"] for e in evals)
    return next(e for e in evals if e["accuracy"] == best)


def first_reaching(evals: list[dict], target: float) -> dict | None:
    return next((e for e in evals if e["accuracy"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 / 200 reviews; baseline 2 epochs, tunesmith 1")
    ap.add_argument("--baseline-first", action="store_true",
                    help="run the baseline's side first (tunesmith's is shorter and goes first by default)")
    ap.add_argument("--config", default=str(ROOT / "configs/sentiment-lora.yaml"),
                    help="tunesmith's side: the config it runs (default: the shipped main job)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="--KEY=VALUE",
                    help="an override for tunesmith's side, as on the CLI (repeatable), e.g. --set=--train.epochs=5")
    ap.add_argument("--first", help="tunesmith's side: a config to run first; --config then starts from the model it trained")
    ap.add_argument("--first-set", dest="first_overrides", action="append", default=[], metavar="--KEY=VALUE",
                    help="an override for the --first config (repeatable)")
    ap.add_argument("--side", choices=["baseline", "tunesmith"],
                    help="run one side only (for trying configs; the ratio needs both in one run)")
    ap.add_argument("--tag", help="appended to the result files' names")
    ap.add_argument("--worker", choices=["baseline", "tunesmith"], help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # tunesmith's epochs come from its config, except in the quick smoke run
    n, base_epochs, ts_epochs = (200, 2, 1) if args.quick else (1000, 10, None)
    if args.worker:
        data, progress = Path(args.data), Path(args.progress) if args.progress else None
        result = (run_baseline(data, base_epochs, progress) if args.worker == "baseline"
                  else run_tunesmith(data, ts_epochs, Path(args.out).parent, progress, Path(args.config), args.overrides,
                                    Path(args.first) if args.first else None, args.first_overrides))
        Path(args.out).write_text(json.dumps(result))
        return

    results = {}
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = "time_to_accuracy-quick" if args.quick else "time_to_accuracy"
    tag += f"-{args.side}-only" if args.side else ""  # never overwrite a full comparison's files
    tag += f"-{args.tag}" if args.tag else ""
    # tunesmith first by default: the shorter run shows problems sooner
    sides = ("baseline", "tunesmith") if args.baseline_first else ("tunesmith", "baseline")
    sides = (args.side,) if args.side else sides
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_split(data, n, n)
        for side in sides:
            out = data / f"{side}.json"
            progress = results_dir / (f"{tag}.progress.jsonl" if args.side else f"{tag}-{side}.progress.jsonl")
            progress.unlink(missing_ok=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--worker", side, "--data", str(data), "--out", str(out),
                            "--progress", str(progress), "--config", args.config]
                           + [f"--set={o}" for o in args.overrides] + (["--first", args.first] if args.first else [])
                           + [f"--first-set={o}" for o in args.first_overrides] + (["--quick"] if args.quick else []),
                           cwd=ROOT, check=True)
            results[side] = json.loads(out.read_text()) | {"process_s": time.perf_counter() - t0}
    from stepbench import machine, matmul_peak  # bench/ is on sys.path: this script lives there

    device, _ = machine()
    # The MFU denominator, measured in this run, in each side's precision (the baseline's is fp32).
    peaks = {prec: matmul_peak(prec) for prec in {r.get("precision") or "fp32" for r in results.values()}}
    peak = peaks.get("fp32") or next(iter(peaks.values()))
    print(f"\nIMDB sentiment, {n} train / {n} held-out reviews, {device}\n")
    for side, r in results.items():
        print(f"{r['side']}: held-out accuracy by time")
        print("  " + ", ".join(f"ep {e['epoch']:.2f}: {e['accuracy']:.3f} at {e['elapsed_s']:.0f} s" for e in r["evals"]))
        if r.get("flops"):  # model FLOPs up to the last evaluation over that clock, over the matmul peak
            prec = r.get("precision") or "fp32"
            r["mfu"] = r["flops"] / r["evals"][-1]["elapsed_s"] / peaks[prec]
            print(f"  utilisation over its clock (training and evaluations): {r['flops'] / 1e12:.1f} TFLOP in "
                  f"{r['evals'][-1]['elapsed_s']:.0f} s = {r['flops'] / r['evals'][-1]['elapsed_s'] / 1e9:.1f} GFLOP/s, "
                  f"MFU {r['mfu']:.0%} of a {peaks[prec] / 1e9:.0f} GFLOP/s {prec} matmul peak")
    if args.side:  # one side: its evaluations above are the result; no ratio without the other side
        r = results[args.side]
        print(f"best {first_best(r['evals'])['accuracy']:.3f}, kept {r['kept_accuracy']:.3f}, whole process {r['process_s']:.0f} s")
        (results_dir / f"{tag}.json").write_text(json.dumps(
            {"device": device, "date": time.strftime("%Y-%m-%d"), "n": n, "peak_flops": peaks, "results": results}, indent=2))
        return
    base, ours = results["baseline"], results["tunesmith"]
    bb, ob = first_best(base["evals"]), first_best(ours["evals"])
    reach = first_reaching(ours["evals"], bb["accuracy"])
    print("\n| side | best held-out accuracy | first reached at | kept model's accuracy | whole process s |\n|---|---|---|---|---|")
    for r, b in ((base, bb), (ours, ob)):
        print(f"| {r['side']} | {b['accuracy']:.3f} | {b['elapsed_s']:.0f} s (epoch {b['epoch']:.2f}) | "
              f"{r['kept_accuracy']:.3f} | {r['process_s']:.0f} |")
    print(f"\nbaseline best {bb['accuracy']:.3f} first reached: baseline {bb['elapsed_s']:.0f} s, tunesmith "
          + (f"{reach['elapsed_s']:.0f} s -> {bb['elapsed_s'] / reach['elapsed_s']:.1f}x sooner (target 10x)"
             if reach else "never (within its epochs)"))
    print(f"kept model: tunesmith {ours['kept_accuracy']:.3f} (target 0.87), baseline {base['kept_accuracy']:.3f}")
    (results_dir / f"{tag}.json").write_text(json.dumps(
        {"device": device, "date": time.strftime("%Y-%m-%d"), "n": n, "peak_flops": peaks, "results": results}, indent=2))


if __name__ == "__main__":
    main()
