"""regression: text -> a number (a rating, a similarity, a quality score).

A scalar head on a sequence classifier (num_labels=1, problem_type regression) trained with the
squared error; metrics MAE, RMSE, Pearson and Spearman correlation. Records are {"text", "label"}
with a numeric label (data.columns maps other names, e.g. {label: score}). This module is the
whole task: docs/TASKS.md walks through it as the example of adding one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from tunesmith.data.formats import Example, detect_format, need_str, rename_columns
from tunesmith.data.readers import Record
from tunesmith.data.tokenize import tokenize_texts
from tunesmith.errors import DataError, Problem, TunesmithError
from tunesmith.objectives import LossOut, count_examples
from tunesmith.tasks.base import RowGroup, Sums, Task, head_outputs

FORMATS = frozenset({"classification"})  # text + label; here the label is a number


def _number(value: Any, where, problems: list[Problem]) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    try:  # CSV cells arrive as strings
        number = float(str(value).strip())
        if math.isfinite(number):
            return number
    except ValueError:
        pass
    problems.append(Problem(where, f"expected a number, got {value!r}", field="label"))
    return None


def read(records: list[Record], cfg, labels, names) -> tuple[str, list[Example]]:
    """Validate {"text", "label": number} records. Raises DataError listing every bad one."""
    fmt = detect_format(rename_columns(records[0], cfg.data.columns), cfg.data)
    if fmt not in FORMATS:
        raise TunesmithError(f"{records[0].where.path}: data looks like '{fmt}'; task regression needs text and a "
                             "numeric label (map your columns with data.columns, e.g. {label: score})")
    problems: list[Problem] = []
    examples = []
    for rec in records:
        f = rename_columns(rec, cfg.data.columns)
        n = len(problems)
        text = need_str(f, "text", rec.where, problems)
        value = _number(f.get("label"), rec.where, problems)
        if len(problems) == n:
            examples.append(Example(where=rec.where, text=text, label=value))
    if problems:
        raise DataError(problems)
    return fmt, examples


def objective(model, batch: dict[str, torch.Tensor]) -> LossOut:
    """Squared error summed over the batch; the loop divides by the step's example count (MSE)."""
    pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (B, 1)
    loss = F.mse_loss(pred.squeeze(-1), batch["label"].float(), reduction="sum")
    return LossOut(loss, int(batch["label"].numel()), 0, pred.detach())


def summarise(s: Sums, labels) -> dict[str, float]:
    pred, true = torch.cat(s.outputs)[:, 0].double(), torch.cat(s.targets).double()  # (N,), (N,)
    err = pred - true
    out = {"loss": s.loss / max(s.count, 1), "mae": float(err.abs().mean()), "rmse": float(err.pow(2).mean().sqrt())}
    for name, fn in (("pearson", pearsonr), ("spearman", spearmanr)):
        # an untrained head can predict (nearly) one constant: no correlation, reported as 0
        constant = len(pred) < 2 or float(pred.std()) == 0.0 or float(true.std()) == 0.0
        out[name] = 0.0 if constant else float(fn(pred.numpy(), true.numpy())[0])
    return out


def per_example(s: Sums, labels) -> RowGroup:
    """Each example's prediction, target and errors. Spearman's rank correlation has no interval:
    the ranks of a resample are not a sum over examples."""
    pred, true = torch.cat(s.outputs)[:, 0].double(), torch.cat(s.targets).double()  # (N,), (N,)
    err = pred - true
    return {"columns": {"pred": pred.tolist(), "target": true.tolist(), "abs_err": err.abs().tolist(),
                        "sq_err": err.pow(2).tolist()},
            "metrics": {"loss": ["mean", "sq_err"], "mae": ["mean", "abs_err"], "rmse": ["sqrt_mean", "sq_err"],
                        "pearson": ["pearson", "pred", "target"]}}


def predict(model, tokenizer, texts: list[str], cfg, chat: bool, labels, acc) -> list[dict]:
    values = head_outputs(model, tokenizer, texts, cfg, acc, cfg.eval.batch_size)[:, 0].tolist()
    return [{"input": t, "score": round(v, 4)} for t, v in zip(texts, values)]


def describe(examples: list[Example], feats: list[dict]) -> dict[str, Any]:
    """`data check`: the spread of the targets (a constant target teaches nothing)."""
    ys = torch.tensor([float(e.label) for e in examples], dtype=torch.float64)
    return {"targets": {"min": float(ys.min()), "mean": round(float(ys.mean()), 4), "max": float(ys.max()),
                        "std": round(float(ys.std()), 4) if len(ys) > 1 else 0.0}} if len(ys) else {}


TASK = Task(
    name="regression", predicts="score", serves=frozenset({"score", "embeddings"}), head="scalar", formats=FORMATS,
    metrics={"loss": False, "mae": False, "rmse": False, "pearson": True, "spearman": True}, best_metric="rmse",
    read=read, encode=lambda examples, fmt, cfg, tokenizer, chat: tokenize_texts(examples, cfg.data, tokenizer),
    objective=lambda cfg: objective, count_items=count_examples, summarise=summarise,
    sample_inputs=lambda cfg, examples: [e.text or "" for e in examples], predict=predict, describe=describe,
    per_example=per_example,
)
