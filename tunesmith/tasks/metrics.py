"""Metric formulas. Classification metrics come from scikit-learn; text matching is ours."""
from __future__ import annotations

import math
import re
import string

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
