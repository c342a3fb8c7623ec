"""Metric formulas. Classification metrics come from scikit-learn; text matching is ours."""
from __future__ import annotations

import math
import re
import string

import numpy as np

from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str],
                           y_score: list[float] | None = None) -> dict:
    """Accuracy, macro and per-class precision/recall/F1, confusion matrix; for two classes with
    scores (logit of the second minus the first) also ROC AUC, which is the pairwise accuracy of
    the score: the chance that a random example of the second class outscores one of the first.
    That is how well the classifier would rank pairs as a reward model."""
    ids = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    pm, rm, fm, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision_macro": float(pm),
        "recall_macro": float(rm),
        "f1_macro": float(fm),
        "per_class": {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                  "support": int(support[i])} for i in ids},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),  # rows: true, cols: predicted
        **({"roc_auc": float(roc_auc_score(y_true, y_score))} if y_score is not None and len(set(y_true)) == 2 else {}),
    }


def lm_metrics(loss_sum: float, tokens: int, correct: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1),
            "tokens": tokens}


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower-case, drop punctuation, collapse spaces (SQuAD-style answer normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def match_metrics(generations: list[str], references: list[str]) -> dict:
    """exact_match: normalised generation == reference; contains: reference appears in the generation."""
    n = max(len(references), 1)
    exact = sum(normalize(g) == normalize(r) for g, r in zip(generations, references))
    contains = sum(f" {normalize(r)} " in f" {normalize(g)} " for g, r in zip(generations, references))
    return {"exact_match": exact / n, "contains": contains / n, "generated": len(references)}


_NON_WORD = re.compile(r"[\W_]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation (lower-case, runs of non-alphanumerics are spaces, no
    stemming), with Unicode letters kept as letters where rouge-score keeps only a-z0-9."""
    return _NON_WORD.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence of two token lists, by the row-by-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(generation: str, reference: str) -> float:
    """ROUGE-L F1 of one generation against its reference (Lin 2004, section 3.1, beta = 1, as
    rouge-score's rougeL fmeasure): LCS / length gives recall and precision."""
    hyp, ref = rouge_tokens(generation), rouge_tokens(reference)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def chrf(generations: list[str], references: list[str]) -> list[float]:
    """Sentence-level chrF (character 6-grams, beta 2; Popovic 2015) of each generation, from
    sacrebleu, on its 0-100 scale."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError as e:  # pinned in requirements.txt; a clear message if an install lacks it
        raise ImportError("chrF needs sacrebleu: pip install sacrebleu==2.6.0") from e
    metric = CHRF()
    return [float(metric.sentence_score(g, [r]).score) for g, r in zip(generations, references)]


def calibration(confidence: list[float], correct: list[bool], bins: int = 15) -> dict:
    """Expected calibration error over `bins` equal-width confidence bins (lo, hi] (Guo et al.
    2017, eq. 3: sum over bins of |accuracy - mean confidence| x share of examples), and each
    bin's count, mean confidence and accuracy for the reliability diagram."""
    n = max(len(confidence), 1)
    rows, ece = [], 0.0
    edges = [float(e) for e in np.linspace(0, 1, bins + 1)]  # the edges evaluate/stats.py's ECE uses
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        members = [i for i, c in enumerate(confidence) if (lo < c <= hi) or (b == 0 and c <= lo)]
        conf = sum(confidence[i] for i in members) / len(members) if members else 0.0
        accuracy = sum(bool(correct[i]) for i in members) / len(members) if members else 0.0
        ece += len(members) / n * abs(accuracy - conf)
        rows.append({"lower": lo, "upper": hi, "count": len(members), "confidence": conf, "accuracy": accuracy})
    return {"ece": ece, "bins": rows}
