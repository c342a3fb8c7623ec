"""Objectives: one small function per task, (model, batch) -> summed loss and counts.

Losses are returned as sums with their counts, not means: the loop divides by the count of
the whole accumulated step, so batch 1 x accum 8 gives the same gradient as batch 8 x accum 1
even when sequences have different numbers of target tokens.
"""
from __future__ import annotations

import inspect
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
    """Next-token cross-entropy on positions whose label is not IGNORE (SFT masks the prompt).

    The vocabulary projection is the biggest activation of a small LM (B x T x 49k for SmolLM2),
    so where the model supports `logits_to_keep` we ask only for the positions from the batch's
    first target onwards: prompt tokens of SFT need no logits at all.
    """
    ids = batch["input_ids"]
    T = ids.shape[1]
    labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from positions < t
    keep = labels != IGNORE  # (B, T-1)
    wanted = keep.any(0).nonzero()
    k = T - int(wanted[0]) if len(wanted) and _takes_logits_to_keep(model) else T
    kwargs = {"logits_to_keep": k} if k < T else {}
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], **kwargs).logits  # (B, [P+]T or k, V)
    # Prompt / P-tuning prepend P virtual tokens and return their logits too: keep the last k.
    logits = logits[:, -k:]  # (B, k, V): positions T-k .. T-1
    picked = logits[:, :-1][keep[:, T - k:]].float()  # (N, V): only positions that carry a loss
    target = labels[:, T - k:][keep[:, T - k:]]  # (N,)
    loss = F.cross_entropy(picked, target, reduction="sum")
    correct = int((picked.argmax(-1) == target).sum())
    return LossOut(loss, int(target.numel()), correct)


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _takes_logits_to_keep(model) -> bool:
    """Whether the underlying transformers model's forward takes `logits_to_keep` (most causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    if type(base) not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[type(base)] = "logits_to_keep" in inspect.signature(base.forward).parameters
    return _LOGITS_TO_KEEP[type(base)]


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
