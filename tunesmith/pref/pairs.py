"""Preference data from a policy and a reward: sample K continuations per prompt, rank them by reward.

This is the offline half of RLHF when no person labels the pairs: the reward (a reward model, a
classifier's log-odds or a Python function) ranks the policy's own samples, and DPO, IPO or KTO
then learn from those rankings without sampling during training. `tunesmith make-pairs` runs it
on a prompt config (the one PPO or GRPO would use) and writes one JSONL file per split, so the
held-out prompts stay held out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig, load_config
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.pref.data import encode_prompt, use_chat
from tunesmith.pref.rollout import get_scorer, sample
from tunesmith.tasks.preference import load_pref_examples
from tunesmith.utils import check_output_folder, output_folder

FORMATS = ("pair", "ranking")


def _policy(cfg: RunConfig, policy_run: str | None, device):
    """The model to sample from: a finished run (e.g. an SFT policy) or the config's base model."""
    from tunesmith.models.load import load_model, load_tokenizer, resolve_model_path
    from tunesmith.methods.saved import load_run, to_device

    if policy_run:
        loaded = load_run(policy_run)
        return to_device(loaded.model, device).eval(), loaded.tokenizer
    path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    model = load_model(path, "sft", trust_remote_code=cfg.model.trust_remote_code, pad_token_id=tok.pad_token_id)
    return model.to(device).eval(), tok


def _rows(prompt, texts: list[str], scores: list[float], fmt: str) -> dict[str, Any] | None:
    # A sample that stopped at once has no text to prefer or reject (and preference data must not
    # hold empty responses): rank the others.
    order = sorted((i for i in range(len(texts)) if texts[i].strip()), key=lambda i: -scores[i])  # best first
    if len(order) < 2:
        return None
    if fmt == "ranking":
        return {"prompt": prompt, "responses": [texts[i] for i in order], "scores": [round(scores[i], 4) for i in order]}
    best, worst = order[0], order[-1]
    if scores[best] == scores[worst] or texts[best] == texts[worst]:
        return None  # a tie says nothing about which is better
    return {"prompt": prompt, "chosen": texts[best], "rejected": texts[worst],
            "chosen_reward": round(scores[best], 4), "rejected_reward": round(scores[worst], 4)}


@torch.no_grad()
def make_pairs(config: str | Path | dict, out_dir: str | Path, overrides: list[str] | dict | None = None, *,
               per_prompt: int = 4, fmt: str = "pair", policy_run: str | None = None, overwrite: bool = False,
               on_progress=None) -> dict[str, dict[str, Any]]:
    """Sample `per_prompt` continuations of every prompt in each split, score them, write `<split>.jsonl`.

    fmt "pair" writes prompt/chosen/rejected (best against worst sample; ties skipped), "ranking"
    writes prompt/responses/scores (all K, best first; the loader expands them into K(K-1)/2 pairs).
    Empty samples (the policy stopped at once) are left out of the ranking; a prompt with fewer
    than two non-empty samples gives no row.
    Returns per split: prompts, rows written, prompts skipped, mean reward of the best and worst.
    """
    from tunesmith.models.device import resolve_device
    from transformers import set_seed

    cfg = load_config(config, overrides)
    if fmt not in FORMATS:
        raise ConfigError(f"make-pairs: format must be one of {FORMATS}, got {fmt!r}")
    if per_prompt < 2:
        raise ConfigError("make-pairs: --per-prompt must be at least 2 (a pair needs two samples)")
    if not (cfg.pref.reward_model or cfg.pref.reward_fn):
        raise ConfigError("make-pairs: the config names no reward; set pref.reward_model and/or pref.reward_fn")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)  # now, not after the slow sampling
    data_fmt, splits = load_pref_examples(cfg)
    if data_fmt != "prompt":
        raise TunesmithError(f"make-pairs needs prompts (a 'prompt' or 'text' column); {cfg.data.train} holds {data_fmt} data")
    set_seed(cfg.train.seed)
    device = torch.device(resolve_device(cfg.train))
    model, tokenizer = _policy(cfg, policy_run, device)
    chat = use_chat(cfg, [e for exs in splits.values() for e in exs], tokenizer)
    scorer = get_scorer(cfg, device)
    per_batch = max(1, cfg.eval.batch_size // per_prompt)
    summary: dict[str, dict[str, Any]] = {}
    with output_folder(out_dir, overwrite) as tmp:  # all splits or nothing
        for split, examples in splits.items():
            prompts = [e.prompt for e in examples]
            rows, best, worst = [], [], []
            for i in range(0, len(prompts), per_batch):
                chunk = prompts[i: i + per_batch]
                rep = [p for p in chunk for _ in range(per_prompt)]  # a prompt's samples are adjacent
                ids, _, width, mask = sample(model, tokenizer, [encode_prompt(p, cfg, tokenizer, chat) for p in rep], cfg, device)
                texts = tokenizer.batch_decode([row[width:][m.bool()] for row, m in zip(ids, mask)], skip_special_tokens=True)
                scores = scorer(rep, texts).tolist()
                for j, prompt in enumerate(chunk):
                    s = scores[j * per_prompt: (j + 1) * per_prompt]
                    row = _rows(prompt, texts[j * per_prompt: (j + 1) * per_prompt], s, fmt)
                    if row is not None:
                        rows.append(row)
                        kept = row.get("scores") or [row["chosen_reward"], row["rejected_reward"]]
                        best.append(max(kept))
                        worst.append(min(kept))
                if on_progress:
                    on_progress(split, min(i + per_batch, len(prompts)), len(prompts))
            with (tmp / f"{split}.jsonl").open("w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            summary[split] = {"prompts": len(prompts), "rows": len(rows), "skipped": len(prompts) - len(rows),
                              "mean_best_reward": sum(best) / max(len(best), 1),
                              "mean_worst_reward": sum(worst) / max(len(worst), 1)}
        (tmp / "make_pairs.json").write_text(json.dumps(
            {"config": cfg.model_dump(mode="json"), "per_prompt": per_prompt, "format": fmt, "policy": policy_run,
             "summary": summary}, indent=2))
    return summary
