"""Two-sample drift tests between a reference sample (the run's data) and a window of new inputs.

- embeddings: maximum mean discrepancy with a Gaussian kernel, bandwidth by the median heuristic
  on the pooled sample, p-value by a permutation test (Gretton et al. 2012, JMLR 13, sections 2
  and 5; the biased V-statistic, eq. 5, which a permutation test may use as it is);
- a number per input (length, a confidence, a predicted value): two-sample Kolmogorov-Smirnov;
- the share of an input's words that the reference never used: Mann-Whitney U (many ties at 0);
- a category per input (the predicted label): chi-square test of the 2 x C table, no continuity
  correction (scipy's chi2_contingency).
Each returns {"test", "statistic", "p"} and what a reader needs to see the size of the change.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from scipy.stats import chi2_contingency, ks_2samp, mannwhitneyu

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rbf_bandwidth(z: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median heuristic: the median distance between distinct pooled points (on a subsample)."""
    rng = np.random.default_rng(seed)
    s = z[rng.choice(len(z), max_points, replace=False)] if len(z) > max_points else z
    sq = (s * s).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * s @ s.T, 0)
    med = float(np.sqrt(np.median(d2[np.triu_indices(len(s), 1)])))
    return med if med > 0 else 1.0


def rbf_kernel(a: np.ndarray, b: np.ndarray, bandwidth: float) -> np.ndarray:
    """k(x, y) = exp(-|x - y|^2 / (2 sigma^2)), (len(a), len(b))."""
    d2 = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)
    return np.exp(-d2 / (2 * bandwidth ** 2))


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Biased MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y) (Gretton et al. 2012, eq. 5)."""
    return float(rbf_kernel(x, x, bandwidth).mean() + rbf_kernel(y, y, bandwidth).mean()
                 - 2 * rbf_kernel(x, y, bandwidth).mean())


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 300, seed: int = 0) -> dict:
    """MMD^2 between x (m, d) and y (n, d) and its permutation p-value: the share of random
    relabellings of the pooled points whose MMD^2 reaches the observed one, (k + 1) / (P + 1).

    All relabellings are scored at once: with a = 1/m on one side and -1/n on the other,
    MMD^2 = a^T K a for the pooled kernel matrix K, so P of them are rowsum((A K) * A)."""
    z = np.concatenate([x, y]).astype(np.float64)
    m, n = len(x), len(y)
    bw = rbf_bandwidth(z, seed=seed)
    k = rbf_kernel(z, z, bw)  # (m + n, m + n)
    rng = np.random.default_rng(seed)
    signs = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(signs @ k @ signs)
    a = np.stack([rng.permutation(signs) for _ in range(permutations)])  # (P, m + n)
    null = ((a @ k) * a).sum(1)  # (P,)
    p = (1 + int((null >= observed - 1e-12).sum())) / (permutations + 1)
    return {"test": f"MMD permutation ({permutations})", "statistic": observed, "p": float(p), "bandwidth": bw}


def ks_test(ref: Sequence[float], new: Sequence[float]) -> dict:
    r = ks_2samp(np.asarray(ref, float), np.asarray(new, float))
    return {"test": "Kolmogorov-Smirnov", "statistic": float(r.statistic), "p": float(r.pvalue),
            "reference_mean": float(np.mean(ref)), "new_mean": float(np.mean(new))}


def chi2_test(ref: Sequence[str], new: Sequence[str]) -> dict:
    """Chi-square test of homogeneity of the category counts; categories seen on neither side drop out."""
    cats = sorted(set(ref) | set(new))
    cr, cn = Counter(ref), Counter(new)
    table = np.array([[cr[c] for c in cats], [cn[c] for c in cats]], dtype=float)
    shares = {"reference": {c: cr[c] / max(len(ref), 1) for c in cats}, "new": {c: cn[c] / max(len(new), 1) for c in cats}}
    if len(cats) < 2:
        return {"test": "chi-square", "statistic": 0.0, "p": 1.0, "dof": 0, **shares}
    r = chi2_contingency(table, correction=False)
    return {"test": "chi-square", "statistic": float(r.statistic), "p": float(r.pvalue), "dof": int(r.dof), **shares}


def oov_rates(docs: list[list[str]], vocab: set[str]) -> np.ndarray:
    """Per document: the share of its words not in `vocab` (0 for an empty document)."""
    return np.array([sum(w not in vocab for w in d) / len(d) if d else 0.0 for d in docs])


def oov_test(ref_rates: np.ndarray, new_docs: list[list[str]], vocab: set[str], top: int = 10) -> dict:
    """Do new inputs use words the reference never used more often than held-back reference
    inputs do? Mann-Whitney U of the per-input unseen-word shares; plus the commonest unseen words."""
    new_rates = oov_rates(new_docs, vocab)
    r = mannwhitneyu(ref_rates, new_rates, alternative="two-sided")
    unseen = Counter(w for d in new_docs for w in d if w not in vocab)
    return {"test": "Mann-Whitney U", "statistic": float(r.statistic), "p": float(r.pvalue),
            "reference_mean": float(ref_rates.mean()), "new_mean": float(new_rates.mean()),
            "top_unseen": [w for w, _ in unseen.most_common(top)]}
