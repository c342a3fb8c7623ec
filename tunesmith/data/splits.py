"""Seeded train/validation/test splits from one file, stratified for classification."""
from __future__ import annotations

from typing import TypeVar

from sklearn.model_selection import train_test_split

from tunesmith.errors import TunesmithError

T = TypeVar("T")


def _count(size: int | float | None, pool: int) -> int:
    if size is None:
        return 0
    return int(round(size * pool)) if isinstance(size, float) else int(size)


def take(items: list[T], size: int | float | None, seed: int, labels: list[int] | None, what: str) -> tuple[list[T], list[T]]:
    """Split `size` items (count or fraction) off `items`; returns (taken, rest).

    Stratified by `labels` when given, so every split keeps the class balance.
    """
    n = _count(size, len(items))
    if n <= 0:
        return [], items
    if n >= len(items):
        raise TunesmithError(f"{what}: asked for {n} examples but only {len(items)} are available")
    idx = list(range(len(items)))
    strat = labels if labels is not None and len(set(labels)) > 1 and min(labels.count(l) for l in set(labels)) >= 2 else None
    rest_idx, taken_idx = train_test_split(idx, test_size=n, random_state=seed, stratify=strat)
    return [items[i] for i in sorted(taken_idx)], [items[i] for i in sorted(rest_idx)]
