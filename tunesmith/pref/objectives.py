"""Offline preference objectives, (model, batch) -> LossOut, for the ordinary training loop.

A batch holds R rows per feature stacked role by role (data/collate.collate_rows): reward, DPO
and ORPO have [chosen..., rejected...]; KTO has [response..., mismatched response...]. DPO and
KTO need the reference policy's log-probabilities of each row: `add_reference_logps` computes
them once before training (the reference is frozen) and stores them in the features.

`correct` counts pairs ranked the right way (the pairwise / reward accuracy) and `extras` carries
margin sums, so evaluation reports accuracy and the mean reward margin.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from tunesmith.data.collate import batch_order, collate_rows, feature_length
from tunesmith.objectives import LossOut, target_logits
from tunesmith.pref.losses import (
    dpo_loss,
    kto_loss,
    orpo_odds_ratio,
    reward_pair_loss,
)

def lm_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts of every row: ((N,), (N,)).

    Like the SFT loss, asks for logits only at the positions that predict a response token
    (see objectives.causal_lm): prompts carry no log-probability here.
    """
    logits, target, keep = target_logits(model, batch)  # (K, V), (K,), (N, T-1)
    logits = logits.float()
    tok = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (K,)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(len(keep), dtype=tok.dtype, device=tok.device).index_add(0, rows, tok), keep.sum(-1)


def _weighted(losses: torch.Tensor, batch) -> torch.Tensor:
    return (losses * batch["weight"]).sum()


def _rows(losses: torch.Tensor, right: torch.Tensor, margin: torch.Tensor, batch) -> dict[str, torch.Tensor]:
    """Per pair (or example): weighted loss, weight, ranked right, margin (tasks/preference.py)."""
    return {"loss": (losses * batch["weight"]).detach().float(), "weight": batch["weight"].float(),
            "correct": right.float(), "margin": margin.detach().float()}


def reward_objective(model, batch, pref) -> LossOut:
    r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()  # (2B,)
    r_c, r_r = r.chunk(2)
    margin = batch["margin"] if bool((batch["margin"] != 0).any()) else None
    losses = reward_pair_loss(r_c, r_r, margin)
    diff = (r_c - r_r).detach()
    return LossOut(_weighted(losses, batch), len(r_c), int((diff > 0).sum()),
                   extras={"margin": float(diff.sum()), "chosen_reward": float(r_c.detach().sum()),
                           "rejected_reward": float(r_r.detach().sum())},
                   rows=_rows(losses, diff > 0, diff, batch))


def dpo_objective(model, batch, pref) -> LossOut:
    lp, n = lm_logps(model, batch)
    p_c, p_r = lp.chunk(2)
    n_c, n_r = n.chunk(2)
    ref_c, ref_r = batch["ref"].chunk(2)
    losses, rew_c, rew_r = dpo_loss(p_c, p_r, ref_c, ref_r, pref.beta, pref.loss_type, pref.label_smoothing, n_c, n_r)
    # log pi_ref - log pi averaged over the pair's two responses. When the responses were sampled
    # from the reference (tunesmith make-pairs) this estimates KL(pi_ref || pi): DPO's per-step
    # drift, without generating.
    ref_logratio = -(rew_c + rew_r) / (2 * pref.beta)
    return LossOut(_weighted(losses, batch), len(p_c), int((rew_c > rew_r).sum()),
                   extras={"margin": float((rew_c - rew_r).sum()), "chosen_reward": float(rew_c.sum()),
                           "rejected_reward": float(rew_r.sum()), "ref_logratio": float(ref_logratio.sum())},
                   rows=_rows(losses, rew_c > rew_r, rew_c - rew_r, batch))


def orpo_objective(model, batch, pref) -> LossOut:
    lp, n = lm_logps(model, batch)
    mean = lp / n.clamp(min=1)  # ORPO works with per-token mean log-probs
    m_c, m_r = mean.chunk(2)
    ratio = orpo_odds_ratio(m_c, m_r)
    losses = -m_c - pref.orpo_lambda * ratio  # SFT loss on the chosen response + odds-ratio term
    return LossOut(_weighted(losses, batch), len(m_c), int((m_c > m_r).sum()),
                   extras={"margin": float((m_c - m_r).detach().sum()), "log_odds_ratio": float(ratio.detach().sum())},
                   rows=_rows(losses, m_c > m_r, m_c - m_r, batch))


def kto_objective(model, batch, pref) -> LossOut:
    lp, _ = lm_logps(model, batch)
    p, p_kl = lp.chunk(2)
    ref, ref_kl = batch["ref"].chunk(2)
    kl = (p_kl - ref_kl).mean().detach()  # z0: the batch's KL estimate on mismatched pairs
    good = batch["desirable"]
    losses, rewards = kto_loss(p, ref, good, kl, pref.beta, pref.desirable_weight, pref.undesirable_weight)
    right = ((rewards > 0) & (good > 0)) | ((rewards < 0) & (good == 0))
    sign = good * 2 - 1  # margin: desirable rewards count up, undesirable down
    return LossOut(_weighted(losses, batch), len(p), int(right.sum()),
                   extras={"margin": float((sign * rewards).sum()), "kl": float(kl) * len(p)},
                   rows=_rows(losses, right, sign * rewards, batch))


def count_weights(batch: dict[str, torch.Tensor]) -> float:
    """Loss denominator of a preference objective: the summed weights of its pairs (or examples)."""
    return float(batch["weight"].sum())


def reference_context(model):
    """The frozen reference policy: a peft model with its adapter switched off (no second copy of
    the weights); any other model is still the reference before its first step."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else nullcontext()


@torch.no_grad()
def add_reference_logps(model, feats: list[dict], pad_id: int, device, batch_size: int) -> None:
    """Store each row's reference log-prob in feats[i]["ref"] (computed once, before training)."""
    was_training = model.training
    model.eval()
    with reference_context(model):
        for idxs in batch_order([feature_length(f) for f in feats], batch_size, shuffle=False):
            group = [feats[i] for i in idxs]
            batch = {k: v.to(device) for k, v in collate_rows([{"rows": f["rows"]} for f in group], pad_id).items()}
            lp, _ = lm_logps(model, batch)
            per_row = lp.view(len(group[0]["rows"]), len(group)).T  # (B, R)
            for f, row in zip(group, per_row.tolist()):
                f["ref"] = row
    model.train(was_training)
