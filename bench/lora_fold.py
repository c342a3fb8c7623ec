"""LoRA updates folded into the weight (tunesmith/methods/folded.py) against peft's two-path
forward, in the same run: evaluation, and a training step without LoRA dropout.

Run: .venv/bin/python bench/lora_fold.py [--n 300] [--repeats 4] [--steps 2]
all-MiniLM-L6-v2 + LoRA r 8 on all 37 "query|key|value|dense" layers (the shipped sentiment config's targets).
1. Evaluation: scores the same IMDB reviews (builtin:imdb, max length 512, left-truncated), B
   matrices random so the adapters matter; prints reviews/s and the two losses' difference.
2. Training step (LoRA dropout 0, base dropout 0): forward, backward and AdamW on 16 x 300 random
   tokens; prints tokens/s.
The settings alternate `--repeats` times, order flipped every other repeat; best of each is
compared and every repeat is printed. Ratios last.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from tunesmith.config import MethodConfig, load_config
from tunesmith.tasks import prepare_data
from tunesmith.evaluate import score_features
from tunesmith.methods import apply_method, folded
from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["query", "key", "value", "dense"]


def _alternate(settings: list[str], repeats: int):
    for r in range(repeats):
        yield from (settings if r % 2 == 0 else settings[::-1])


def evaluation(n: int, repeats: int) -> tuple[dict, str]:
    cfg = load_config(ROOT / "configs/sentiment-lora.yaml", [f"--data.test_size={n}", "--data.train_size=50",
                                                             "--data.val_size=10"])
    path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(path)
    data = prepare_data(cfg, tok)
    model = apply_method(load_model(path, "classification", data.labels, dropout=0.0, attention_dropout=0.0),
                         cfg.method, "classification")
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    feats = data.splits["test"].features
    acc = Accelerator(cpu=True)
    times: dict[str, list[float]] = {"peft, unfolded": [], "tunesmith, folded": []}
    losses: dict[str, float] = {}
    default = folded.MAX_FOLD_BYTES
    score_features(model, feats[:8], cfg, data.labels, tok.pad_token_id, acc)  # warm-up
    for name in _alternate(list(times), repeats):
        folded.MAX_FOLD_BYTES = 0 if "unfolded" in name else default
        start = time.perf_counter()
        losses[name] = score_features(model, feats, cfg, data.labels, tok.pad_token_id, acc)["loss"]
        times[name].append(time.perf_counter() - start)
    folded.MAX_FOLD_BYTES = default
    tokens = sum(len(f["input_ids"]) for f in feats)
    head = (f"1. evaluating {len(feats)} reviews ({tokens} tokens), batch {cfg.eval.batch_size}; "
            f"loss difference {abs(losses['peft, unfolded'] - losses['tunesmith, folded']):.1e}")
    return {k: (len(feats) / min(v), v) for k, v in times.items()}, head


def training(repeats: int, steps: int) -> tuple[dict, str]:
    path = resolve_model_path("builtin:all-MiniLM-L6-v2")
    model = apply_method(load_model(path, "classification", ["neg", "pos"], dropout=0.0, attention_dropout=0.0),
                         MethodConfig(r=8, dropout=0.0, target_modules=TARGETS), "classification").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    torch.manual_seed(0)
    ids, labels = torch.randint(1000, 20000, (16, 300)), torch.randint(0, 2, (16,))

    def step():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()

    times: dict[str, list[float]] = {"peft, unfolded": [], "tunesmith, folded": []}
    step()  # warm-up
    for name in _alternate(list(times), repeats):
        for m in model.modules():  # peft's own forward, then (for "folded") tunesmith's
            m.__dict__.pop("forward", None)
        if "unfolded" not in name:
            assert folded.install_training_fold(model) == 37  # 6 blocks x 6, and the pooler (a "dense")
        step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times[name].append((time.perf_counter() - start) / steps)
    return {k: (16 * 300 / min(v), v) for k, v in times.items()}, "2. training step, 16 x 300 tokens, LoRA dropout 0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="reviews scored per evaluation")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps per repeat")
    a = ap.parse_args()
    parts = [evaluation(a.n, a.repeats), training(a.repeats, a.steps)]
    print(f"\nMiniLM + LoRA r8 on 37 layers, {torch.get_num_threads()} threads, best of {a.repeats}")
    for (rows, head), unit in zip(parts, ("reviews/s", "tokens/s")):
        print(head)
        print(f"   {'setting':20s} {unit:>10s}  every repeat (s)")
        for name, (rate, ts) in rows.items():
            print(f"   {name:20s} {rate:10.1f}  {' '.join(f'{t:.2f}' for t in ts)}")
    for (rows, head), what in zip(parts, ("evaluation", "training step")):
        base, new = (rate for rate, _ in rows.values())
        print(f"ratio, {what} (folded over unfolded): {new / base:.2f}x")


if __name__ == "__main__":
    main()
