"""Training-step throughput of MiniLM + LoRA with and without the base model's and LoRA's dropout.

Run: .venv/bin/python bench/dropout_speed.py [--batch 16] [--length 384] [--steps 5]
Prints tokens/s for each setting and the ratio against the model's default dropout,
all measured in the same run (the figures behind the sentiment configs' model dropout: 0, and the
cost noted at their LoRA dropout: peft draws a mask over each adapted layer's whole input).
"""
from __future__ import annotations

import argparse
import time

import torch

from tunesmith.config import MethodConfig
from tunesmith.methods import apply_method
from tunesmith.models.load import load_model, resolve_model_path

# name: (load_model overrides, LoRA dropout)
SETTINGS = {
    "BERT defaults (attention 0.1, hidden 0.1)": ({}, 0.1),
    "attention dropout 0": ({"attention_dropout": 0.0}, 0.1),
    "all base dropout 0 (sentiment config)": ({"attention_dropout": 0.0, "dropout": 0.0}, 0.1),
    "all base dropout 0, LoRA dropout 0": ({"attention_dropout": 0.0, "dropout": 0.0}, 0.0),
}


def tokens_per_second(overrides: dict, lora_dropout: float, batch: int, length: int, steps: int) -> float:
    path = resolve_model_path("builtin:all-MiniLM-L6-v2")
    model = load_model(path, "classification", ["neg", "pos"], **overrides)
    model = apply_method(model, MethodConfig(r=8, dropout=lora_dropout, target_modules=["query", "key", "value", "dense"]),
                         "classification")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1000, 20000, (batch, length))
    labels = torch.randint(0, 2, (batch,))
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        if i == 1:
            start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad()
    return batch * length * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    results = {name: tokens_per_second(ov, d, a.batch, a.length, a.steps) for name, (ov, d) in SETTINGS.items()}
    base = next(iter(results.values()))
    print(f"MiniLM + LoRA r8 training step, batch {a.batch} x {a.length} tokens, {torch.get_num_threads()} threads")
    print(f"{'setting (LoRA dropout 0.1 unless stated)':45s} {'tokens/s':>9s} {'ratio':>6s}")
    for name, tps in results.items():
        print(f"{name:45s} {tps:9.0f} {tps / base:6.2f}x")


if __name__ == "__main__":
    main()
