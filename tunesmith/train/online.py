"""Online RL from a reward: PPO (InstructGPT's step 3) and GRPO.

One training step = one rollout: sample completions for a batch of prompts (with the KV
cache, through `generate`), score them with the reward, compute the old policy's and the
reference's log-probs once, then optimise on the rollout for `ppo_epochs` passes.

PPO: a value head on the policy's last hidden state; per-token reward = -kl_coef * (log pi -
log pi_ref) plus the score at the last token; GAE advantages; clipped policy and value losses.
GRPO: `num_generations` samples per prompt, advantages relative to the prompt's group, no value
head, KL to the reference as a loss term. The reference is the base with the adapter switched
off (peft), else a frozen copy made before the first step.
"""
from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from transformers import get_scheduler

from tunesmith.config import RunConfig
from tunesmith.data.collate import batch_order
from tunesmith.errors import TrainingCancelled
from tunesmith.evaluate.plots import pyplot, save_figure
from tunesmith.pref.losses import (
    adapt_kl_coef,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from tunesmith.pref.evaluate import evaluate_policy
from tunesmith.pref.rollout import Rollout, get_scorer, make_reference, make_rollout, policy_forward
from tunesmith.tasks import get_task
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loop import FitResult, _improved, _restore, _truncate_log, make_optimizer


# ---------------------------------------------------------------- the loop
class RunningMoments:
    """Running std of scores (Welford), for scale-normalised rewards across rollouts."""

    def __init__(self, state: dict | None = None):
        self.n, self.mean, self.m2 = (state["n"], state["mean"], state["m2"]) if state else (0, 0.0, 0.0)

    def update(self, x: torch.Tensor) -> None:
        for v in x.tolist():
            self.n += 1
            d = v - self.mean
            self.mean += d / self.n
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0
        return std if std > 1e-6 else 1.0  # constant scores so far: leave them unscaled

    def state(self) -> dict:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}


def _optimise(bundle: nn.ModuleDict, ro: Rollout, cfg: RunConfig, optimizer, scheduler, acc, params,
              kl_coef: float) -> dict:
    """PPO or GRPO passes over one rollout; returns the step's averaged losses."""
    p, grpo = cfg.pref, get_task(cfg.task).online == "group"
    policy, v_head = bundle["policy"], (None if grpo else bundle["value"])
    device = acc.device
    n = ro.ids.shape[0]
    with torch.no_grad():
        if grpo:
            adv = group_advantages(ro.scores, p.num_generations)  # (N,)
        else:
            rewards, _ = kl_penalised_rewards(ro.scores, ro.logps, ro.ref_logps, ro.mask, kl_coef)
            adv, returns = gae(rewards, ro.values, ro.mask, p.gamma, p.lam)
            if p.whiten_advantages:
                adv = masked_whiten(adv, ro.mask)
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "loss": 0.0}
    updates = 0
    for _ in range(p.ppo_epochs):
        for idx in torch.randperm(n).split(p.mini_batch_size):
            ids, attn, mask = ro.ids[idx].to(device), ro.attn[idx].to(device), ro.mask[idx].to(device)
            with acc.autocast():
                lp, values, _ = policy_forward(policy, ids, attn, ro.width, p.temperature, cfg.method.name, v_head)
            old = ro.logps[idx].to(device)
            if grpo:
                pl, _, cf = grpo_loss(lp, old, ro.ref_logps[idx].to(device), adv[idx].to(device), mask, p.clip_range, p.beta)
                vl = torch.zeros(())
                loss = pl
            else:
                pl, cf = ppo_policy_loss(lp, old, adv[idx].to(device), mask, p.clip_range)
                vl = ppo_value_loss(values, ro.values[idx].to(device), returns[idx].to(device), mask, p.value_clip)
                loss = pl + p.vf_coef * vl
            acc.backward(loss)
            if cfg.train.max_grad_norm is not None:
                acc.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            for k, v in (("policy_loss", pl), ("value_loss", vl), ("clipfrac", cf), ("loss", loss)):
                sums[k] += float(v.detach())
    return {k: v / max(updates, 1) for k, v in sums.items()}


def fit_online(model, tokenizer, data, cfg: RunConfig, acc, run_dir: Path, *, on_event=None,
               cancel: threading.Event | None = None, resume_from: Path | None = None):
    """The online loop with the ordinary loop's run semantics: events for `on_event`, evaluation on the
    validation prompts every `eval_every` with keep-best (`checkpoints/best`) and early stopping, a
    checkpoint at each evaluation and on cancel, and an exact `--resume`."""

    p, t, grpo = cfg.pref, cfg.train, get_task(cfg.task).online == "group"
    emit = on_event or (lambda e: None)
    feats = data.splits["train"].features
    val = data.splits.get("validation")
    metric, greater = cfg.best_metric()
    per_step = p.rollout_prompts
    steps_per_epoch = math.ceil(len(feats) / per_step)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    scorer = get_scorer(cfg, acc.device)
    reference = make_reference(model)

    bundle = nn.ModuleDict({"policy": model})
    if not grpo:  # PPO's critic: a linear value head on the policy's last hidden state, starting at 0
        hidden = model.get_output_embeddings().weight.shape[1] if model.get_output_embeddings() is not None else model.config.hidden_size
        bundle["value"] = nn.Linear(hidden, 1).to(acc.device)
        nn.init.zeros_(bundle["value"].weight)
        nn.init.zeros_(bundle["value"].bias)
    samples_per_step = per_step * (p.num_generations if grpo else 1)
    updates_per_step = p.ppo_epochs * math.ceil(samples_per_step / p.mini_batch_size)
    optimizer = make_optimizer(bundle, cfg, acc.device.type)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps * updates_per_step),
                              num_training_steps=total_steps * updates_per_step)
    params = [q for q in bundle.parameters() if q.requires_grad]
    prog = {"step": 0, "epoch": 0, "batch": 0, "moments": None, "kl_coef": p.kl_coef,
            "best_value": None, "best_step": None, "bad_evals": 0}
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:  # older checkpoints lack the keep-best keys: prog's defaults stay
        prog = prog | _restore(resume_from, acc, bundle, optimizer, scheduler, None, None, emit)
        _truncate_log(metrics_path, prog["step"])
    moments = RunningMoments(prog["moments"])
    history = [json.loads(l) for l in metrics_path.read_text().splitlines()] if metrics_path.exists() else []

    def log(row):
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        emit(row)

    start = time.perf_counter()
    tokens, stop = 0, False
    model.train()
    while prog["step"] < total_steps and not stop:
        batches = batch_order([len(f["prompt_ids"]) for f in feats], per_step, shuffle=True, seed=t.seed,
                              epoch=prog["epoch"], group_by_length=False)  # the ordinary loop's seeded shuffle
        while prog["step"] < total_steps and prog["batch"] < len(batches) and not stop:
            chosen = [feats[i] for i in batches[prog["batch"]]]
            reps = p.num_generations if grpo else 1
            prompts = [f["prompt"] for f in chosen for _ in range(reps)]  # a prompt's group is adjacent
            prompt_ids = [f["prompt_ids"] for f in chosen for _ in range(reps)]
            ro = make_rollout(model, reference, tokenizer, prompts, prompt_ids, scorer, cfg, acc,
                              None if grpo else bundle["value"])
            raw = ro.scores.clone()
            if not grpo and p.normalize_reward:
                moments.update(raw)
                ro.scores = raw / moments.std
            kl_coef = prog.get("kl_coef", p.kl_coef)  # the coefficient this rollout's rewards use
            losses = _optimise(bundle, ro, cfg, optimizer, scheduler, acc, params, kl_coef)
            prog["step"] += 1
            prog["batch"] += 1
            tokens += int(ro.attn.sum())
            kl = ((ro.logps - ro.ref_logps) * ro.mask).sum(-1)  # per-sequence KL estimate to the reference
            if not grpo and p.kl_target is not None:
                prog["kl_coef"] = adapt_kl_coef(kl_coef, float(kl.mean()), p.kl_target, len(kl), p.kl_horizon)
            row = {"kind": "train", "step": prog["step"], "epoch": round(prog["epoch"] + prog["batch"] / len(batches), 3),
                   "reward": float(raw.mean()), "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
                   "kl": float(kl.mean()), "entropy": float(masked_mean(ro.entropy, ro.mask)),
                   "completion_tokens": float(ro.mask.sum(-1).float().mean()), **losses,
                   **({} if grpo else {"kl_coef": kl_coef}),
                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(time.perf_counter() - start, 1e-9)}
            log(row)
            print(f"step {row['step']}/{total_steps}: reward {row['reward']:.3f} kl {row['kl']:.3f} "
                  f"entropy {row['entropy']:.2f} clipfrac {row['clipfrac']:.3f} loss {row['loss']:.4f}", file=sys.stderr, flush=True)
            if prog["batch"] >= len(batches):
                prog.update(epoch=prog["epoch"] + 1, batch=0)
            step = prog["step"]
            save = (t.eval_every != "epoch" and step % t.eval_every == 0) or step == total_steps or \
                   (t.eval_every == "epoch" and prog["batch"] == 0)
            if save and val is not None:  # keep-best and early stopping on the held-out prompts
                m = evaluate_policy(model, tokenizer, val.examples, cfg, acc, data.chat)["metrics"]  # reward, KL, length
                if _improved(m[metric], prog["best_value"], greater):
                    ckpt.save_checkpoint(run_dir / "checkpoints" / "best", model)
                    prog.update(best_value=m[metric], best_step=step, bad_evals=0)
                else:
                    prog["bad_evals"] += 1
                stop = t.early_stopping_patience is not None and prog["bad_evals"] >= t.early_stopping_patience
                log({"kind": "eval", "step": step, "epoch": row["epoch"], **m, "early_stop": stop,
                     "elapsed_s": round(time.perf_counter() - start, 2)})
            if save or stop or (cancel is not None and cancel.is_set()):
                prog["moments"] = moments.state()
                ckpt.save_checkpoint(run_dir / "checkpoints" / f"step-{step}", bundle, optimizer, scheduler, dict(prog))
                ckpt.prune_checkpoints(run_dir, t.keep_checkpoints)
                emit({"kind": "checkpoint", "step": step})
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled(f"cancelled at step {step}; resume with --resume")
    if not grpo:
        torch.save(bundle["value"].state_dict(), run_dir / "value_head.pt")
    plot_rl_curves(metrics_path, run_dir / "rl_curves.png", None if grpo else p.kl_target)
    return FitResult(steps=prog["step"], best_metric=metric, best_value=prog["best_value"], best_step=prog["best_step"],
                     stopped_early=stop, train_seconds=time.perf_counter() - start, history=history)


def plot_rl_curves(metrics_path: Path, out_png: Path, kl_target: float | None = None) -> None:
    """Mean reward and KL to the reference per step; with PPO, the KL coefficient on a second axis
    (and the controller's target, when there is one), so a reader sees what held the KL."""
    plt = pyplot()
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r["kind"] == "train" and "reward" in r]
    if not rows:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot([r["step"] for r in rows], [r["reward"] for r in rows], lw=1)
    ax1.set_title("mean reward per rollout")
    ax2.plot([r["step"] for r in rows], [r["kl"] for r in rows], lw=1, color="tab:red")
    ax2.set_title("KL to reference (per sequence)")
    if kl_target is not None:
        ax2.axhline(kl_target, ls="--", lw=1, color="tab:red", alpha=0.6, label=f"kl_target {kl_target:g}")
        ax2.legend(loc="upper left", fontsize=8)
    if any("kl_coef" in r for r in rows):
        ax3 = ax2.twinx()
        ax3.plot([r["step"] for r in rows], [r.get("kl_coef") for r in rows], lw=1, color="tab:gray")
        ax3.set_ylabel("kl_coef", color="tab:gray")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
    save_figure(fig, out_png)
