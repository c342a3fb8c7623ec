"""classification: text -> one of N labels. A new classifier head, cross-entropy, accuracy/F1."""
from __future__ import annotations

import torch

from tunesmith.data.formats import read_examples
from tunesmith.data.tokenize import tokenize_texts
from tunesmith.objectives import classification, count_examples
from tunesmith.tasks.base import Sums, Task, head_outputs
from tunesmith.tasks.metrics import classification_metrics

FORMATS = frozenset({"classification"})


def summarise(s: Sums, labels: list[str] | None) -> dict:
    logits = torch.cat(s.outputs)  # (N, C)
    y_score = (logits[:, 1] - logits[:, 0]).tolist() if logits.shape[-1] == 2 else None
    return {"loss": s.loss / max(s.count, 1),
            **classification_metrics(torch.cat(s.targets).tolist(), logits.argmax(-1).tolist(), labels or [], y_score)}


def predict(model, tokenizer, texts: list[str], cfg, chat: bool, labels: list[str] | None, acc) -> list[dict]:
    # one forward pass over all texts: folding LoRA would copy more weight than it saves
    probs = head_outputs(model, tokenizer, texts, cfg, acc, len(texts)).softmax(-1)  # (N, C)
    assert labels is not None
    return [{"input": t, "label": labels[int(p.argmax())], "probability": round(float(p.max()), 4)}
            for t, p in zip(texts, probs)]


TASK = Task(
    name="classification", predicts="classify", serves=frozenset({"classify", "embeddings"}), head="labels",
    formats=FORMATS, best_metric="accuracy",
    metrics={"accuracy": True, "f1_macro": True, "precision_macro": True, "recall_macro": True, "loss": False},
    read=lambda records, cfg, labels, names: read_examples(records, cfg.task, FORMATS, cfg.data, labels, names),
    encode=lambda examples, fmt, cfg, tokenizer, chat: tokenize_texts(examples, cfg.data, tokenizer),
    objective=lambda cfg: classification, count_items=count_examples, summarise=summarise,
    sample_inputs=lambda cfg, examples: [e.text or "" for e in examples], predict=predict,
)
