"""Evaluating a policy trained from preferences: reward of its samples, KL to the reference, and the
alignment tax (perplexity on held-out neutral text), before vs after on the same prompts and text."""
from __future__ import annotations

import math
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.data import text_blocks
from tunesmith.objectives import causal_lm_rows
from tunesmith.pref.data import encode_prompt
from tunesmith.pref.rollout import get_scorer, make_reference, make_rollout


@torch.no_grad()
def evaluate_policy(model, tokenizer, examples: list, cfg: RunConfig, acc, chat: bool) -> dict[str, Any]:
    """Sample one completion per distinct prompt of held-out examples (fixed seed, so before and
    after, and every evaluation during training, see the same draws of randomness), score it with
    the run's reward and measure the KL to the reference policy and the completion's length."""
    prompts = list({str(e.prompt): e.prompt for e in examples}.values())  # each prompt once
    prompt_ids = [encode_prompt(p, cfg, tokenizer, chat) for p in prompts]
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
    return {"metrics": metrics, "samples": samples, "rows": rows, "prompts": prompts}


def alignment_tax(model, tokenizer, cfg: RunConfig, acc) -> float:
    """Perplexity on the first `tax_blocks` blocks of pref.tax_data (e.g. the King James Bible)."""
    feats = text_blocks(cfg.pref.tax_data, cfg.pref.tax_blocks, cfg, tokenizer, "pref.tax_data")
    rows = causal_lm_rows(model, feats, tokenizer.pad_token_id, cfg.eval.batch_size, acc)
    return math.exp(sum(rows["loss"]) / max(sum(rows["tokens"]), 1))
