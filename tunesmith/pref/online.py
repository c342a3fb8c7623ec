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

import copy
import importlib
import importlib.util
import json
import math
import random
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import get_scheduler

from tunesmith.config import PROMPT_METHODS, RunConfig
from tunesmith.errors import TrainingCancelled, TunesmithError
from tunesmith.objectives import logits_to_keep_kind
from tunesmith.pref.data import reward_text
from tunesmith.pref.losses import (
    adapt_kl_coef,
    entropy,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from tunesmith.pref.objectives import reference_context
from tunesmith.train import checkpoint as ckpt


# ---------------------------------------------------------------- reward
def _import_fn(spec: str):
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise TunesmithError(f"pref.reward_fn: '{spec}' should look like 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise TunesmithError(f"pref.reward_fn: file not found: {path}")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise TunesmithError(f"pref.reward_fn: cannot import '{target}': {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TunesmithError(f"pref.reward_fn: '{target}' has no function '{name}'")
    return fn


class RewardScorer:
    """The reward: a reward-model run, a classifier run (log-odds of a label), a Python function, or their sum."""

    def __init__(self, cfg: RunConfig, device):
        from tunesmith.runs import load_run, to_device

        pref = cfg.pref
        self.fn = _import_fn(pref.reward_fn) if pref.reward_fn else None
        self.model = None
        self.is_classifier = False
        if pref.reward_model:
            loaded = load_run(pref.reward_model)
            if loaded.cfg.task not in ("reward", "classification"):
                raise TunesmithError(f"pref.reward_model: {pref.reward_model} is a '{loaded.cfg.task}' run; "
                                     "use a reward or classification run")
            self.label = 0
            if loaded.cfg.task == "classification":
                labels = loaded.labels or []
                if pref.reward_label not in labels:
                    raise TunesmithError(f"pref.reward_label: {pref.reward_model} is a classifier; say which of its "
                                         f"labels {labels} is good (got {pref.reward_label!r})")
                self.label, self.is_classifier = labels.index(pref.reward_label), True
            self.model = to_device(loaded.model, device).eval()
            self.tokenizer = loaded.tokenizer
            self.tokenizer.truncation_side = loaded.cfg.data.truncation_side
            self.max_length = loaded.cfg.data.max_length
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str], batch_size: int = 32) -> torch.Tensor:
        total = torch.zeros(len(completions))
        if self.model is not None:
            texts = [reward_text(p, c) for p, c in zip(prompts, completions)]
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i: i + batch_size], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()  # (B, C)
                if self.is_classifier:  # log-odds of the good label against all others
                    others = torch.cat([logits[:, :self.label], logits[:, self.label + 1:]], dim=-1)
                    r = logits[:, self.label] - torch.logsumexp(others, dim=-1)
                else:
                    r = logits[:, 0]
                total[i: i + len(r)] += r.cpu()
        if self.fn is not None:
            values = self.fn(list(prompts), list(completions))
            if len(values) != len(completions) or not all(isinstance(v, (int, float)) for v in values):
                raise TunesmithError(f"pref.reward_fn must return one number per completion "
                                     f"(got {type(values).__name__} of length {len(values)} for {len(completions)})")
            total += torch.tensor([float(v) for v in values])
        return total


# ---------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    ids: torch.Tensor  # (N, P + T) left-padded prompt, then the completion
    attn: torch.Tensor  # (N, P + T) 1 = real token (completion tokens after EOS are 0)
    width: int  # P: prompt width
    mask: torch.Tensor  # (N, T) completion tokens up to and including EOS
    prompts: list
    texts: list[str]
    scores: torch.Tensor  # (N,)
    logps: torch.Tensor | None = None  # (N, T) sampling policy
    ref_logps: torch.Tensor | None = None  # (N, T)
    values: torch.Tensor | None = None  # (N, T)
    entropy: torch.Tensor | None = None  # (N, T)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        attn[i, width - len(p):] = 1
    return ids, attn


def completion_mask(completion: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it. (N, T) -> (N, T)."""
    if eos_id is None:
        return torch.ones_like(completion)
    is_eos = (completion == eos_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], cfg: RunConfig, device) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Sample one completion per prompt: (ids, attention, prompt width, completion mask)."""
    p = cfg.pref
    ids, attn = left_pad(prompt_ids, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                         temperature=p.temperature, top_k=p.top_k or None, top_p=p.top_p,
                         max_new_tokens=p.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    width = ids.shape[1]
    mask = completion_mask(gen[:, width:].cpu(), tokenizer.eos_token_id)
    return gen.cpu(), torch.cat([attn, mask], dim=1), width, mask


def policy_forward(model, ids: torch.Tensor, attn: torch.Tensor, width: int, temperature: float, method: str,
                   value_head: nn.Module | None = None, with_entropy: bool = False):
    """Log-probs of the completion tokens (N, T), and optionally their values (N, T) and entropies (N, T)."""
    kwargs = {} if method in PROMPT_METHODS else {"position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}
    L = ids.shape[1]
    # Logits only at the positions that predict a response token (width-1 .. L-2), indexed from
    # the end so that prompt-learning's virtual tokens in front do not shift them.
    keep = logits_to_keep_kind(model) != "none"
    if keep:
        kwargs["logits_to_keep"] = torch.arange(width - 1 - L, -1, device=ids.device)
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=value_head is not None, **kwargs)
    logits = out.logits if keep else out.logits[:, -L:][:, width - 1:-1]
    logits = logits.float() / temperature  # (N, T, V): position t-1 predicts token t
    target = ids[:, width:].unsqueeze(-1)
    logps = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    values = value_head(out.hidden_states[-1][:, -L:][:, width - 1:-1].float()).squeeze(-1) if value_head is not None else None
    ent = entropy(logits.detach()) if with_entropy else None
    return logps, values, ent


@torch.no_grad()
def make_rollout(model, reference, tokenizer, prompts: list, prompt_ids: list[list[int]], scorer: RewardScorer,
                 cfg: RunConfig, acc, value_head=None) -> Rollout:
    # Sampling and the old/reference log-probs run under the training precision: PPO's ratio
    # exp(logp - old) must be exactly 1 before the first update, which a bf16 update pass
    # measured against fp32 rollout log-probs is not (its noise spends the clip range).
    device = acc.device
    with acc.autocast():
        ids, attn, width, mask = sample(model, tokenizer, prompt_ids, cfg, device)
    texts = tokenizer.batch_decode([row[width:][m.bool()] for row, m in zip(ids, mask)], skip_special_tokens=True)
    ro = Rollout(ids, attn, width, mask, prompts, texts, scorer(prompts, texts))
    was_training = model.training
    model.eval()
    dev = (ids.to(device), attn.to(device))
    with acc.autocast():
        lp, v, ent = policy_forward(model, *dev, width, cfg.pref.temperature, cfg.method.name, value_head,
                                    with_entropy=True)
        with reference(model) as ref_model:
            ref_lp, _, _ = policy_forward(ref_model, *dev, width, cfg.pref.temperature, cfg.method.name)
    model.train(was_training)
    ro.logps, ro.ref_logps, ro.entropy = lp.cpu(), ref_lp.cpu(), ent.cpu()
    ro.values = v.cpu() if v is not None else None
    return ro


_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_reference(model):
    """`with reference(model) as ref:` gives the frozen reference policy: the same peft model with its
    adapter switched off (no second copy of the weights), else a frozen copy of the starting model."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        @contextmanager
        def adapter_off(m):
            with reference_context(m):
                yield m
        return adapter_off
    if model not in _FROZEN:  # full / bitfit / bottleneck: a frozen copy of the start point, made once
        _FROZEN[model] = copy.deepcopy(model).eval().requires_grad_(False)
    frozen = _FROZEN[model]

    @contextmanager
    def start_point(m):
        yield frozen
    return start_point


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
    p, grpo = cfg.pref, cfg.task == "grpo"
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


def _prompt_batches(n: int, size: int, seed: int, epoch: int) -> list[list[int]]:
    idx = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(idx)
    return [idx[i: i + size] for i in range(0, n, size)]


def fit_online(model, tokenizer, data, cfg: RunConfig, acc, run_dir: Path, *, on_event=None,
               cancel: threading.Event | None = None, resume_from: Path | None = None):
    from tunesmith.train.loop import FitResult, make_optimizer

    p, t, grpo = cfg.pref, cfg.train, cfg.task == "grpo"
    emit = on_event or (lambda e: None)
    feats = data.splits["train"].features
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
    prog = {"step": 0, "epoch": 0, "batch": 0, "moments": None, "kl_coef": p.kl_coef}
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:
        ckpt.load_weights(resume_from, bundle)
        state = ckpt.load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        prog = state["progress"]
        from tunesmith.train.loop import _truncate_log
        _truncate_log(metrics_path, prog["step"])
    moments = RunningMoments(prog["moments"])
    history = [json.loads(l) for l in metrics_path.read_text().splitlines()] if metrics_path.exists() else []

    def log(row):
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        emit(row)

    start = time.perf_counter()
    tokens = 0
    model.train()
    while prog["step"] < total_steps:
        batches = _prompt_batches(len(feats), per_step, t.seed, prog["epoch"])
        while prog["step"] < total_steps and prog["batch"] < len(batches):
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
            if save or (cancel is not None and cancel.is_set()):
                prog["moments"] = moments.state()
                ckpt.save_checkpoint(run_dir / "checkpoints" / f"step-{step}", bundle, optimizer, scheduler, dict(prog))
                ckpt.prune_checkpoints(run_dir, t.keep_checkpoints)
                emit({"kind": "checkpoint", "step": step})
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled(f"cancelled at step {step}; resume with --resume")
    if not grpo:
        torch.save(bundle["value"].state_dict(), run_dir / "value_head.pt")
    plot_rl_curves(metrics_path, run_dir / "rl_curves.png", None if grpo else p.kl_target)
    return FitResult(steps=prog["step"], best_metric="reward", best_value=None, best_step=None, stopped_early=False,
                     train_seconds=time.perf_counter() - start, history=history)


_SCORERS: dict = {}


def get_scorer(cfg: RunConfig, device) -> RewardScorer:
    """One reward scorer per (reward model, function) in a process: loaded once, shared by training and evaluation."""
    key = (cfg.pref.reward_model, cfg.pref.reward_label, cfg.pref.reward_fn, str(device))
    if key not in _SCORERS:
        _SCORERS[key] = RewardScorer(cfg, device)
    return _SCORERS[key]


def plot_rl_curves(metrics_path: Path, out_png: Path, kl_target: float | None = None) -> None:
    """Mean reward and KL to the reference per step; with PPO, the KL coefficient on a second axis
    (and the controller's target, when there is one), so a reader sees what held the KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
