"""Preference and RL losses as plain tensor functions (no models, no trainers).

Each takes per-sequence or per-token tensors and returns per-example losses, so callers can
weight and sum them (the loop normalises by the whole step's count). Shapes in comments:
B = pairs/sequences, T = completion tokens. Tests check each against an independent
reference (a float64 hand computation, or trl's implementation) on identical tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- entropy
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- reward model
def reward_pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry pairwise loss -log sigmoid(r_c - r_r - margin) (InstructGPT; Llama 2's margin). (B,) -> (B,)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


# ---------------------------------------------------------------- DPO family
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023), conservative DPO (label smoothing) and IPO (Azar et al. 2023).

    Inputs are summed sequence log-probs (B,). Returns (losses, chosen_rewards, rejected_rewards),
    each (B,); the implicit rewards are beta * (log pi - log pi_ref).

    sigmoid: -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r).
      With label_smoothing eps (cDPO): -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
      i.e. the preference label is assumed flipped with probability eps.
    ipo: (h' - 1/(2 beta))^2 with h' using per-token-averaged log ratios (as trl does, after the
      IPO authors: it keeps beta comparable across completion lengths).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if kind == "sigmoid":
        h = chosen_ratio - rejected_ratio
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the completion token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss '{kind}'")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) for unpaired feedback. (B,) inputs -> (losses (B,), rewards (B,)).

    r = log pi - log pi_ref; z0 = kl, the batch's (detached, >= 0) KL estimate from mismatched
    prompt/completion pairs. Desirable: w_d (1 - sigmoid(beta (r - z0))); undesirable:
    w_u (1 - sigmoid(beta (z0 - r))).
    """
    r = policy - ref
    z0 = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad), beta * r.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """ORPO's log sigmoid(log odds ratio) (Hong et al. 2024, eq. 7) from per-token-mean log-probs. (B,) -> (B,).

    odds(y) = p / (1 - p) with p = exp(mean log-prob); the loss adds -lambda times this to the
    chosen response's NLL, so no reference model is needed.
    """
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return F.logsigmoid(log_odds)


# ---------------------------------------------------------------- PPO / GRPO
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries (and zero mean unless shift_mean is False)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_penalised_rewards(score: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: -kl_coef * (log pi - log pi_ref) at every token, plus the sequence
    score at its last real token (InstructGPT / Ziegler et al. 2019). (B,), (B, T), (B, T), (B, T) ->
    (rewards (B, T), per-token kl (B, T)). The KL estimate is zero wherever the policy equals the reference.
    """
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # one-hot at the last real token
    rewards = rewards + last * score.unsqueeze(-1)
    return rewards, kl


def adapt_kl_coef(kl_coef: float, kl: float, target: float, n_samples: int, horizon: int) -> float:
    """One step of the adaptive KL controller of Ziegler et al. 2019 (section 2.2).

    The coefficient moves towards whatever keeps the measured KL (nats per sequence) near
    `target`: e = clip(kl / target - 1, -0.2, 0.2); kl_coef *= 1 + e * n_samples / horizon.
    The clip bounds the change per rollout, so one noisy rollout cannot swing it.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_samples / horizon)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded completions.

    rewards, values, mask (B, T) -> (advantages (B, T), returns (B, T)). Beyond a row's last token
    the value is taken as 0 (the episode has ended).
    """
    T = rewards.shape[1]
    values = values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, adv + values


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al. 2017), averaged over real tokens: (B, T) -> (loss, clip fraction)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2), averaged over real tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each sample's score minus its prompt group's mean, over the group's std.

    scores (N * G,) with the G samples of a prompt adjacent -> (N * G,). A group whose samples all
    score the same gets advantage 0 (nothing to learn from it).
    """
    g = scores.view(-1, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale:
        adv = adv / (g.std(-1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, clip: float, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO objective: clipped surrogate with a sequence-level advantage at every token, plus
    beta * KL(pi || pi_ref) by the k3 estimator exp(d) - d - 1, d = log pi_ref - log pi (>= 0, unbiased).
    Token terms are averaged within each sequence, then over sequences (the paper's 1/|o_i| form).

    logps, old_logps, ref_logps, mask (B, T); advantages (B,) -> (loss, kl mean, clip fraction).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    per_token = torch.max(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logps is not None and beta > 0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask, dim=-1).mean()
    return loss, masked_mean(kl, mask), masked_mean((clipped > unclipped).float(), mask)
