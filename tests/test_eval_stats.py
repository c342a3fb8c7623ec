"""Intervals, tests and metrics of the evaluation report against hand computations and reference
implementations (scikit-learn, scipy, sacrebleu). No model: these run in about a second."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import precision_recall_fscore_support

from tunesmith.evaluate.stats import (
    bootstrap,
    bootstrap_p,
    compare_groups,
    compare_results,
    ece_bins,
    group_metrics,
    mcnemar,
    point_metrics,
    resample_weights,
)
from tunesmith.tasks.metrics import calibration, chrf, lcs_length, rouge_l


def _cls_group(rng, n=300, classes=3, keys=None):
    label = rng.integers(0, classes - 1, n)  # the last class never occurs: macro averages must still count it
    pred = np.where(rng.random(n) < 0.7, label, rng.integers(0, classes, n))
    conf = rng.uniform(1 / classes, 1, n)
    return {"name": "eval", "unit": "example", "keys": keys or [f"k{i}" for i in range(n)],
            "columns": {"label": label.tolist(), "pred": pred.tolist(), "correct": (label == pred).astype(float).tolist(),
                        "confidence": conf.tolist(), "loss": rng.exponential(1, n).tolist()},
            "metrics": {"accuracy": ["share", "correct"], "loss": ["mean", "loss"],
                        "f1_macro": ["f1_macro", "label", "pred", classes],
                        "precision_macro": ["precision_macro", "label", "pred", classes],
                        "recall_macro": ["recall_macro", "label", "pred", classes],
                        "ece": ["ece", "confidence", "correct", 15]}}


def test_mcnemar_matches_the_binomial_by_hand_and_scipy():
    before = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 3)  # b = 10 right->wrong, c = 2 wrong->right
    after = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 3)
    t = mcnemar(before, after)
    assert (t["b"], t["c"]) == (10, 2)
    # 2 P(X <= 2), X ~ Bin(12, 1/2) = 2 (1 + 12 + 66) / 4096; mid-p subtracts P(X = 2) = 66/4096
    assert t["p_exact"] == pytest.approx(158 / 4096)
    assert t["p_mid"] == pytest.approx(92 / 4096)
    assert t["p_exact"] == pytest.approx(sps.binomtest(2, 12, 0.5).pvalue)
    same = mcnemar(np.array([1, 0, 1, 0]), np.array([0, 1, 1, 0]))  # b = c: no evidence either way
    assert same["p_exact"] == 1.0 and same["p_mid"] == pytest.approx(1.0)
    assert mcnemar(np.ones(5), np.ones(5))["p_mid"] == 1.0  # no discordant pair


def test_resample_weights_are_bootstrap_counts_and_chunking_does_not_change_them():
    w = np.concatenate(list(resample_weights(50, 30, seed=3)))
    assert w.shape == (30, 50) and (w.sum(1) == 50).all() and (w >= 0).all()
    small = np.concatenate(list(resample_weights(50, 30, seed=3, chunk_cells=120)))  # 2 resamples per chunk
    assert np.array_equal(w, small)
    idx = np.random.default_rng(3).integers(0, 50, size=(30, 50))  # the same draws, as indices
    assert np.array_equal(w, np.stack([np.bincount(i, minlength=50) for i in idx]))


def test_vectorised_metrics_equal_sklearn_and_the_loop_on_every_resample():
    rng = np.random.default_rng(0)
    g = _cls_group(rng)
    cols = {k: np.asarray(v) for k, v in g["columns"].items()}
    idx = rng.integers(0, 300, size=(25, 300))
    w = np.stack([np.bincount(i, minlength=300) for i in idx]).astype(float)
    got = group_metrics(g, w)
    for r, i in enumerate(idx):
        y, p = cols["label"][i], cols["pred"][i]
        pm, rm, fm, _ = precision_recall_fscore_support(y, p, labels=[0, 1, 2], average="macro", zero_division=0)
        assert got["precision_macro"][r] == pytest.approx(pm)
        assert got["recall_macro"][r] == pytest.approx(rm)
        assert got["f1_macro"][r] == pytest.approx(fm)
        assert got["accuracy"][r] == pytest.approx((y == p).mean())
        assert got["loss"][r] == pytest.approx(cols["loss"][i].mean())
        assert got["ece"][r] == pytest.approx(calibration(cols["confidence"][i].tolist(), (y == p).tolist())["ece"])


def test_ratio_exp_sqrt_and_pearson_reducers():
    rng = np.random.default_rng(1)
    loss, tokens = rng.uniform(1, 30, 40), rng.integers(1, 20, 40).astype(float)
    x, y = rng.normal(size=40), rng.normal(size=40)
    g = {"keys": list(range(40)), "columns": {"loss": loss, "tokens": tokens, "x": x, "y": y, "sq": x ** 2},
         "metrics": {"loss": ["ratio", "loss", "tokens"], "ppl": ["exp_ratio", "loss", "tokens"],
                     "rmse": ["sqrt_mean", "sq"], "r": ["pearson", "x", "y"]}}
    m = point_metrics(g)
    assert m["loss"] == pytest.approx(loss.sum() / tokens.sum())  # per token, not the mean of sequence means
    assert m["ppl"] == pytest.approx(np.exp(loss.sum() / tokens.sum()))
    assert m["rmse"] == pytest.approx(np.sqrt((x ** 2).mean()))
    assert m["r"] == pytest.approx(sps.pearsonr(x, y)[0])


def test_bootstrap_interval_of_a_mean_agrees_with_scipy():
    rng = np.random.default_rng(2)
    x = rng.exponential(1.0, 400)
    g = {"keys": list(range(400)), "columns": {"x": x}, "metrics": {"mean": ["mean", "x"]}}
    draws = bootstrap(g, resamples=4000, seed=0)["mean"]
    ours = np.percentile(draws, [2.5, 97.5])
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.02) and ours[1] == pytest.approx(ref.high, abs=0.02)
    # and the textbook normal approximation: mean +- 1.96 s / sqrt(n)
    half = 1.96 * x.std(ddof=1) / np.sqrt(400)
    assert (ours[1] - ours[0]) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_p_by_hand():
    assert bootstrap_p(np.full(999, 0.3)) == pytest.approx(2 / 1000)  # never <= 0: (0 + 1) / (R + 1), two-sided
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(min(1, 2 * 2 / 5))
    assert bootstrap_p(np.zeros(10)) == 1.0


def test_paired_comparison_uses_mcnemar_and_sees_a_real_gain():
    rng = np.random.default_rng(4)
    before = _cls_group(rng, n=400)
    after = {**before, "columns": dict(before["columns"])}
    fixed = np.asarray(before["columns"]["correct"]).copy()
    wrong = np.flatnonzero(fixed == 0)
    fixed[wrong[: len(wrong) // 2]] = 1  # half of the mistakes fixed, nothing broken: c > 0, b = 0
    after["columns"]["correct"] = fixed.tolist()
    after["columns"]["pred"] = np.where(fixed == 1, before["columns"]["label"], before["columns"]["pred"]).tolist()
    rows = compare_groups(before, after, resamples=500)
    acc = rows["accuracy"]
    assert acc["paired"] and acc["test"].startswith("McNemar") and acc["significant"]
    assert acc["p"] == pytest.approx(mcnemar(before["columns"]["correct"], fixed)["p_mid"])
    assert acc["change"] == pytest.approx(fixed.mean() - np.mean(before["columns"]["correct"]))
    assert acc["change_ci"][0] > 0
    assert rows["f1_macro"]["test"] == "paired bootstrap"
    # a model compared with itself: no change, p = 1, not significant
    same = compare_groups(before, before, resamples=200)
    assert all(r["change"] == 0 and not r["significant"] for r in same.values())


def test_pairs_align_by_key_and_unmatched_sets_are_unpaired():
    rng = np.random.default_rng(5)
    a = _cls_group(rng, n=120)
    b = _cls_group(rng, n=120)
    order = rng.permutation(120)
    shuffled = {**b, "keys": [b["keys"][i] for i in order],
                "columns": {k: [v[i] for i in order] for k, v in b["columns"].items()}}
    straight, permuted = compare_groups(a, b, resamples=300), compare_groups(a, shuffled, resamples=300)
    for m in straight:
        assert permuted[m]["paired"] and permuted[m]["p"] == pytest.approx(straight[m]["p"])
        assert permuted[m]["change_ci"] == pytest.approx(straight[m]["change_ci"])
    other = _cls_group(rng, n=120, keys=[f"other{i}" for i in range(120)])
    rows = compare_groups(a, other, resamples=300)
    assert not rows["accuracy"]["paired"] and rows["accuracy"]["test"] == "unpaired bootstrap"


def test_compare_results_without_before_gives_intervals_only():
    rng = np.random.default_rng(6)
    after = {"rows": [_cls_group(rng)]}
    out = compare_results(None, after, resamples=200)
    acc = out["metrics"]["accuracy"]
    assert set(acc) == {"after", "after_ci"} and acc["after_ci"][0] <= acc["after"] <= acc["after_ci"][1]


def test_calibration_and_ece_bins_by_hand():
    # two at 0.95 (one right): |0.5 - 0.95| x 2/4; two at 0.55 (both right): |1 - 0.55| x 2/4
    cal = calibration([0.95, 0.95, 0.55, 0.55], [True, False, True, True], bins=15)
    assert cal["ece"] == pytest.approx(0.45)
    assert [b["count"] for b in cal["bins"]][8] == 2 and cal["bins"][14]["accuracy"] == 0.5
    # edges (k/15, (k+1)/15]: a confidence on an edge belongs to the bin below it, 1.0 to the last
    edges = np.linspace(0, 1, 16)
    assert list(ece_bins(np.array([edges[3], edges[3] + 1e-9, 1.0, 0.0]))) == [2, 3, 14, 0]
    perfect = calibration([0.8] * 10, [True] * 8 + [False] * 2)
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-12)


def test_rouge_l_matches_lins_examples():
    # Lin (2004), section 3.1: S1 is the reference
    assert lcs_length("police killed the gunman".split(), "police kill the gunman".split()) == 3
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    assert rouge_l("Police, KILLED the gunman!", "police killed the gunman") == 1.0  # case and punctuation
    assert rouge_l("", "anything") == 0.0
    # P = 2/3, R = 2/4: F = 2PR / (P + R) = 4/7
    assert rouge_l("a b x", "a b c d") == pytest.approx(4 / 7)


def test_chrf_comes_from_sacrebleu():
    from sacrebleu.metrics import CHRF

    hyp, ref = ["the cat sat on the mat", "hello", "completely different"], ["the cat sat on a mat", "hello", "xyz"]
    got = chrf(hyp, ref)
    assert got[1] == pytest.approx(100.0) and got[2] < got[0] < 100
    assert got[0] == pytest.approx(CHRF().corpus_score([hyp[0]], [[ref[0]]]).score)  # one sentence: its corpus score


def test_general_questions_file_and_answer_matching(tmp_path):
    from tunesmith.errors import TunesmithError
    from tunesmith.evaluate.forgetting import answered, read_questions

    shipped = read_questions("builtin:general-qa")
    assert len(shipped) == 40 and shipped[0] == {"question": "What is the capital of France?", "answers": ["Paris"]}
    assert answered("The capital of France is Paris.", ["Paris"]) and not answered("Parisian food", ["Paris"])
    assert answered("There are 7 days.", ["seven", "7"]) and not answered("It is Tallinn", ["Paris"])
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "a?", "answers": ["b"]}\n\n{"question": "c?", "answers": []}\n')
    with pytest.raises(TunesmithError, match=r"qa\.jsonl:3: expected \{\"question\": text"):
        read_questions(str(bad))
    bad.write_text('{"question": "a?", "answers": ["b"]}\n{oops\n')
    with pytest.raises(TunesmithError, match=r"qa\.jsonl:2: invalid JSON"):
        read_questions(str(bad))


def test_mcnemar_only_for_metrics_declared_as_shares():
    """A continuous score that happens to be all 0 and 1 (ROUGE-L of a model that never overlaps)
    is still compared by the paired bootstrap; McNemar needs the 'share' declaration."""
    g = {"name": "g", "keys": list("abcd"), "columns": {"r": [0.0, 0.0, 1.0, 0.0]}, "metrics": {"rouge_l": ["mean", "r"],
                                                                                             "hit": ["share", "r"]}}
    rows = compare_groups(g, g, resamples=100)
    assert rows["rouge_l"]["test"] == "paired bootstrap" and rows["hit"]["test"].startswith("McNemar")
