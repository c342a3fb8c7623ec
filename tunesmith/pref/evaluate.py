"""Evaluating a policy trained from preferences: reward of its samples, KL to the reference, and the
alignment tax (perplexity on held-out neutral text), before vs after on the same prompts and text."""
from __future__ import annotations

import math
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.data.collate import batch_order, collate
from tunesmith.data.formats import Example
from tunesmith.objectives import causal_lm
from tunesmith.pref.rollout import get_scorer, make_reference, make_rollout

_TAX_FEATURES: dict = {}


@torch.no_grad()
def evaluate_policy(model, tokenizer, prompts: list, prompt_ids: list[list[int]], cfg: RunConfig, acc) -> dict[str, Any]:
    """Sample one completion per held-out prompt (fixed seed, so before and after see the same draws
    of randomness), score it with the run's reward and measure the KL to the reference policy."""
    scorer = get_scorer(cfg, acc.device)
    reference = make_reference(model)
    rewards, kls, lengths, texts = [], [], [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        for i in range(0, len(prompts), cfg.eval.batch_size):
            ro = make_rollout(model, reference, tokenizer, prompts[i: i + cfg.eval.batch_size],
                              prompt_ids[i: i + cfg.eval.batch_size], scorer, cfg, acc)
            rewards.append(ro.scores)
            kls.append(((ro.logps - ro.ref_logps) * ro.mask).sum(-1))
            lengths.append(ro.mask.sum(-1).float())
            texts += ro.texts
    r, kl, n = torch.cat(rewards), torch.cat(kls), torch.cat(lengths)
    metrics = {"reward": float(r.mean()), "kl": float(kl.mean()), "completion_tokens": float(n.mean())}
    # per prompt, for intervals and paired tests (evaluate/stats.py); seeded draws, so before and
    # after sample with the same randomness and the pairs share more than the prompt
    rows = {"columns": {"reward": r.tolist(), "kl": kl.tolist(), "tokens": n.tolist()},
            "metrics": {"reward": ["mean", "reward"], "kl": ["mean", "kl"], "completion_tokens": ["mean", "tokens"]}}
    if scorer.is_classifier:  # the classifier's probability of the good label is above 1/2
        metrics["positive_share"] = float((r > 0).float().mean())
        rows["columns"]["positive"] = (r > 0).float().tolist()
        rows["metrics"]["positive_share"] = ["share", "positive"]
    samples = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": c, "reward": round(float(s), 3)}
               for p, c, s in list(zip(prompts, texts, r))[:cfg.eval.num_samples or 5]]
    return {"metrics": metrics, "samples": samples, "rows": rows}


def _tax_features(cfg: RunConfig, tokenizer) -> list[dict]:
    from tunesmith.data import load_records
    from tunesmith.data.tokenize import tokenize_cpt

    key = (cfg.pref.tax_data, cfg.data.max_length, cfg.pref.tax_blocks, tokenizer.name_or_path)
    if key not in _TAX_FEATURES:
        records, _ = load_records(cfg.pref.tax_data, cfg.data.model_copy(update={"where": {}, "columns": {}}))
        exs, feats = [], []
        for rec in records:  # enough documents for tax_blocks blocks, not the whole corpus
            text = rec.fields.get("text")
            if isinstance(text, str) and text.strip():
                exs.append(Example(where=rec.where, text=text))
            if len(exs) % 200 == 0 and exs:
                feats, _ = tokenize_cpt(exs, cfg.data.model_copy(update={"packing": True}), tokenizer)
                if len(feats) >= cfg.pref.tax_blocks:
                    break
        if len(feats) < cfg.pref.tax_blocks:
            feats, _ = tokenize_cpt(exs, cfg.data.model_copy(update={"packing": True}), tokenizer)
        _TAX_FEATURES[key] = feats[: cfg.pref.tax_blocks]
    return _TAX_FEATURES[key]


@torch.no_grad()
def alignment_tax(model, tokenizer, cfg: RunConfig, acc) -> float:
    """Perplexity on the first `tax_blocks` blocks of pref.tax_data (e.g. the King James Bible)."""
    feats = _tax_features(cfg, tokenizer)
    was_training = model.training
    model.eval()
    loss, count = 0.0, 0
    for idxs in batch_order([len(f["input_ids"]) for f in feats], cfg.eval.batch_size, shuffle=False):
        batch = {k: v.to(acc.device) for k, v in collate([feats[i] for i in idxs], tokenizer.pad_token_id).items()}
        with acc.autocast():
            out = causal_lm(model, batch)
        loss += float(out.loss_sum)
        count += out.count
    model.train(was_training)
    return math.exp(loss / max(count, 1))
