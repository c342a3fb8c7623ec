"""One epoch of training data from several weighted sources, in random or curriculum order.

data.train as a list of {path, weight} mixes sources; each training feature knows its source
(Split.sources). A weight scales how much of its source one epoch sees (data.mix):
  - repeat: weight 2.5 = every example twice plus a random half once more, the same half every
    epoch (chosen with data.seed): a fixed, reproducible dose, like writing the data out 2.5 times.
  - sample: every epoch draws round(weight x size) examples afresh (without replacement up to the
    source's size, with replacement beyond): a down-weighted source shows different examples
    each epoch, so over several epochs all of it is used.
Order within the epoch (data.order): random (batches of similar length with
train.group_by_length), short_to_long (fewest tokens first), or score (ascending data.score_column).
Everything is deterministic in (seed, epoch), so a resumed run sees the same batches.
"""
from __future__ import annotations

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.collate import batch_order


def epoch_indices(n: int, sources: list[int] | None, weights: list[float], mix: str, seed: int,
                  epoch: int) -> list[int]:
    """Which of the n features (with repeats) make up epoch `epoch`, before ordering."""
    if sources is None or all(w == 1.0 for w in weights):
        return list(range(n))
    src = np.asarray(sources)
    out: list[int] = []
    for k, w in enumerate(weights):
        idx = np.flatnonzero(src == k)
        n = len(idx)
        if mix == "repeat":
            whole, frac = int(w), w - int(w)
            extra = np.random.default_rng([seed, k]).permutation(n)[: round(frac * n)]  # the same every epoch
            out += np.tile(idx, whole).tolist() + idx[np.sort(extra)].tolist()
        else:
            take = round(w * n)
            rng = np.random.default_rng([seed, k, epoch])
            out += idx[rng.choice(n, take, replace=take > n)].tolist() if n else []
    return out


def epoch_batches(lengths: list[int], sources: list[int] | None, scores: list[float] | None, d: DataConfig,
                  batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The batches (feature indices) of one training epoch."""
    weights = [s.weight for s in d.sources()]
    idx = epoch_indices(len(lengths), sources, weights, d.mix, d.seed, epoch)
    if d.order == "random":
        sub = [lengths[i] for i in idx]
        return [[idx[j] for j in b] for b in batch_order(sub, batch_size, shuffle=True, seed=seed, epoch=epoch,
                                                         group_by_length=group_by_length)]
    key = np.array([lengths[i] for i in idx] if d.order == "short_to_long" else [scores[i] for i in idx], dtype=float)
    tie = np.random.default_rng([seed, epoch]).permutation(len(idx))  # ties in random order
    order = np.lexsort((tie, key))
    ordered = [idx[j] for j in order]
    return [ordered[i: i + batch_size] for i in range(0, len(ordered), batch_size)]
