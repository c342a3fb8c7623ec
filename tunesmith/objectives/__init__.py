"""Objectives: one small function per task, (model, batch) -> summed loss and counts.

Losses are returned as sums with their counts, not means: the loop divides by the count of
the whole accumulated step, so batch 1 x accum 8 gives the same gradient as batch 8 x accum 1
even when sequences have different numbers of target tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE


@dataclass
class LossOut:
    loss_sum: torch.Tensor  # scalar, summed over counted items
    count: int  # examples (classification) or target tokens (LM)
    correct: int  # argmax hits among counted items
    logits: torch.Tensor | None = None  # classification: (B, C) for metrics
    extras: dict[str, float] = field(default_factory=dict)  # other per-item sums to average (e.g. reward margins)


def classification(model, batch: dict[str, torch.Tensor]) -> LossOut:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
    logits = logits.float()
    loss = F.cross_entropy(logits, batch["label"], reduction="sum")
    correct = int((logits.argmax(-1) == batch["label"]).sum())
    return LossOut(loss, int(batch["label"].numel()), correct, logits.detach())


def causal_lm(model, batch: dict[str, torch.Tensor]) -> LossOut:
    """Next-token cross-entropy on positions whose label is not IGNORE (SFT masks the prompt)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, P+T, V)
    # Prompt / P-tuning prepend P virtual tokens and return their logits too: keep the last T.
    logits = logits[:, -batch["input_ids"].shape[1]:]  # (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from positions < t
    keep = labels != IGNORE  # (B, T-1)
    picked = logits[:, :-1][keep].float()  # (N, V): only positions that carry a loss
    target = labels[keep]  # (N,)
    loss = F.cross_entropy(picked, target, reduction="sum")
    correct = int((picked.argmax(-1) == target).sum())
    return LossOut(loss, int(target.numel()), correct)


def for_task(task: str, pref=None) -> Callable[[object, dict[str, torch.Tensor]], LossOut]:
    """The objective of a task; preference tasks take their settings (cfg.pref)."""
    if task == "classification":
        return classification
    if task in ("sft", "cpt"):
        return causal_lm
    from tunesmith.pref.objectives import pref_objective
    return pref_objective(task, pref)


def count_items(task: str, batch: dict[str, torch.Tensor]) -> float:
    """How many items a batch contributes to the loss denominator (known before the forward pass):
    examples (classification), target tokens (LMs), or the summed weights of pairs (preferences)."""
    if task == "classification":
        return int(batch["label"].numel())
    if "weight" in batch:
        return float(batch["weight"].sum())
    return int((batch["labels"][:, 1:] != IGNORE).sum())
