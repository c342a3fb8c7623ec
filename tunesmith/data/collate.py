"""Batches: length-grouped order and dynamic padding (pad to the longest in the batch only)."""
from __future__ import annotations

import random
from typing import Any

import torch

from tunesmith.data.tokenize import IGNORE


def batch_order(lengths: list[int], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                group_by_length: bool = True) -> list[list[int]]:
    """Indices grouped into batches; deterministic in (seed, epoch) so a resumed run sees the same order.

    With group_by_length, examples are shuffled, cut into mega-batches of 50 batches, sorted by
    length inside each, and the batches shuffled again: similar lengths share a batch (little
    padding) while the order stays random (the Trainer's LengthGroupedSampler idea).
    """
    idx = list(range(len(lengths)))
    rng = random.Random(seed * 100_003 + epoch)
    if not shuffle:
        if group_by_length:
            idx.sort(key=lambda i: -lengths[i])  # evaluation: longest first, least padding
        return [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(idx)
    if group_by_length:
        mega = batch_size * 50
        idx = [i for s in range(0, len(idx), mega) for i in sorted(idx[s: s + mega], key=lambda i: -lengths[i])]
    batches = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features to the batch's longest sequence."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(features), width), dtype=torch.long)  # (B, T) 1 = real token
    out: dict[str, torch.Tensor] = {}
    if "labels" in features[0]:
        out["labels"] = torch.full((len(features), width), IGNORE, dtype=torch.long)  # (B, T)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        if "labels" in f:
            out["labels"][i, :n] = torch.tensor(f["labels"])
    out["input_ids"], out["attention_mask"] = ids, mask
    if "label" in features[0]:
        out["label"] = torch.tensor([f["label"] for f in features], dtype=torch.long)  # (B,)
    return out
