"""Evaluate a model on prepared data: metrics, generations, and sample predictions.

The same function scores the base before training and the result after, on the same
held-out features and the same sample inputs, so the two columns of the report compare.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from accelerate import Accelerator

from tunesmith.config import ONLINE_TASKS, PREF_TASKS, RunConfig
from tunesmith.data import PreparedData
from tunesmith.data.collate import batch_order, collate_any, feature_length
from tunesmith.data.formats import Example
from tunesmith.data.tokenize import render_prompt
from tunesmith.evaluate.metrics import classification_metrics, lm_metrics, match_metrics, normalize
from tunesmith.methods.folded import lora_folded
from tunesmith.objectives import count_items, for_task


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def score_features(model, feats: list[dict[str, Any]], cfg: RunConfig, labels: list[str] | None, pad_id: int,
                   acc: Accelerator, frozen=None) -> dict:
    """Loss-based metrics over features: accuracy/F1/... for classification; loss/perplexity for
    LMs; loss, pairwise accuracy and mean margin for preference pairs. `frozen`: the training
    loop's FrozenBottom (train/frozen_cache.py), whose kept outputs the evaluation reuses."""
    task = cfg.task
    was_training = model.training
    model.eval()
    objective = for_task(task, cfg.pref)
    loss_sum, count, items, correct = 0.0, 0, 0.0, 0
    extras: dict[str, float] = {}
    y_true: list[int] = []
    y_pred: list[int] = []
    y_score: list[float] = []
    with lora_folded(model):  # one matmul per adapted layer, folded once (methods/folded.py)
        for idxs in batch_order([feature_length(f) for f in feats], cfg.eval.batch_size, shuffle=False):
            batch_feats = [feats[i] for i in idxs]
            batch = _to(collate_any(batch_feats, pad_id), acc.device)
            with acc.autocast(), frozen.use(batch_feats, batch) if frozen is not None else nullcontext():
                out = objective(model, batch)
            loss_sum += float(out.loss_sum)
            count += out.count
            items += count_items(task, batch)
            correct += out.correct
            for k, v in out.extras.items():
                extras[k] = extras.get(k, 0.0) + v
            if out.logits is not None:
                y_true += batch["label"].tolist()
                y_pred += out.logits.argmax(-1).tolist()
                if out.logits.shape[-1] == 2:
                    y_score += (out.logits[:, 1] - out.logits[:, 0]).tolist()
    model.train(was_training)
    if task == "classification":
        return {"loss": loss_sum / max(count, 1), **classification_metrics(y_true, y_pred, labels or [], y_score or None)}
    if task in PREF_TASKS:
        return {"loss": loss_sum / (items or 1), "accuracy": correct / max(count, 1),
                **{k: v / max(count, 1) for k, v in extras.items()}}
    return lm_metrics(loss_sum, count, correct)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], acc: Accelerator, max_new_tokens: int,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; returns only new text."""
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    with lora_folded(model):
        for idxs in batch_order([len(p) for p in prompts], batch_size, shuffle=False):
            width = max(len(prompts[i]) for i in idxs)
            ids = torch.full((len(idxs), width), pad, dtype=torch.long)  # (B, T) left-padded
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idxs):
                n = len(prompts[i])
                ids[row, width - n:] = torch.tensor(prompts[i])
                mask[row, width - n:] = 1
            with acc.autocast():
                gen = model.generate(input_ids=ids.to(acc.device), attention_mask=mask.to(acc.device),
                                     max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for row, i in enumerate(idxs):
                out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return out


def sample_inputs(cfg: RunConfig, data: PreparedData) -> list[str]:
    """The inputs shown before/after: configured samples, else the first few test examples."""
    if cfg.eval.samples:
        return list(cfg.eval.samples)
    split = data.splits.get("test") or data.splits.get("validation") or data.splits["train"]
    exs: list[Example] = split.examples[: cfg.eval.num_samples]
    if cfg.task in PREF_TASKS:  # prompts (reward: prompt + preferred response)
        prompt = lambda e: e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"]  # noqa: E731
        if cfg.task == "reward":
            from tunesmith.pref.data import reward_text
            return [reward_text(e.prompt, e.responses[0]) for e in exs]
        return [prompt(e) for e in exs]
    if cfg.task == "classification":
        return [e.text or "" for e in exs]
    if cfg.task == "sft":
        return [e.prompt if e.messages is None else e.messages[-2]["content"] for e in exs]
    return [" ".join((e.text or "").split()[:12]) for e in exs]  # cpt: continue a document's opening words


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], cfg: RunConfig, chat: bool, labels: list[str] | None,
                  acc: Accelerator) -> list[dict]:
    """Classify texts (label + probability) or generate answers to prompts, as the run was trained."""
    if not texts:
        return []
    if cfg.task == "reward":
        from tunesmith.pref.data import reward_scores
        return [{"input": t, "reward": round(r, 4)} for t, r in zip(texts, reward_scores(model, tokenizer, texts, cfg, acc))]
    if cfg.task == "classification":
        was_training = model.training
        model.eval()
        tokenizer.truncation_side = cfg.data.truncation_side
        enc = tokenizer(texts, truncation=True, max_length=cfg.data.max_length, padding=True, return_tensors="pt")
        with acc.autocast():  # one forward pass: folding would copy more weight than it saves
            logits = model(input_ids=enc["input_ids"].to(acc.device),
                           attention_mask=enc["attention_mask"].to(acc.device)).logits.float()  # (B, C)
        model.train(was_training)
        probs = logits.softmax(-1)
        assert labels is not None
        return [{"input": t, "label": labels[int(p.argmax())], "probability": round(float(p.max()), 4)}
                for t, p in zip(texts, probs)]
    prompts = [tokenizer(render_prompt(t, cfg.data, tokenizer, chat), add_special_tokens=not chat)["input_ids"]
               for t in texts]
    gens = generate(model, tokenizer, prompts, acc, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    return [{"input": t, "output": g} for t, g in zip(texts, gens)]


def evaluate_model(model, tokenizer, data: PreparedData, cfg: RunConfig, acc: Accelerator,
                   split: str = "test") -> dict:
    """Everything the report shows for one model: split metrics, generation scores, samples."""
    feats = data.splits[split].features[: cfg.eval.max_examples]
    if cfg.task in PREF_TASKS:
        return _evaluate_pref(model, tokenizer, data, cfg, acc, split, feats)
    result: dict[str, Any] = {
        "split": split,
        "examples": len(feats),
        "metrics": score_features(model, feats, cfg, data.labels, tokenizer.pad_token_id, acc),
    }
    if cfg.task == "sft" and cfg.eval.generate_metrics:
        prompts = [f["input_ids"][: f["prompt_len"]] for f in feats]
        gens = generate(model, tokenizer, prompts, acc, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        result["metrics"].update(match_metrics(gens, [f["reference"] for f in feats]))
        result["generations"] = [{"prompt": f.get("question"), "reference": f["reference"], "output": g,
                                  "exact": normalize(g) == normalize(f["reference"]),
                                  "contains": f" {normalize(f['reference'])} " in f" {normalize(g)} "}
                                 for f, g in zip(feats, gens)]
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


def _evaluate_pref(model, tokenizer, data: PreparedData, cfg: RunConfig, acc: Accelerator, split: str,
                   feats: list[dict[str, Any]]) -> dict:
    """Pairwise metrics on held-out pairs; for policies also the reward of their samples on held-out
    prompts, the KL to the reference and the alignment tax (perplexity on pref.tax_data)."""
    from tunesmith.pref.data import encode_prompt
    from tunesmith.pref.evaluate import alignment_tax, evaluate_policy

    result: dict[str, Any] = {"split": split, "examples": len(feats), "metrics": {}}
    if cfg.task not in ONLINE_TASKS:
        result["metrics"] = score_features(model, feats, cfg, data.labels, tokenizer.pad_token_id, acc)
    if cfg.task != "reward" and (cfg.pref.reward_model or cfg.pref.reward_fn):
        exs = data.splits[split].examples[: cfg.eval.max_examples]
        prompts = list({str(e.prompt): e.prompt for e in exs}.values())  # each held-out prompt once
        ids = [encode_prompt(p, cfg, tokenizer, data.chat) for p in prompts]
        policy = evaluate_policy(model, tokenizer, prompts, ids, cfg, acc)
        result["metrics"].update(policy["metrics"])
        result["generations"] = policy["samples"]
    if cfg.task != "reward" and cfg.pref.tax_data:
        result["metrics"]["tax_perplexity"] = alignment_tax(model, tokenizer, cfg, acc)
    result["samples"] = predict_texts(model, tokenizer, sample_inputs(cfg, data), cfg, data.chat, None, acc)
    return result
