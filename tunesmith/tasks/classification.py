"""classification: text -> one of N labels. A new classifier head, cross-entropy, accuracy/F1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.formats import read_examples
from tunesmith.data.tokenize import tokenize_texts
from tunesmith.objectives import classification, count_examples
from tunesmith.tasks.base import RowGroup, Sums, Task, head_outputs
from tunesmith.tasks.metrics import calibration, classification_metrics

FORMATS = frozenset({"classification"})
ECE_BINS = 15


def summarise(s: Sums, labels: list[str] | None) -> dict:
    logits = torch.cat(s.outputs)  # (N, C)
    y_score = (logits[:, 1] - logits[:, 0]).tolist() if logits.shape[-1] == 2 else None
    y_true, y_pred = torch.cat(s.targets), logits.argmax(-1)  # (N,), (N,)
    # confidences in float64, as per_example computes them: the report's ECE and the one its interval is
    # resampled from then bin every example alike (in float32 a confidence at a bin edge can cross it)
    cal = calibration(logits.double().softmax(-1).max(-1).values.tolist(), (y_pred == y_true).tolist(), ECE_BINS)
    return {"loss": s.loss / max(s.count, 1),
            **classification_metrics(y_true.tolist(), y_pred.tolist(), labels or [], y_score),
            "ece": cal["ece"], "calibration": cal["bins"]}


def per_example(s: Sums, labels: list[str] | None) -> RowGroup:
    """Each example's true and predicted class, confidence (the top probability) and loss."""
    logits, y_true = torch.cat(s.outputs).double(), torch.cat(s.targets)  # (N, C), (N,)
    y_pred = logits.argmax(-1)
    classes = max(len(labels or []), logits.shape[-1])
    return {"columns": {"label": y_true.tolist(), "pred": y_pred.tolist(),
                        "correct": (y_pred == y_true).double().tolist(),
                        "confidence": logits.softmax(-1).max(-1).values.tolist(),
                        "loss": F.cross_entropy(logits, y_true, reduction="none").tolist()},
            "metrics": {"accuracy": ["share", "correct"], "loss": ["mean", "loss"],
                        "f1_macro": ["f1_macro", "label", "pred", classes],
                        "precision_macro": ["precision_macro", "label", "pred", classes],
                        "recall_macro": ["recall_macro", "label", "pred", classes],
                        "ece": ["ece", "confidence", "correct", ECE_BINS]}}


def predict(model, tokenizer, texts: list[str], cfg, chat: bool, labels: list[str] | None, acc) -> list[dict]:
    # one forward pass over all texts: folding LoRA would copy more weight than it saves
    probs = head_outputs(model, tokenizer, texts, cfg, acc, len(texts)).softmax(-1)  # (N, C)
    assert labels is not None
    return [{"input": t, "label": labels[int(p.argmax())], "probability": round(float(p.max()), 4)}
            for t, p in zip(texts, probs)]


TASK = Task(
    name="classification", predicts="classify", serves=frozenset({"classify", "embeddings"}), head="labels",
    formats=FORMATS, best_metric="accuracy",
    metrics={"accuracy": True, "f1_macro": True, "precision_macro": True, "recall_macro": True, "loss": False,
             "ece": False},
    read=lambda records, cfg, labels, names: read_examples(records, cfg.task, FORMATS, cfg.data, labels, names),
    encode=lambda examples, fmt, cfg, tokenizer, chat: tokenize_texts(examples, cfg.data, tokenizer),
    objective=lambda cfg: classification, count_items=count_examples, summarise=summarise,
    sample_inputs=lambda cfg, examples: [e.text or "" for e in examples], predict=predict, per_example=per_example,
)
