"""Evaluation speed of a LoRA classifier with the adapters folded into the weights, against peft's
unfolded forward, in the same run (tunesmith/methods/folded.py).

Run: .venv/bin/python bench/eval_fold.py [--n 300] [--repeats 2]
Scores the same IMDB reviews (builtin:imdb, max length 512, left-truncated, as the shipped
sentiment config) with all-MiniLM-L6-v2 + LoRA r 8 on all 36 linear layers, its B matrices
random so the adapters matter. The two settings alternate `--repeats` times; it prints
examples/s for each, the largest difference between their losses, and the ratio last.
"""
from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

from tunesmith.config import load_config
from tunesmith.data import prepare_data
from tunesmith.evaluate import score_features
from tunesmith.methods import apply_method, folded
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="reviews scored per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    cfg = load_config(ROOT / "configs/sentiment-lora.yaml", [f"--data.test_size={a.n}", "--data.train_size=50",
                                                             "--data.val_size=10"])
    path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(path)
    data = prepare_data(cfg, tok)
    model = load_model(path, "classification", data.labels, dropout=0.0, attention_dropout=0.0)
    model = apply_method(model, cfg.method, "classification")
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    feats = data.splits["test"].features
    acc = Accelerator(cpu=True)
    tokens = sum(len(f["input_ids"]) for f in feats)
    times: dict[str, list[float]] = {"peft, unfolded": [], "tunesmith, folded": []}
    losses: dict[str, float] = {}
    default = folded.MAX_FOLD_BYTES
    score_features(model, feats[:8], cfg, data.labels, tok.pad_token_id, acc)  # warm-up
    for r in range(a.repeats):
        for name in (list(times) if r % 2 == 0 else list(times)[::-1]):  # alternate the order too
            folded.MAX_FOLD_BYTES = default if "folded" in name and "unfolded" not in name else 0
            start = time.perf_counter()
            losses[name] = score_features(model, feats, cfg, data.labels, tok.pad_token_id, acc)["loss"]
            times[name].append(time.perf_counter() - start)
    folded.MAX_FOLD_BYTES = default
    print(f"MiniLM + LoRA r8 (36 layers), evaluating {len(feats)} reviews ({tokens} tokens), "
          f"batch {cfg.eval.batch_size}, {torch.get_num_threads()} threads, best of {a.repeats}")
    print(f"{'setting':20s} {'seconds':>8s} {'reviews/s':>10s} {'loss':>9s}  every repeat (s)")
    for name, ts in times.items():
        print(f"{name:20s} {min(ts):8.2f} {len(feats) / min(ts):10.1f} {losses[name]:9.5f}  {' '.join(f'{t:.1f}' for t in ts)}")
    base, new = (min(ts) for ts in times.values())
    print(f"loss difference {abs(losses['peft, unfolded'] - losses['tunesmith, folded']):.2e}")
    print(f"ratio (folded over unfolded, reviews/s): {base / new:.2f}x")


if __name__ == "__main__":
    main()
