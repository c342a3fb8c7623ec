"""Evaluate a model on prepared data: metrics, generations, and sample predictions.

The same function scores the base before training and the result after, on the same
held-out features and the same sample inputs, so the two columns of the report compare.
What the metrics are, and how a model answers, is its task's (tunesmith/tasks).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator

from tunesmith import faults
from tunesmith.config import RunConfig
from tunesmith.data import PreparedData
from tunesmith.data.collate import batch_order, collate_any, feature_length
from tunesmith.evaluate.forgetting import forgetting_probe
from tunesmith.methods.folded import lora_folded
from tunesmith.tasks import Sums, get_task
from tunesmith.tasks.base import RowGroup, generate, row_keys  # noqa: F401 (generate re-exported)


def score_features(model, feats: list[dict[str, Any]], cfg: RunConfig, labels: list[str] | None, pad_id: int,
                   acc: Accelerator, frozen=None) -> dict:
    """The task's objective over features, summed, then its metrics (accuracy/F1, loss/perplexity,
    pairwise accuracy and margin, MAE/RMSE...). `frozen`: the training loop's FrozenBottom
    (train/frozen_cache.py), whose kept outputs the evaluation reuses. Every data-parallel process
    must call it (objective_sums gathers)."""
    return get_task(cfg.task).summarise(objective_sums(model, feats, cfg, pad_id, acc, frozen), labels)


@torch.no_grad()
def objective_sums(model, feats: list[dict[str, Any]], cfg: RunConfig, pad_id: int, acc: Accelerator,
                   frozen=None) -> Sums:
    """The task's objective over features in evaluation batches: its sums, and its per-unit rows.

    On N data-parallel processes, process r scores batches r, r+N, ... and the sums are gathered:
    each example is scored once, and every process gets the same sums. Every process must call it.
    """
    task = get_task(cfg.task)
    was_training = model.training
    model.eval()
    objective = task.objective(cfg)
    sums = Sums()
    batches = batch_order([feature_length(f) for f in feats], cfg.eval.batch_size, shuffle=False)
    mine = batches[acc.process_index::acc.num_processes]
    # FSDP2: every forward all-gathers weights, so every process runs as many as the busiest one
    # (a stand-in batch, not counted), and LoRA is not folded into the sharded base weights.
    fsdp = _is_sharded(model)
    rounds = -(-len(batches) // acc.num_processes) if fsdp else len(mine)
    with lora_folded(model, max_bytes=0 if fsdp else None):  # one matmul per adapted layer, folded once (methods/folded.py)
        for n in range(rounds):
            idxs = mine[n] if n < len(mine) else batches[0]
            batch_feats = [feats[i] for i in idxs]
            batch = {k: v.to(acc.device) for k, v in collate_any(batch_feats, pad_id).items()}
            with acc.autocast(), frozen.use(batch_feats, batch) if frozen is not None else nullcontext():
                out = objective(model, batch)
            if n < len(mine):
                sums.add(out, batch, task.count_items(batch), idxs)
            if n == 0:
                faults.reached("eval")
    model.train(was_training)
    if acc.num_processes > 1:
        parts: list[Sums | None] = [None] * acc.num_processes
        torch.distributed.all_gather_object(parts, sums)
        sums = Sums.merged(parts)
    return sums


def _is_sharded(model) -> bool:
    """A model under FSDP2 (torch's fully_shard; train/sharded.py shards it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _eval_group(sums: Sums, split, feats: list[dict], labels: list[str] | None, task) -> RowGroup | None:
    """The objective's per-example scores as a row group, units back in the features' order."""
    group = task.per_example(sums, labels)
    if group is None:
        return None
    where = {i: pos for pos, i in enumerate(sums.order)}  # feature index -> position in the sums
    order = [where[i] for i in range(len(feats))]
    return {"name": "eval", "unit": "example", "keys": row_keys(split, len(feats)), **group,
            "columns": {k: [v[p] for p in order] for k, v in group["columns"].items()}}


def sample_inputs(cfg: RunConfig, data: PreparedData) -> list[str]:
    """The inputs shown before/after: configured samples, else the first few test examples."""
    if cfg.eval.samples:
        return list(cfg.eval.samples)
    split = data.splits.get("test") or data.splits.get("validation") or data.splits["train"]
    return get_task(cfg.task).sample_inputs(cfg, split.examples[: cfg.eval.num_samples])


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], cfg: RunConfig, chat: bool, labels: list[str] | None,
                  acc: Accelerator) -> list[dict]:
    """Answer texts as the run was trained: label + probability, a score, or generated text."""
    if not texts:
        return []
    return get_task(cfg.task).predict(model, tokenizer, texts, cfg, chat, labels, acc)


def evaluate_model(model, tokenizer, data: PreparedData, cfg: RunConfig, acc: Accelerator,
                   split: str = "test") -> dict:
    """Everything the report shows for one model: split metrics, generation scores, samples."""
    task = get_task(cfg.task)
    feats = data.splits[split].features[: cfg.eval.max_examples]
    result: dict[str, Any] = {"split": split, "examples": len(feats), "metrics": {}, "rows": []}
    if not task.online:  # an online task's held-out data are prompts: its metrics come from sampling (evaluate_more)
        sums = objective_sums(model, feats, cfg, tokenizer.pad_token_id, acc)
        result["metrics"] = task.summarise(sums, data.labels)
        group = _eval_group(sums, data.splits[split], feats, data.labels, task)
        result["rows"] += [group] if group else []
        sources = data.splits[split].sources
        if sources is not None and data.source_names:  # a data mix: each source's own metrics
            sources = sources[: len(feats)]
            result["per_source"] = {
                name: {"examples": sum(s == k for s in sources),
                       "metrics": score_features(model, [f for f, s in zip(feats, sources) if s == k], cfg,
                                                 data.labels, tokenizer.pad_token_id, acc)}
                for k, name in enumerate(data.source_names) if k in set(sources)}
    task.evaluate_more(result, model, tokenizer, data, cfg, acc, split)  # may add metrics and row groups
    if task.predicts == "generate":  # a generative run: does it still model general text and know general facts?
        forgetting_probe(result, model, tokenizer, cfg, acc, data.chat)
    result["samples"] = predict_texts(model, tokenizer, sample_inputs(cfg, data), cfg, data.chat, data.labels, acc)
    result["warnings"] = metric_warnings(result["metrics"])
    return result


def metric_warnings(metrics: dict) -> list[str]:
    """What a reader of the numbers must know: macro averages over classes the evaluated data
    does not contain. scikit-learn's macro average (ours) counts such a class's recall as 0 and
    its precision as 0 when it is predicted, so recall_macro over 3 classes with one absent is at
    most 2/3. That is the right definition for a head that must cover every class, but on a file
    that lacks one it reads as a failure of the model."""
    absent = [name for name, m in metrics.get("per_class", {}).items() if m["support"] == 0]
    if not absent:
        return []
    n = len(metrics["per_class"])
    return [f"class(es) {', '.join(absent)} have no example in the evaluated data: the macro precision/recall/F1 "
            f"average over all {n} classes and count each of them as 0 (at most {(n - len(absent)) / n:.3f}); "
            "look at per_class, or evaluate on data with every class"]
