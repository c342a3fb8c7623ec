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


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts left-padded for generation: ids and attention mask, (B, P) each."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return ids, attn


def collate(features: list[dict[str, Any]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of features to the batch's longest sequence (or to `width`: a data-parallel
    process pads its share as the whole batch is padded, so each row computes as on one process)."""
    width = max(width or 0, max(len(f["input_ids"]) for f in features))
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
    if "label" in features[0]:  # a class id, or a regression target
        kind = torch.float if isinstance(features[0]["label"], float) else torch.long
        out["label"] = torch.tensor([f["label"] for f in features], dtype=kind)  # (B,)
    return out


def collate_rows(features: list[dict[str, Any]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Preference features (several rows each: chosen/rejected, ...) -> one padded batch.

    Rows are stacked role by role: with B pairs, rows 0..B-1 are the chosen and B..2B-1 the
    rejected responses, so a single forward pass scores both and `.chunk(2)` splits them.
    Per-feature numbers (weight, margin, desirable) become (B,) tensors; "ref" (one reference
    log-prob per row) becomes (R * B,) in row order.
    """
    n_rows = len(features[0]["rows"])
    out = collate([f["rows"][r] for r in range(n_rows) for f in features], pad_id, width)
    for key in features[0]:
        if key == "ref":
            out["ref"] = torch.tensor([f["ref"][r] for r in range(n_rows) for f in features], dtype=torch.float)
        elif key != "rows":
            out[key] = torch.tensor([f[key] for f in features], dtype=torch.float)
    return out


def collate_any(features: list[dict[str, Any]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    return collate_rows(features, pad_id, width) if "rows" in features[0] else collate(features, pad_id, width)


def padded_width(features: list[dict[str, Any]]) -> int:
    """The width collate_any pads these features to."""
    return max(len(r["input_ids"]) for f in features for r in (f["rows"] if "rows" in f else [f]))


def feature_length(f: dict[str, Any]) -> int:
    """Tokens a feature puts through the model (for length-grouped batching)."""
    return sum(len(r["input_ids"]) for r in f["rows"]) if "rows" in f else len(f["input_ids"])


def split_by_tokens(feats: list[dict[str, Any]], max_tokens: int | None) -> list[list[dict[str, Any]]]:
    """A micro-batch cut into pieces of at most `max_tokens` padded tokens (examples x longest), longest
    first; a piece holds at least one example. Activation memory grows with a piece's padded tokens,
    so this bounds it; the loop accumulates the pieces' gradients within one step, so the update is
    the whole micro-batch's up to float rounding (losses are sums over a step-wide count)."""
    if max_tokens is None or len(feats) * max((feature_length(f) for f in feats), default=0) <= max_tokens:
        return [feats]
    pieces: list[list[dict[str, Any]]] = []
    for f in sorted(feats, key=feature_length, reverse=True):
        # longest first: a piece's longest example is its first, so its padded size is len x that
        if pieces and (len(pieces[-1]) + 1) * feature_length(pieces[-1][0]) <= max_tokens:
            pieces[-1].append(f)
        else:
            pieces.append([f])
    return pieces
