"""Metric formulas. Classification metrics come from scikit-learn; text matching is ours."""
from __future__ import annotations

import math
import re
import string

from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
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
