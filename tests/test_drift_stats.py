"""Drift statistics against hand computations, exhaustive enumeration and scipy. No model."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chi2

from tunesmith.evaluate.drift import chi2_test, ks_test, mmd2, mmd_test, oov_rates, oov_test, rbf_kernel, words


def _mmd2_loop(x, y, bw):
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * bw ** 2))  # noqa: E731
    kxx = np.mean([k(a, b) for a in x for b in x])
    kyy = np.mean([k(a, b) for a in y for b in y])
    kxy = np.mean([k(a, b) for a in x for b in y])
    return kxx + kyy - 2 * kxy


def test_mmd2_matches_the_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(1.0, size=(5, 3))
    assert mmd2(x, y, 1.3) == pytest.approx(_mmd2_loop(x, y, 1.3))
    assert rbf_kernel(x[:1], x[:1], 2.0)[0, 0] == pytest.approx(1.0)
    assert mmd2(x, x, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_mmd_permutation_p_matches_exhaustive_enumeration():
    """With 4 + 3 points there are C(7, 3) = 35 relabellings: the exact p-value is the share whose
    MMD^2 reaches the observed one; many random permutations must come close to it."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 2)), rng.normal(0.8, size=(3, 2))
    res = mmd_test(x, y, permutations=20000, seed=0)
    z = np.concatenate([x, y])
    bw = res["bandwidth"]
    stats = [mmd2(z[[i for i in range(7) if i not in c]], z[list(c)], bw) for c in itertools.combinations(range(7), 3)]
    observed = mmd2(x, y, bw)
    assert res["statistic"] == pytest.approx(observed)
    exact = np.mean([s >= observed - 1e-12 for s in stats])
    assert res["p"] == pytest.approx(exact, abs=0.01)


def test_mmd_test_holds_its_level_and_sees_a_shift():
    rng = np.random.default_rng(2)
    null_p = [mmd_test(rng.normal(size=(60, 4)), rng.normal(size=(40, 4)), 200, seed=s)["p"] for s in range(60)]
    assert np.mean(np.array(null_p) < 0.05) <= 0.1  # about 5% of same-distribution pairs, by chance
    shifted = mmd_test(rng.normal(size=(60, 4)), rng.normal(0.7, size=(40, 4)), 200)
    assert shifted["p"] < 0.01


def test_ks_and_chi_square_by_hand():
    t = ks_test([1, 2, 3], [4, 5])
    assert t["statistic"] == 1.0 and t["reference_mean"] == 2.0 and t["new_mean"] == 4.5
    # [[30, 10], [20, 20]]: expected 25, 15, 25, 15 -> chi2 = 2 (25/25 + 25/15) = 16/3, 1 dof
    c = chi2_test(["a"] * 30 + ["b"] * 10, ["a"] * 20 + ["b"] * 20)
    assert c["statistic"] == pytest.approx(16 / 3) and c["dof"] == 1
    assert c["p"] == pytest.approx(chi2.sf(16 / 3, 1))
    assert c["reference"]["a"] == 0.75 and c["new"]["b"] == 0.5
    assert chi2_test(["a"] * 5, ["a"] * 7)["p"] == 1.0  # one category: nothing to test


def test_vocabulary_drift_by_hand():
    vocab = {"the", "film", "was", "good"}
    docs = [words("The film was GOOD."), words("thee hath the film"), []]
    assert list(oov_rates(docs, vocab)) == [0.0, 0.5, 0.0]
    ref = np.zeros(50)
    t = oov_test(ref, [words("verily thee hath spoken unto the film")] * 30, vocab)
    assert t["p"] < 1e-6 and t["new_mean"] == pytest.approx(5 / 7) and t["top_unseen"][0] in {"verily", "thee"}
