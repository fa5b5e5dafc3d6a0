"""fastppo.algo, the float64 oracle of every other test, against cases worked by hand.

Every expected number below is computed in the test's comments from the
papers' formulas, independently of fastppo.algo's code. The inputs are chosen
so that the numbers are short (binary fractions where possible); tolerances
are a few float64 ulps of the results (1e-12), far below any difference a
wrong formula would make.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastppo import algo

F64 = dict(dtype=torch.float64)
TOL = dict(atol=1e-12, rtol=0)
NAN = float("nan")


def close(got, want):
    torch.testing.assert_close(got, torch.as_tensor(want, **F64).to(got.dtype), **TOL)


# ----------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------

def test_three_token_gae_by_hand_with_padding_and_holes():
    """γ = 1, λ = 0.5, r = (1, 0, 2), V = (1, 2, 0.5), V after the last token 0:
        δ_2 = 2 + 1·0   − 0.5 = 1.5         A_2 = 1.5
        δ_1 = 0 + 1·0.5 − 2   = −1.5        A_1 = −1.5 + 0.5·1.5    = −0.75
        δ_0 = 1 + 1·2   − 1   = 2           A_0 = 2 + 0.5·(−0.75)   = 1.625
        R = A + V = (2.625, 1.25, 2.0)
    The same episode right-padded, left-padded with a hole (NaN in padding and hole), and a row
    with no valid token (all 0)."""
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0],
                            [NAN, 1.0, NAN, 0.0, 2.0],
                            [NAN, NAN, NAN, NAN, NAN]], **F64)
    values = torch.tensor([[1.0, 2.0, 0.5, 9.0, 9.0],
                           [NAN, 1.0, NAN, 2.0, 0.5],
                           [NAN, NAN, NAN, NAN, NAN]], **F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    adv, ret = algo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    for row, cols in ((0, [0, 1, 2]), (1, [1, 3, 4])):
        close(adv[row, cols], [1.625, -0.75, 1.5])
        close(ret[row, cols], [2.625, 1.25, 2.0])
    off = mask == 0
    assert (adv[off] == 0).all() and (ret[off] == 0).all()


def test_gae_with_lambda_one_is_the_return_minus_the_value_and_with_lambda_zero_one_step_td():
    """λ = 1: A_t = Σ_l γ^l r_{t+l} − V_t (Monte Carlo). λ = 0: A_t = δ_t. γ = 0.5, r = (1, 2, 4), V = (1, 1, 1):
        returns-to-go: G_2 = 4, G_1 = 2 + 0.5·4 = 4, G_0 = 1 + 0.5·4 = 3  ->  A = G − V = (2, 3, 3)
        δ = (1 + 0.5·1 − 1, 2 + 0.5·1 − 1, 4 + 0 − 1) = (0.5, 1.5, 3)"""
    r, v, m = torch.tensor([[1.0, 2.0, 4.0]], **F64), torch.ones(1, 3, **F64), torch.ones(1, 3)
    close(algo.gae(r, v, m, gamma=0.5, lam=1.0).advantages, [[2.0, 3.0, 3.0]])
    close(algo.gae(r, v, m, gamma=0.5, lam=0.0).advantages, [[0.5, 1.5, 3.0]])


# ----------------------------------------------------------------------------
# The clipped surrogate, dual clip, value clip
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("adv,ratio,want_pg,want_clipped", [
    # ε = 0.2. The loss term is max(−A·ρ, −A·clip(ρ, 0.8, 1.2)); clipped = the second is strictly larger.
    (1.0, 1.5, -1.2, True),      # A > 0, ρ above 1 + ε:  max(−1.5, −1.2) = −1.2, clipped (no push further up)
    (-1.0, 0.5, 0.8, True),      # A < 0, ρ below 1 − ε:  max(0.5, 0.8)   = 0.8, clipped (no push further down)
    (1.0, 0.5, -0.5, False),     # A > 0, ρ below 1 − ε:  max(−0.5, −0.8) = −0.5, unclipped (pulled back up)
    (-1.0, 1.5, 1.5, False),     # A < 0, ρ above 1 + ε:  max(1.5, 1.2)   = 1.5, unclipped (pulled back down)
    (2.0, 1.1, -2.2, False),     # inside the range:      −2·1.1 both ways
])
def test_clipped_surrogate_by_hand(adv, ratio, want_pg, want_clipped):
    """The term, whether it is clipped, and its gradient in log π_θ: −A·ρ unclipped, 0 clipped."""
    old = torch.tensor([-1.0], **F64)
    lp = (old + math.log(ratio)).requires_grad_()
    terms = algo.policy_loss_terms(lp, old, torch.tensor([adv], **F64), clip_eps=0.2)
    close(terms.pg, [want_pg])
    close(terms.ratio, [ratio])
    close(terms.approx_kl, [(ratio - 1) - math.log(ratio)])
    assert terms.clipped.item() is want_clipped
    terms.pg.sum().backward()
    close(lp.grad, [0.0 if want_clipped else -adv * ratio])


@pytest.mark.parametrize("ratio,want_pg,want_clipped", [
    (4.0, 3.0, True),      # A = −1, ρ = 4: max(4, 1.2) = 4 > −c·A = 3, so the dual bound 3 (constant: gradient 0)
    (2.0, 2.0, False),     # A = −1, ρ = 2: max(2, 1.2) = 2 ≤ 3, unchanged
])
def test_dual_clip_by_hand(ratio, want_pg, want_clipped):
    """Dual clip c = 3 (Ye et al. 2020) bounds the loss of a negative-advantage token at −c·A."""
    old = torch.tensor([-2.0], **F64)
    lp = (old + math.log(ratio)).requires_grad_()
    adv = torch.tensor([-1.0], **F64)
    terms = algo.policy_loss_terms(lp, old, adv, clip_eps=0.2, dual_clip=3.0)
    close(terms.pg, [want_pg])
    assert terms.clipped.item() is want_clipped
    terms.pg.sum().backward()
    close(lp.grad, [0.0 if want_clipped else ratio])
    # A positive advantage is never dual-clipped: A = 1, ρ ∈ {2, 4} gives max(−ρ, −1.2) = −1.2 (ε-clipped).
    close(algo.policy_loss_terms(lp.detach(), old, -adv, clip_eps=0.2, dual_clip=3.0).pg, [-1.2])


def test_clipped_value_loss_by_hand():
    """ε_v = 0.2, V_old = 0, V = 0.5, so V_clipped = 0.2:
        R = 1: ½·max((0.5 − 1)², (0.2 − 1)²) = ½·max(0.25, 0.64) = 0.32, clipped (gradient 0)
        R = 0: ½·max(0.25, 0.04) = 0.125, unclipped (gradient V − R = 0.5)
        no clip, R = 1: ½·0.25 = 0.125 (gradient −0.5)"""
    v = torch.tensor([0.5, 0.5], **F64, requires_grad=True)
    old, ret = torch.zeros(2, **F64), torch.tensor([1.0, 0.0], **F64)
    terms = algo.value_loss_terms(v, old, ret, value_clip=0.2)
    close(terms.vf, [0.32, 0.125])
    assert terms.clipped.tolist() == [True, False]
    terms.vf.sum().backward()
    close(v.grad, [0.0, 0.5])
    close(algo.value_loss_terms(v, old, ret, value_clip=None).vf, [0.125, 0.125])


def test_ppo_loss_token_means_and_normalizer_by_hand():
    """Two valid tokens (the third is masked, NaN everywhere), ε = 0.2, ε_v = 0.2, vf_coef = 0.5:
        token 0: A = 1, ρ = 1.5 -> pg = −1.2 (clipped);   V = 0.5, V_old = 0, R = 1 -> vf = 0.32 (clipped)
        token 1: A = 2, ρ = 1   -> pg = −2;               V = 0.5, V_old = 0, R = 0 -> vf = 0.125
        policy_loss = (−1.2 − 2)/2 = −1.6, value_loss = (0.32 + 0.125)/2 = 0.2225,
        loss = −1.6 + 0.5·0.2225 = −1.48875; clipfrac = ½, value_clipfrac = ½,
        ratio_mean = (1.5 + 1)/2 = 1.25, approx_kl = (0.5 − log 1.5)/2.
    With normalizer 4 every mean halves; normalizer 0 counts as 1."""
    old = torch.tensor([-1.0, -1.0, NAN], **F64)
    lp = torch.tensor([-1.0 + math.log(1.5), -1.0, NAN], **F64)
    adv, v = torch.tensor([1.0, 2.0, NAN], **F64), torch.tensor([0.5, 0.5, NAN], **F64)
    old_v, ret = torch.tensor([0.0, 0.0, NAN], **F64), torch.tensor([1.0, 0.0, NAN], **F64)
    mask = torch.tensor([True, True, False])
    want = dict(loss=-1.48875, policy_loss=-1.6, value_loss=0.2225, clipfrac=0.5, value_clipfrac=0.5,
                approx_kl=(0.5 - math.log(1.5)) / 2, ratio_mean=1.25)
    for normalizer, scale in ((None, 1.0), (4.0, 0.5), (torch.tensor(4), 0.5)):
        out = algo.ppo_loss(lp, old, adv, v, old_v, ret, mask, vf_coef=0.5, normalizer=normalizer)
        for name, value in want.items():
            close(getattr(out, name), value * scale)
    zero = algo.ppo_loss(lp, old, adv, v, old_v, ret, torch.zeros(3), normalizer=0.0)
    assert all(x.item() == 0 for x in zero)


def test_clip_higher_and_policy_weight_by_hand():
    """ε = 0.2, ε_high = 0.28 (DAPO), ratios 0.7 (A = −1), 1.1, 1.25, 1.4 (A = 1), old logprob 0:
        0.7:  max(0.7, 0.8) = 0.8, clipped (below 1 − ε, A < 0);     1.1: −1.1, inside
        1.25: −1.25, inside [0.8, 1.28] (clipped at 1.2 with ε_high = ε)
        1.4:  max(−1.4, −1.28) = −1.28, clipped
    Weights w = (2, 1, 0.5, 0) on the policy term, normaliser the 4 valid tokens (unchanged by w):
        policy_loss = (2·0.8 − 1.1 − 0.5·1.25 − 0·1.28)/4 = −0.03125; dpolicy_loss/dlog π_t = w_t·(−A_t·ρ_t)/4
        on unclipped tokens: (0, −1.1, −0.625, 0)/4."""
    ratio = torch.tensor([0.7, 1.1, 1.25, 1.4], **F64)
    adv = torch.tensor([-1.0, 1.0, 1.0, 1.0], **F64)
    lp, old = ratio.log().requires_grad_(), torch.zeros(4, **F64)
    terms = algo.policy_loss_terms(lp, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    close(terms.pg, [0.8, -1.1, -1.25, -1.28])
    assert terms.clipped.tolist() == [True, False, False, True]
    assert algo.policy_loss_terms(lp, old, adv, clip_eps=0.2).clipped.tolist() == [True, False, True, True]
    w, zeros, mask = torch.tensor([2.0, 1.0, 0.5, 0.0], **F64), torch.zeros(4, **F64), torch.ones(4, dtype=torch.bool)
    out = algo.ppo_loss(lp, old, adv, zeros, zeros, zeros, mask, clip_eps_high=0.28, policy_weight=w)
    close(out.policy_loss, -0.03125)
    close(out.clipfrac, 0.5)                                   # the statistics are not weighted
    out.policy_loss.backward()
    close(lp.grad, [0.0, -1.1 / 4, -0.625 / 4, 0.0])
    logits = torch.stack([torch.zeros(4, **F64), lp.detach()], -1)      # labels 1: lp − log(1 + e^lp), not ρ
    via_logits = algo.policy_loss_from_logits(logits, torch.ones(4, dtype=torch.long), old, adv, mask,
                                              clip_eps_high=0.28, policy_weight=w)
    terms = algo.policy_loss_terms(via_logits.logprobs, old, adv, clip_eps=0.2, clip_eps_high=0.28)
    close(via_logits.policy_loss, (w * terms.pg).sum() / 4)


# ----------------------------------------------------------------------------
# Critic-free advantages
# ----------------------------------------------------------------------------

def test_group_advantages_by_hand():
    """Groups of 3 (the last row of the second group invalid):
        GRPO, (1, 3, 5): mean 3, std (n − 1) = 2 -> (−1, 0, 1) (ε = 0);  (2, 6, ·): mean 4, std √8 -> ∓2/√8
        Dr. GRPO: R − mean -> (−2, 0, 2), (−2, 2, 0)
        RLOO: R_i − mean of the others -> (1 − 4, 3 − 3, 5 − 2) = (−3, 0, 3);  (2 − 6, 6 − 2, 0) = (−4, 4, 0)
    A group with one valid response gets 0 from all three."""
    s = torch.tensor([1.0, 3.0, 5.0, 2.0, 6.0, 9.0, 7.0, 0.0, 0.0], **F64)
    valid = torch.tensor([True, True, True, True, True, False, True, False, False])
    r8 = 2 / math.sqrt(8)
    close(algo.grpo_advantages(s, valid, 3, eps=0.0), [-1.0, 0.0, 1.0, -r8, r8, 0.0, 0.0, 0.0, 0.0])
    close(algo.grpo_advantages(s, valid, 3, scale_by_std=False), [-2.0, 0.0, 2.0, -2.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    close(algo.rloo_advantages(s, valid, 3), [-3.0, 0.0, 3.0, -4.0, 4.0, 0.0, 0.0, 0.0, 0.0])


def test_reinforce_pp_by_hand():
    """γ = 0.5, rewards (0, 1) and (0, ·): returns-to-go G = (0 + 0.5·1, 1) and (0): mean 0.5, variance
    (0 + 0.25 + 0.25)/2 = 0.25 -> advantages (0, 1) and (−1) (ε = 0); a hole is skipped (the next valid token's
    return is discounted once)."""
    rewards = torch.tensor([[0.0, 1.0], [0.0, NAN]], **F64)
    mask = torch.tensor([[True, True], [True, False]])
    adv, ret = algo.reinforce_pp_advantages(rewards, mask, gamma=0.5, eps=0.0)
    close(ret, [[0.5, 1.0], [0.0, 0.0]])
    close(adv, [[0.0, 1.0], [-1.0, 0.0]])
    _, holes = algo.reinforce_pp_advantages(torch.tensor([[1.0, 7.0, 2.0]], **F64), torch.tensor([[1, 0, 1]]),
                                           gamma=0.5)
    close(holes, [[2.0, 0.0, 2.0]])


def test_rollout_correction_weight_by_hand():
    """w = π_old / π_rollout per token: row 0 (2, 0.5), row 1 (2, 2), a third padded token. Cap 1.5, bounds
    [0.6, 1.7]:
        token IS:    (min(2, 1.5), 0.5) = (1.5, 0.5), truncated (T, F);  (1.5, 1.5), (T, T)
        sequence IS: Π = 1 -> (1, 1);  Π = 4 -> min(4, 1.5) = 1.5 on both tokens, truncated
        token mask:  2 and 0.5 lie outside [0.6, 1.7]: every token masked (weight 0)
        sequence mask: geometric means 1 (kept) and 2 (masked)"""
    rollout = torch.tensor([[-1.0, -1.0, NAN], [-2.0, -3.0, NAN]], **F64)
    old = rollout + torch.tensor([[math.log(2), math.log(0.5), 0.0], [math.log(2), math.log(2), 0.0]], **F64)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    kw = dict(cap=1.5, bounds=(0.6, 1.7))
    w, trunc, masked = algo.rollout_correction_weight(old, rollout, mask, is_mode="token", mask_mode="none", **kw)
    close(w, [[1.5, 0.5, 0.0], [1.5, 1.5, 0.0]])
    assert trunc.tolist() == [[True, False, False], [True, True, False]] and not masked.any()
    w, trunc, _ = algo.rollout_correction_weight(old, rollout, mask, is_mode="sequence", mask_mode="none", **kw)
    close(w, [[1.0, 1.0, 0.0], [1.5, 1.5, 0.0]])
    assert trunc.tolist() == [[False, False, False], [True, True, False]]
    w, _, masked = algo.rollout_correction_weight(old, rollout, mask, is_mode="none", mask_mode="token", **kw)
    close(w, torch.zeros(2, 3))
    assert masked.tolist() == [[True, True, False], [True, True, False]]
    w, _, masked = algo.rollout_correction_weight(old, rollout, mask, is_mode="none", mask_mode="sequence", **kw)
    close(w, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------
# Logprobs, entropy, KL
# ----------------------------------------------------------------------------

def test_logprobs_and_entropy_by_hand():
    """logits (0, log 3): p = (1/4, 3/4), log p(1) = log 3/4, H = −(¼ log ¼ + ¾ log ¾).
    At T = 0.5 the logits double: p ∝ (1, 9) = (0.1, 0.9). A padding column (vocab_size = 2) with a huge
    logit is outside the softmax; a −inf logit has p = 0 and adds nothing; an ignored label gives 0."""
    logits = torch.tensor([[0.0, math.log(3), 50.0], [0.0, math.log(3), 50.0], [0.0, 0.0, 0.0]], **F64)
    labels = torch.tensor([1, 0, -100])
    lp, ent = algo.token_logprobs(logits, labels, vocab_size=2)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(lp, [math.log(0.75), math.log(0.25), 0.0])
    close(ent, [h, h, 0.0])
    lp, ent = algo.token_logprobs(logits, labels, temperature=0.5, vocab_size=2)
    close(lp, [math.log(0.9), math.log(0.1), 0.0])
    close(ent, [-(0.1 * math.log(0.1) + 0.9 * math.log(0.9))] * 2 + [0.0])
    x = torch.tensor([[0.0, math.log(3), -math.inf]], **F64, requires_grad=True)
    lp, ent = algo.token_logprobs(x, torch.tensor([1]))
    close(lp, [math.log(0.75)])
    close(ent, [h])
    (lp + ent).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, 2] == 0


def test_k1_k2_k3_abs_by_hand():
    """d = log π − log π_ref = log 2 (r = π_ref/π = ½): k1 = log 2, k2 = ½ log² 2, k3 = (r − 1) − log r
    = log 2 − ½ ≈ 0.1931, abs = log 2. d = −log 2 (r = 2): k3 = 1 − log 2 ≈ 0.3069, abs = log 2;
    clamp 0.25 caps k1 at ±0.25."""
    ln2 = math.log(2)
    lp = torch.tensor([-1.0 + ln2, -1.0 - ln2], **F64)
    ref = torch.tensor([-1.0, -1.0], **F64)
    close(algo.kl_penalty(lp, ref, estimator="k1"), [ln2, -ln2])
    close(algo.kl_penalty(lp, ref, estimator="k2"), [0.5 * ln2 ** 2] * 2)
    close(algo.kl_penalty(lp, ref, estimator="k3"), [ln2 - 0.5, 1 - ln2])
    close(algo.kl_penalty(lp, ref, estimator="abs"), [ln2, ln2])
    close(algo.kl_penalty(lp, ref, estimator="k1", clamp=0.25), [0.25, -0.25])
    with pytest.raises(ValueError, match="estimator"):
        algo.kl_penalty(lp, ref, estimator="k4")


def test_k1_and_k3_average_to_the_exact_kl():
    """Over tokens drawn from π, E[k1] = E[k3] = KL(π ‖ π_ref) exactly (Schulman 2020). π = (½, ½),
    π_ref = (¼, ¾): KL = ½ log 2 + ½ log ⅔; weighting each token by its probability is the expectation."""
    pi, ref = torch.tensor([0.5, 0.5], **F64), torch.tensor([0.25, 0.75], **F64)
    kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    for estimator in ("k1", "k3"):
        close((pi * algo.kl_penalty(pi.log(), ref.log(), estimator=estimator)).sum(), kl)


# ----------------------------------------------------------------------------
# Whitening, reward shaping
# ----------------------------------------------------------------------------

def test_masked_whiten_by_hand():
    """Valid x = (1, 2, 3): μ = 2, unbiased σ² = (1 + 0 + 1)/2 = 1 -> (−1, 0, 1)/√(1 + 1e-8); population σ² = ⅔;
    shift_mean=False adds μ back. Invalid entries (NaN) give 0."""
    x = torch.tensor([1.0, NAN, 2.0, 3.0], **F64)
    mask = torch.tensor([1, 0, 1, 1])
    s = math.sqrt(1 + 1e-8)
    close(algo.masked_whiten(x, mask), [-1 / s, 0.0, 0.0, 1 / s])
    close(algo.masked_whiten(x, mask, shift_mean=False), [2 - 1 / s, 0.0, 2.0, 2 + 1 / s])
    p = math.sqrt(2 / 3 + 1e-8)
    close(algo.masked_whiten(x, mask, unbiased=False), [-1 / p, 0.0, 0.0, 1 / p])


def test_reparameterise_scores_by_hand():
    """Earlier scores (0, 4), this batch (2, 6, NaN): the moments are over (0, 4, 2, 6): μ = 3, population
    σ² = (9 + 1 + 1 + 9)/4 = 5. norm: (2 − 3)/√5 ≈ −0.447, (6 − 3)/√5 ≈ 1.342, clipped at 0.8;
    scale: 2/√5, 6/√5. Alone, the batch (2, 6) has μ = 4, σ = 2: norm gives (−1, 1). The NaN row gives 0."""
    scores = torch.tensor([2.0, 6.0, NAN], **F64)
    earlier = torch.tensor([0.0, 4.0], **F64)
    r5 = math.sqrt(5)
    close(algo.reparameterise_scores(scores, scale=True, norm=True, clip=None, earlier_scores=earlier),
          [-1 / r5, 3 / r5, 0.0])
    close(algo.reparameterise_scores(scores, scale=True, norm=True, clip=0.8, earlier_scores=earlier),
          [-1 / r5, 0.8, 0.0])
    close(algo.reparameterise_scores(scores, scale=True, norm=False, clip=None, earlier_scores=earlier),
          [2 / r5, 6 / r5, 0.0])
    close(algo.reparameterise_scores(scores, scale=True, norm=True, clip=None), [-1.0, 1.0, 0.0])
    close(algo.reparameterise_scores(scores, scale=False, norm=False, clip=3.0), [2.0, 3.0, 0.0])


def test_token_rewards_by_hand():
    """β = 0.1, k1: log π − log π_ref = (0.5, −0.2, ·) on a 2-token response, score 2:
        r = (−0.1·0.5, −0.1·(−0.2) + 2, 0) = (−0.05, 2.02, 0);  a row with no token gets nothing."""
    lp = torch.tensor([[0.5, -0.2, NAN], [NAN, NAN, NAN]], **F64)
    ref = torch.zeros(2, 3, **F64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    rewards, kl = algo.token_rewards(torch.tensor([2.0, 5.0], **F64), lp, ref, mask, kl_coef=0.1)
    close(rewards, [[-0.05, 2.02, 0.0], [0.0, 0.0, 0.0]])
    close(kl, [[0.5, -0.2, 0.0], [0.0, 0.0, 0.0]])


def test_policy_loss_from_logits_by_hand():
    """One token, logits (0, 0): lp = −log 2, H = log 2. old = −log 2 (ρ = 1), A = 2: pg = −2.
    ref = −2 log 2 (d = log 2): k3 = log 2 − ½. With ent_coef 0.1 and kl_coef 0.5:
        loss = −2 − 0.1·log 2 + 0.5·(log 2 − ½).  A masked second token (NaN inputs) changes nothing."""
    ln2 = math.log(2)
    logits = torch.tensor([[0.0, 0.0], [NAN, NAN]], **F64)
    out = algo.policy_loss_from_logits(
        logits, torch.tensor([1, 10 ** 9]), torch.tensor([-ln2, NAN], **F64), torch.tensor([2.0, NAN], **F64),
        torch.tensor([True, False]), ent_coef=0.1, ref_logprobs=torch.tensor([-2 * ln2, NAN], **F64), kl_coef=0.5)
    close(out.loss, -2 - 0.1 * ln2 + 0.5 * (ln2 - 0.5))
    close(out.policy_loss, -2.0)
    close(out.entropy, ln2)
    close(out.kl, ln2 - 0.5)
    close(out.ratio_mean, 1.0)
    close(out.logprobs, [-ln2, 0.0])


# ----------------------------------------------------------------------------
# Losses for long trajectories: GSPO, CISPO, overlong shaping
# ----------------------------------------------------------------------------

def test_gspo_sequence_ratio_by_hand():
    """Row 0: log-ratios (log 2, 0, −log 2 + log 1.5) over 3 valid tokens → s = exp(log 1.5 / 3); row 1: one valid
    token of log-ratio log 0.5 (its padding NaN) → s = 0.5. ε = 0.2, A = (1, −1) per row:
        row 0: s = 1.5^(1/3) = 1.1447 inside [0.8, 1.2]: pg = −s on each token, gradient −s/3 to each token
               (through the mean), summed over the 3 tokens' losses: −s per token logprob;
        row 1: s = 0.5 < 0.8 with A < 0: clipped, pg = 0.8, no gradient."""
    s0 = 1.5 ** (1 / 3)
    lp = torch.tensor([[math.log(2), 0.0, math.log(0.75)], [math.log(0.5), NAN, NAN]], **F64).requires_grad_()
    old = torch.zeros(2, 3, **F64)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], **F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    t = algo.policy_loss_terms(lp, old, adv, ratio_level="sequence", mask=mask)
    close(t.ratio[0], [s0] * 3)
    close(t.ratio[1, 0], 0.5)
    close(t.pg[0], [-s0] * 3)
    close(t.pg[1, 0], 0.8)
    assert t.clipped[0].tolist() == [False] * 3 and t.clipped[1, 0]
    close(t.approx_kl[0], [(2 - 1) - math.log(2), 0.0, (0.75 - 1) - math.log(0.75)])   # of the token ratios
    t.pg[0].sum().backward()
    close(lp.grad[0], [-s0] * 3)
    # The same gradient as GSPO-token (Zheng et al. 2025, eq. 11: sg[s]·π/sg[π] per token) when A is the
    # sequence's: the mean's gradient equals the per-token form.
    lp2 = lp.detach()[0].clone().requires_grad_()
    token_form = -(s0 * torch.exp(lp2 - lp2.detach()))
    token_form.sum().backward()
    close(lp2.grad, [-s0] * 3)


def test_cispo_by_hand():
    """ε_high = 0.28, ratios 0.5, 1.2, 2 with A = (1, −1, 2), old logprob log 0.5 (lp = log(ρ/2)):
        w = sg(min(ρ, 1.28)) = (0.5, 1.2, 1.28); pg = −w·A·lp;  d pg/d lp = −w·A = (−0.5, 1.2, −2.56)
    (no zero gradient anywhere, unlike the clipped surrogate at ρ = 2, A > 0); only ρ = 2 is truncated."""
    ratio = torch.tensor([0.5, 1.2, 2.0], **F64)
    old = torch.full((3,), math.log(0.5), **F64)
    lp = (ratio.log() + old).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0], **F64)
    t = algo.policy_loss_terms(lp, old, adv, clip_eps=0.2, clip_eps_high=0.28, policy_loss="cispo")
    w = torch.tensor([0.5, 1.2, 1.28], **F64)
    close(t.pg, -w * adv * lp.detach())
    assert t.clipped.tolist() == [False, False, True]
    t.pg.sum().backward()
    close(lp.grad, [-0.5, 1.2, -2.56])
    with pytest.raises(ValueError, match="dual_clip"):
        algo.policy_loss_terms(lp, old, adv, dual_clip=3.0, policy_loss="cispo")
    with pytest.raises(ValueError, match="ratio_level"):
        algo.policy_loss_terms(lp, old, adv, ratio_level="segment")


def test_overlong_penalty_by_hand():
    """Cap 16, buffer 4, penalty 2 (DAPO eq. 13): lengths 12 → 0, 13 → 1/4·2 = 0.5, 16 → 2."""
    close(algo.overlong_penalty(torch.tensor([3, 12, 13, 16]), 16, 4, 2.0), [0.0, 0.0, 0.5, 2.0])
    close(algo.overlong_penalty(torch.tensor([0, 4, 16]), 16, 4096, 2.0), [0.0, 0.5, 2.0])    # buffer = the cap
