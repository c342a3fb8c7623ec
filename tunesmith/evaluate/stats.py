"""Intervals and tests over per-example scores: bootstrap, McNemar, paired comparisons.

An evaluation result carries its per-example scores as *row groups* (tasks/base.py, RowGroup):
columns of numbers, one entry per evaluated unit (an example, a text block, a question), and for
each metric a reducer spec, e.g. {"accuracy": ["share", "correct"], "perplexity": ["exp_ratio",
"loss", "tokens"]}. Every reducer is a function of weighted column sums, so a bootstrap resample
is a weight vector (how often each unit was drawn) and R resamples are one (R, N) @ (N,) product
per column: 1,000 resamples of 25,000 examples take well under a second.

Conventions (stated in the report):
- 95% intervals are bootstrap percentile intervals over units (Efron & Tibshirani 1993, ch. 13),
  `resamples` draws with a fixed seed, so a report is reproducible.
- The change after - before is *paired* when both sides scored the same units: one set of
  resampling weights is applied to both (Koehn 2004's paired bootstrap). Its p-value is the
  smallest two-sided level at which the percentile interval of the change excludes 0, so "the
  interval excludes 0" and "p < 0.05" always agree.
- A metric declared as the share of a 0/1 column (reducer "share": accuracy, exact match) is tested with McNemar's test
  on the discordant pairs, exact binomial with the mid-p correction (Fagerland, Lydersen & Laake
  2013: the mid-p keeps the level and has more power than the exact test).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy.stats import binom

ECE_BINS = 15
Cols = dict[str, np.ndarray]


def _sum(cols: Cols, w: np.ndarray, name: str) -> np.ndarray:
    return w @ cols[name]  # (R,)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), np.nan)


def _mean(cols: Cols, w: np.ndarray, x: str) -> np.ndarray:
    return _div(_sum(cols, w, x), w.sum(1))


def _ratio(cols: Cols, w: np.ndarray, num: str, den: str) -> np.ndarray:
    return _div(_sum(cols, w, num), _sum(cols, w, den))


def _exp_ratio(cols: Cols, w: np.ndarray, num: str, den: str) -> np.ndarray:
    return np.exp(np.minimum(_ratio(cols, w, num, den), 50.0))  # as lm_metrics caps it


def _sqrt_mean(cols: Cols, w: np.ndarray, x: str) -> np.ndarray:
    return np.sqrt(_mean(cols, w, x))


def _per_class(cols: Cols, w: np.ndarray, y: str, p: str, classes: int) -> tuple[np.ndarray, ...]:
    """True positives, predicted and true counts per class: three (R, C) arrays."""
    yt, yp = cols[y].astype(int), cols[p].astype(int)
    eye = np.eye(int(classes))
    true_1h, pred_1h = eye[yt], eye[yp]  # (N, C)
    return w @ (true_1h * pred_1h), w @ pred_1h, w @ true_1h


def _macro(kind: str) -> Callable[..., np.ndarray]:
    """scikit-learn's macro precision / recall / F1 with zero_division=0: every class counts,
    one with no prediction (or no example) scores 0. F1 = 2 TP / (predicted + true) is the
    harmonic mean of precision and recall, and 0 where both are."""

    def reduce(cols: Cols, w: np.ndarray, y: str, p: str, classes: int) -> np.ndarray:
        tp, pred, true = _per_class(cols, w, y, p, classes)
        den = {"precision": pred, "recall": true, "f1": (pred + true) / 2}[kind]
        return np.nan_to_num(_div(tp, den), nan=0.0).mean(1)
    return reduce


def ece_bins(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Bin index of each confidence: equal-width bins (e_k, e_k+1] with e = linspace(0, 1, B + 1),
    the first one closed at 0 (Guo et al. 2017, section 2; torchmetrics bins the same way)."""
    return np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence, side="left")


def _ece(cols: Cols, w: np.ndarray, conf: str, correct: str, bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by the
    bin's share, = sum_b |sum_{i in b} (correct_i - conf_i)| / N (Guo et al. 2017, eq. 3)."""
    onehot = np.eye(int(bins))[ece_bins(cols[conf], int(bins))]  # (N, B)
    gap = w @ (onehot * (cols[correct] - cols[conf])[:, None])  # (R, B)
    return np.abs(gap).sum(1) / w.sum(1)


def _pearson(cols: Cols, w: np.ndarray, x: str, y: str) -> np.ndarray:
    """Pearson's r from weighted sums of x, y, x^2, y^2, xy."""
    n = w.sum(1)
    a, b = cols[x], cols[y]
    sx, sy, sxx, syy, sxy = (w @ v for v in (a, b, a * a, b * b, a * b))
    cov = sxy - sx * sy / n
    var = (sxx - sx * sx / n) * (syy - sy * sy / n)
    return np.where(var > 0, cov / np.sqrt(np.where(var > 0, var, 1)), 0.0)


REDUCERS: dict[str, Callable[..., np.ndarray]] = {
    "mean": _mean, "ratio": _ratio, "exp_ratio": _exp_ratio, "sqrt_mean": _sqrt_mean,
    "share": _mean,  # the mean of a 0/1 column (accuracy): McNemar tests its change
    "precision_macro": _macro("precision"), "recall_macro": _macro("recall"), "f1_macro": _macro("f1"),
    "ece": _ece, "pearson": _pearson,
}


def group_columns(group: dict[str, Any]) -> Cols:
    return {k: np.asarray(v, dtype=np.float64) for k, v in group["columns"].items()}


def group_metrics(group: dict[str, Any], w: np.ndarray, cols: Cols | None = None) -> dict[str, np.ndarray]:
    """Every metric of a row group under resampling weights w (R, N): {metric: (R,)}."""
    cols = cols if cols is not None else group_columns(group)
    return {m: REDUCERS[spec[0]](cols, w, *spec[1:]) for m, spec in group["metrics"].items()}


def point_metrics(group: dict[str, Any]) -> dict[str, float]:
    """The metrics of the group as evaluated (every unit once)."""
    n = len(group["keys"])
    return {m: float(v[0]) for m, v in group_metrics(group, np.ones((1, n))).items()}


def resample_weights(n: int, resamples: int, seed: int, chunk_cells: int = 2_000_000) -> Iterator[np.ndarray]:
    """Bootstrap resamples of n units as weight matrices (r, n), r <= resamples per chunk: entry
    [j, i] is how many times resample j drew unit i (a multinomial(n, 1/n) count vector)."""
    rng = np.random.default_rng(seed)
    per = max(1, min(resamples, chunk_cells // max(n, 1)))
    done = 0
    while done < resamples:
        r = min(per, resamples - done)
        idx = rng.integers(0, n, size=(r, n))  # (r, n) draws with replacement
        offsets = (np.arange(r)[:, None] * n + idx).ravel()
        yield np.bincount(offsets, minlength=r * n).reshape(r, n).astype(np.float64)
        done += r


def bootstrap(group: dict[str, Any], resamples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """{metric: (resamples,)} bootstrap distribution of each metric of one row group."""
    cols, n = group_columns(group), len(group["keys"])
    parts = [group_metrics(group, w, cols) for w in resample_weights(n, resamples, seed)]
    return {m: np.concatenate([p[m] for p in parts]) for m in group["metrics"]}


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> list[float] | None:
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return None
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def bootstrap_p(diff: np.ndarray) -> float:
    """Two-sided p-value of 'no change' from bootstrap draws of the change: the smallest level at
    which the percentile interval excludes 0, 2 min(P(d <= 0), P(d >= 0)), with the (k+1)/(R+1)
    correction so that p is never 0 from a finite number of draws."""
    diff = diff[np.isfinite(diff)]
    if len(diff) == 0:
        return float("nan")
    r = len(diff)
    tail = min(int((diff <= 0).sum()), int((diff >= 0).sum()))
    return float(min(1.0, 2 * (tail + 1) / (r + 1)))


def mcnemar(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """McNemar's test of paired 0/1 outcomes: b = right before and wrong after, c = wrong before
    and right after. Exact two-sided p = 2 P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped
    at 1; mid-p subtracts P(X = min(b, c)) (Fagerland et al. 2013)."""
    before, after = np.asarray(before) > 0.5, np.asarray(after) > 0.5
    b, c = int((before & ~after).sum()), int((~before & after).sum())
    n, k = b + c, min(b, c)
    if n == 0:
        return {"b": b, "c": c, "p_exact": 1.0, "p_mid": 1.0}
    tail, point = float(binom.cdf(k, n, 0.5)), float(binom.pmf(k, n, 0.5))
    return {"b": b, "c": c, "p_exact": min(1.0, 2 * tail), "p_mid": min(1.0, 2 * tail - point)}


def is_binary_mean(group: dict[str, Any], metric: str) -> bool:
    """A metric declared as the share of a 0/1 column (reducer "share"), so McNemar applies."""
    return group["metrics"][metric][0] == "share"


def aligned(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The two groups with their units in one order when they scored the same units (the same
    keys, as lists or as multisets), else None. Units with equal keys are the same input, so any
    order among them pairs them correctly. Both are put in key order, so the resampling (and the
    report) does not depend on the order each evaluation happened to list its units in."""
    if a["keys"] != b["keys"] and sorted(a["keys"]) != sorted(b["keys"]):
        return None

    def by_key(g: dict[str, Any]) -> dict[str, Any]:
        order = sorted(range(len(g["keys"])), key=lambda i: g["keys"][i])
        return {**g, "keys": [g["keys"][i] for i in order],
                "columns": {k: [v[i] for i in order] for k, v in g["columns"].items()}}
    return by_key(a), by_key(b)


def compare_groups(a: dict[str, Any], b: dict[str, Any], resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Each shared metric of two row groups (a: before or a baseline; b: after or another run):
    both values with intervals, the change b - a with its interval, a test and its p-value.
    Paired (one set of weights for both, McNemar for 0/1 means) when they scored the same units;
    otherwise independent resamples and the unpaired bootstrap."""
    pair = aligned(a, b)
    metrics = [m for m in b["metrics"] if m in a["metrics"]]
    if pair is not None:
        a, b = pair
        ca, cb, n = group_columns(a), group_columns(b), len(a["keys"])
        da: dict[str, list] = {m: [] for m in metrics}
        db: dict[str, list] = {m: [] for m in metrics}
        for w in resample_weights(n, resamples, seed):
            ma, mb = group_metrics(a, w, ca), group_metrics(b, w, cb)
            for m in metrics:
                da[m].append(ma[m])
                db[m].append(mb[m])
        draws_a = {m: np.concatenate(v) for m, v in da.items()}
        draws_b = {m: np.concatenate(v) for m, v in db.items()}
    else:
        draws_a, draws_b = bootstrap(a, resamples, seed), bootstrap(b, resamples, seed + 1)
    pa, pb = point_metrics(a), point_metrics(b)
    out = {}
    for m in metrics:
        diff = draws_b[m] - draws_a[m]
        row = {"before": pa[m], "before_ci": percentile_interval(draws_a[m], level), "after": pb[m],
               "after_ci": percentile_interval(draws_b[m], level), "change": pb[m] - pa[m],
               "change_ci": percentile_interval(diff, level), "paired": pair is not None}
        if pair is not None and is_binary_mean(a, m) and is_binary_mean(b, m):
            t = mcnemar(np.asarray(a["columns"][a["metrics"][m][1]]), np.asarray(b["columns"][b["metrics"][m][1]]))
            row.update(test=f"McNemar mid-p (b={t['b']}, c={t['c']})", p=t["p_mid"], p_exact=t["p_exact"])
        else:
            row.update(test="paired bootstrap" if pair is not None else "unpaired bootstrap", p=bootstrap_p(diff))
        row["significant"] = bool(np.isfinite(row["p"]) and row["p"] < 1 - level)
        out[m] = row
    return out


def intervals(group: dict[str, Any], resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """{metric: [low, high]} for one row group."""
    return {m: percentile_interval(d, level) for m, d in bootstrap(group, resamples, seed).items()}


def compare_results(before: dict | None, after: dict, resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """Intervals for every metric with per-example scores, and the change before -> after with its
    test, group by group (groups of the same name compare: "eval", "generation", "forgetting_text").

    Returns:
        {"resamples", "level", "metrics": {metric: {"after", "after_ci"[, "before", "before_ci",
        "change", "change_ci", "test", "p", "significant", "paired"]}}, "unpaired": [group names]}
    """
    out: dict[str, Any] = {"resamples": resamples, "level": level, "metrics": {}, "unpaired": []}
    old = {g["name"]: g for g in (before or {}).get("rows", [])}
    for group in after.get("rows", []):
        if not group["keys"]:
            continue
        if group["name"] in old and old[group["name"]]["keys"]:
            rows = compare_groups(old[group["name"]], group, resamples, seed, level)
            if rows and not next(iter(rows.values()))["paired"]:
                out["unpaired"].append(group["name"])
        else:
            point, cis = point_metrics(group), intervals(group, resamples, seed, level)
            rows = {m: {"after": point[m], "after_ci": cis[m]} for m in group["metrics"]}
        out["metrics"].update(rows)
    return out
