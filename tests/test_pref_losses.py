"""Preference / RL losses against independent references on identical tensors.

References are float64 hand computations written from the papers' formulas (loops, math.*),
and trl's own implementations where they are callable on their own (ORPO's odds ratio, the
entropy helper).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tunesmith.pref import losses as L

torch.manual_seed(0)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_entropy_matches_trl():
    from trl.trainer.utils import entropy_from_logits

    logits = torch.randn(2, 5, 13)
    assert torch.allclose(L.entropy(logits), entropy_from_logits(logits), atol=1e-5)


def test_reward_pair_loss_by_hand_with_margin():
    rc, rr, m = torch.tensor([1.5, -0.2]), torch.tensor([0.5, 0.3]), torch.tensor([0.25, 0.0])
    got = L.reward_pair_loss(rc, rr, m)
    want = [-math.log(_sig(1.5 - 0.5 - 0.25)), -math.log(_sig(-0.2 - 0.3))]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_and_conservative_dpo_by_hand(eps):
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.2
    losses, cr, rj = L.dpo_loss(pc, pr, rc, rr, beta, "sigmoid", eps)
    for i in range(5):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        want = -(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h))
        assert float(losses[i]) == pytest.approx(want, rel=1e-9)
        assert float(cr[i]) == pytest.approx(beta * float(pc[i] - rc[i]))
        assert float(rj[i]) == pytest.approx(beta * float(pr[i] - rr[i]))


def test_dpo_is_log2_when_policy_equals_reference():
    lp = torch.randn(4)
    losses, _, _ = L.dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.1)
    assert torch.allclose(losses, torch.full((4,), math.log(2)))


def test_ipo_by_hand():
    pc, pr, rc, rr = (torch.randn(3, dtype=torch.float64) for _ in range(4))
    nc, nr = torch.tensor([4.0, 2.0, 7.0]), torch.tensor([3.0, 5.0, 1.0])
    beta = 0.5
    losses, _, _ = L.dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_tokens=nc, rejected_tokens=nr)
    for i in range(3):
        h = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
        assert float(losses[i]) == pytest.approx(float((h - 1 / (2 * beta)) ** 2), rel=1e-9)


def test_kto_by_hand():
    pol, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -2.5])
    good = torch.tensor([1.0, 0.0, 0.0])
    kl, beta, wd, wu = torch.tensor(0.3), 0.1, 1.0, 1.33
    losses, rewards = L.kto_loss(pol, ref, good, kl, beta, wd, wu)
    r = [1.0, -0.5, 0.5]
    want = [wd * (1 - _sig(beta * (r[0] - 0.3))), wu * (1 - _sig(beta * (0.3 - r[1]))), wu * (1 - _sig(beta * (0.3 - r[2])))]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert rewards.tolist() == pytest.approx([beta * x for x in r], rel=1e-6)
    # z0 is a detached, non-negative estimate: a negative KL estimate counts as 0
    neg, _ = L.kto_loss(pol, ref, good, torch.tensor(-1.0), beta)
    zero, _ = L.kto_loss(pol, ref, good, torch.tensor(0.0), beta)
    assert torch.equal(neg, zero)


def test_orpo_odds_ratio_matches_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    mc, mr = -torch.rand(6) * 3 - 0.01, -torch.rand(6) * 3 - 0.01  # per-token mean log-probs (< 0)
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, *_ = ORPOTrainer.odds_ratio_loss(fake, mc, mr)
    assert torch.allclose(0.1 * L.orpo_odds_ratio(mc, mr), trl_losses, atol=1e-6)
    # and by hand: log sigmoid(log(p_c/(1-p_c)) - log(p_r/(1-p_r)))
    for c, r, got in zip(mc.tolist(), mr.tolist(), L.orpo_odds_ratio(mc, mr).tolist()):
        pc, pr = math.exp(c), math.exp(r)
        assert got == pytest.approx(math.log(_sig(math.log(pc / (1 - pc)) - math.log(pr / (1 - pr)))), rel=1e-4)


def test_gae_matches_a_loop_over_each_episode():
    B, T, gamma, lam = 3, 6, 0.97, 0.9
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            want = sum((gamma * lam) ** k * (rewards[b, t + k] + gamma * (values[b, t + k + 1] if t + k + 1 < n else 0.0)
                                            - values[b, t + k]) for k in range(n - t))
            assert float(adv[b, t]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
            assert float(ret[b, t]) == pytest.approx(float(want + values[b, t]), rel=1e-9, abs=1e-12)
        assert torch.all(adv[b, n:] == 0)


def test_kl_penalty_is_zero_when_policy_equals_reference_and_score_lands_on_last_token():
    lp = torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rewards, kl = L.kl_penalised_rewards(torch.tensor([2.0, -1.0]), lp, lp.clone(), mask, kl_coef=0.2)
    assert torch.all(kl == 0)
    assert rewards.tolist() == [[0, 0, 2.0, 0, 0], [0, 0, 0, 0, -1.0]]
    rewards, kl = L.kl_penalised_rewards(torch.zeros(2), lp, lp - 0.5, mask, kl_coef=0.2)
    assert torch.allclose(rewards, -0.1 * mask)


def test_adaptive_kl_coef_by_hand():
    # Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    assert L.adapt_kl_coef(0.1, kl=6.0, target=5.0, n_samples=16, horizon=160) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert L.adapt_kl_coef(0.1, kl=50.0, target=5.0, n_samples=16, horizon=160) == pytest.approx(0.1 * 1.02)  # clipped
    assert L.adapt_kl_coef(0.1, kl=4.5, target=5.0, n_samples=16, horizon=160) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert L.adapt_kl_coef(0.1, kl=5.0, target=5.0, n_samples=16, horizon=160) == pytest.approx(0.1)
    # held above target, the coefficient keeps growing: the KL penalty tightens until KL comes down
    coef = 0.1
    for _ in range(50):
        coef = L.adapt_kl_coef(coef, kl=10.0, target=5.0, n_samples=16, horizon=160)
    assert coef == pytest.approx(0.1 * 1.02 ** 50)


def test_ppo_policy_and_value_losses_by_hand():
    lp, old = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.9]])
    adv, mask, clip = torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), 0.2
    loss, clipfrac = L.ppo_policy_loss(lp, old, adv, mask, clip)
    r = [math.exp(0.5), math.exp(-0.1)]
    terms = [max(-a * x, -a * min(max(x, 1 - clip), 1 + clip)) for a, x in zip([1.0, -2.0], r)]
    assert float(loss) == pytest.approx(sum(terms) / 2, rel=1e-6)
    assert float(clipfrac) == pytest.approx(0.5)  # the first ratio (1.65) is clipped, the second (0.905) is not
    v, v_old, ret = torch.tensor([[0.5, 1.0]]), torch.tensor([[0.0, 0.9]]), torch.tensor([[1.0, 0.0]])
    vl = L.ppo_value_loss(v, v_old, ret, mask, 0.2)
    want = 0.5 * (max(0.25, (0.2 - 1.0) ** 2) + max(1.0, 1.0)) / 2
    assert float(vl) == pytest.approx(want, rel=1e-6)


def test_group_advantages_and_grpo_loss_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = L.group_advantages(scores, 4)
    g = [1.0, 0.0, 0.0, 1.0]
    std = math.sqrt(sum((x - 0.5) ** 2 for x in g) / 3)
    assert adv[:4].tolist() == pytest.approx([(x - 0.5) / (std + 1e-4) for x in g], rel=1e-5)
    assert adv[4:].tolist() == [0, 0, 0, 0]  # a group that all scores the same teaches nothing
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.2, -2.0, -2.0], [-0.5, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    a = torch.tensor([0.7, -1.3])
    loss, kl, _ = L.grpo_loss(lp, lp.clone(), ref, a, mask, 0.2, beta=0.04)
    per_seq = []
    for i in range(2):
        n = int(mask[i].sum())
        terms = [-float(a[i]) + 0.04 * (math.exp(float(ref[i, t] - lp[i, t])) - float(ref[i, t] - lp[i, t]) - 1)
                 for t in range(n)]
        per_seq.append(sum(terms) / n)
    assert float(loss) == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    assert float(kl) > 0
    _, kl0, _ = L.grpo_loss(lp, lp.clone(), lp.clone(), a, mask, 0.2, beta=0.04)
    assert float(kl0) == 0.0
