"""The RL math of fastppo, stated plainly and once: what the fused ops and the trainer compute.

Nothing here is optimised. Each function is the textbook formula on plain
tensors, in whatever dtype it is given (the tests call it in float64: it is
their oracle), and returns the same named results as the op of the same name
in `fastppo.kernels`. The fast paths (the Triton kernels and their CPU
backend) must agree with these functions; they are never used by them.
Not stated here: the sampler (`kernels.sample`), whose test states its
float64 definition next to the float32 rounding windows that judge a draw.

Papers:
  PPO        Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy
             Optimization Algorithms", arXiv 1707.06347.
  GAE        Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional
             Continuous Control Using Generalized Advantage Estimation", ICLR.
  PPO-max    Zheng et al. 2023, "Secrets of RLHF in Large Language Models
             Part I: PPO", arXiv 2307.04964.
  dual clip  Ye et al. 2020, "Mastering Complex Control in MOBA Games with
             Deep Reinforcement Learning", AAAI.
  k1/k2/k3   Schulman 2020, "Approximating KL Divergence",
             http://joschu.net/blog/kl-approx.html.
  GRPO       Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
             Mathematical Reasoning in Open Language Models", arXiv 2402.03300.
  Dr. GRPO   Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
             Perspective", arXiv 2503.20783.
  RLOO       Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
             Optimization for Learning from Human Feedback in LLMs", arXiv 2402.14740.
  REINFORCE++ Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
             Aligning Large Language Models", arXiv 2501.03262.
  DAPO       Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
             System at Scale", arXiv 2503.14476 (clip-higher).
  TIS        Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
             Off-Policy RL Training" (truncated importance sampling).

Conventions: a mask is bool or any numeric dtype, nonzero = a valid token;
inputs are read as 0 where the mask is not set (whatever they hold there,
NaN included, so no NaN reaches a result or a gradient), and per-token
outputs are 0 there. A token mean divides the sum over valid tokens by a
normalizer: the number of valid tokens unless one is given (e.g. the
minibatch's token count); a normalizer ≤ 0 counts as 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .kernels import AdvantagesAndReturns, LinearPPOLossOutput, LogprobsAndEntropy, PPOLossOutput

__all__ = [
    "token_logprobs", "kl_penalty", "KL_ESTIMATORS", "gae", "masked_whiten", "reparameterise_scores",
    "token_rewards", "overlong_penalty", "PolicyTerms", "policy_loss_terms", "ValueTerms", "value_loss_terms", "token_mean",
    "ppo_loss", "policy_loss_from_logits", "kl_loss", "grpo_advantages", "rloo_advantages", "reinforce_pp_advantages",
    "rollout_correction_weight",
]


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """The bool selection of a mask of any dtype."""
    return mask != 0


def _on_mask(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x where valid, 0 elsewhere (the gradient flows only to the valid entries)."""
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------
# 1. Log-probabilities and entropy of the policy, softmax(logits / T)
# ----------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, vocab_size: int | None = None) -> LogprobsAndEntropy:
    """log p(label) and the entropy H = −Σ_v p_v·log p_v of p = softmax(logits / T).

    logits (..., V), labels (...) int -> logprobs (...), entropy (...). Only
    the first ``vocab_size`` columns are the vocabulary (the rest is alignment
    padding, outside the softmax). Positions whose label is ``ignore_index``
    give 0 for both (and so no gradient). p·log p is 0 where p is 0 (logits
    of −inf). T is the sampling temperature: PPO's ratio refers to the
    distribution the tokens were drawn from.
    """
    valid = labels != ignore_index
    x = _on_mask(logits[..., :vocab_size], valid[..., None]) / temperature    # ignored rows read as 0
    logp = torch.log_softmax(x, dim=-1)
    label_logp = logp.gather(-1, torch.where(valid, labels, 0)[..., None].long()).squeeze(-1)
    p = torch.softmax(x, dim=-1)
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    return LogprobsAndEntropy(_on_mask(label_logp, valid), _on_mask(entropy, valid))


# ----------------------------------------------------------------------------
# 2. KL estimators (Schulman 2020)
# ----------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1",
               clamp: float | None = None) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the logprobs of the sampled tokens.

    With d = log π − log π_ref (tokens drawn from π), each term's mean over
    the samples estimates the KL (Schulman 2020):
      k1  = d                          unbiased, high variance, can be < 0
      k2  = ½·d²                       biased, low variance, ≥ 0
      k3  = exp(−d) + d − 1            unbiased, low variance, ≥ 0
                                       (= (r − 1) − log r with r = π_ref / π)
      abs = |d|
    then clamped to [−clamp, clamp] when ``clamp`` is given.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = torch.exp(-d) + d - 1
    elif estimator == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return kl if clamp is None else kl.clamp(-clamp, clamp)


# ----------------------------------------------------------------------------
# 3. Generalised advantage estimation and returns (Schulman et al. 2016)
# ----------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> AdvantagesAndReturns:
    """GAE(γ, λ) per row, and the returns R_t = A_t + V_t (the critic's targets).

    rewards, values, mask (B, T). Each row's valid tokens, taken in order,
    are one episode (holes and left or right padding allowed); the value
    after its last token is 0. Over the episode's tokens t = 0 .. n − 1:
        δ_t = r_t + γ·V_{t+1} − V_t,          V_n = 0
        A_t = δ_t + γλ·A_{t+1}                (= Σ_l (γλ)^l δ_{t+l}, eq. 16)
    the backward loop CleanRL writes. Outputs are 0 off the mask.
    """
    valid = _valid(mask)
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = valid[b].nonzero().flatten()                    # the episode's columns, in order
        r, v = rewards[b, steps], values[b, steps]
        next_values = torch.cat([v[1:], v.new_zeros(1)])        # V_{t+1}, 0 after the last token
        deltas = r + gamma * next_values - v
        adv, last = [], 0.0
        for delta in reversed(deltas):
            last = delta + gamma * lam * last
            adv.append(last)
        adv = torch.stack(adv[::-1]) if adv else deltas
        advantages[b, steps] = adv
        returns[b, steps] = adv + v
    return AdvantagesAndReturns(advantages, returns)


# ----------------------------------------------------------------------------
# 4. Whitening over the valid tokens of a batch
# ----------------------------------------------------------------------------

def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / √(σ² + eps) with μ, σ² the mean and variance of the valid entries; 0 off the mask.

    σ² divides by n − 1 (``unbiased``) or n, at least 1 (one valid entry has
    σ² = 0; none has μ = σ² = 0). ``shift_mean=False`` adds μ back: the scale
    changes, the mean does not (as TRL and OpenRLHF whiten advantages).
    """
    valid = _valid(mask)
    v = x[valid]
    n = v.numel()
    mean = v.sum() / max(n, 1)
    var = ((v - mean) ** 2).sum() / max(n - 1 if unbiased else n, 1)
    white = (x - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return _on_mask(white, valid)


# ----------------------------------------------------------------------------
# 5. Reward shaping (Zheng et al. 2023, §5.3)
# ----------------------------------------------------------------------------

def reparameterise_scores(scores: torch.Tensor, *, scale: bool, norm: bool, clip: float | None,
                          earlier_scores: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                          std_floor: float = 1e-8) -> torch.Tensor:
    """PPO-max's score reparameterisation, (B,) -> (B,).

    μ and σ are the mean and population standard deviation of every valid
    score seen so far: ``earlier_scores`` (the valid scores of the earlier
    iterations) and this batch's, which counts before it is used (so the
    first batch is normalised by its own statistics). With no score at all,
    μ = 0 and σ = 1. σ is floored at ``std_floor``. Then
        norm:  (s − μ) / σ;   scale (without norm):  s / σ;
        clip δ: clamp to [−δ, δ] (None: off).
    Only ``valid`` rows (default: all; non-finite scores never) count and the
    others come out as 0.
    """
    valid = torch.isfinite(scores) if valid is None else _valid(valid) & torch.isfinite(scores)
    seen = scores[valid]
    if earlier_scores is not None:
        seen = torch.cat([earlier_scores.to(scores.dtype), seen])
    if seen.numel():
        mu, sigma = seen.mean(), ((seen - seen.mean()) ** 2).mean().sqrt()
    else:
        mu, sigma = scores.new_zeros(()), scores.new_ones(())
    sigma = sigma.clamp(min=std_floor)
    out = scores
    if norm:
        out = (out - mu) / sigma
    elif scale:
        out = out / sigma
    if clip is not None:
        out = out.clamp(-clip, clip)
    return _on_mask(out, valid)


def token_rewards(shaped_scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, *, kl_coef: float, estimator: str = "k1",
                  clamp: float | None = None, step_rewards: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-max's token rewards: r_t = −β·KL_t on every valid token, plus the shaped score at the last one.

    shaped_scores (B,); logprobs, ref_logprobs, mask (B, T), logprobs those
    of the policy that sampled the tokens. KL_t is `kl_penalty` with the
    given estimator and clamp. With an environment's step rewards (B, T), each
    stays at its token and the last valid token gets the shaped score less
    their sum. Returns (rewards, kl), both (B, T), 0 off the mask; a row with
    no valid token gets no score.
    """
    valid = _valid(mask)
    kl = kl_penalty(_on_mask(logprobs, valid), _on_mask(ref_logprobs, valid), estimator=estimator, clamp=clamp)
    rewards = -kl_coef * kl
    for b in range(rewards.shape[0]):
        steps = valid[b].nonzero().flatten()
        if len(steps):
            rest = shaped_scores[b]
            if step_rewards is not None:
                for t in steps:
                    rewards[b, t] += step_rewards[b, t]
                    rest = rest - step_rewards[b, t]
            rewards[b, steps[-1]] += rest
    return rewards, kl


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of responses of `lengths` tokens: 0 for
    L ≤ max_len − buffer, else (L − (max_len − buffer)) / buffer · penalty (the whole penalty at the cap); a buffer
    longer than max_len is max_len (DAPO's 4096 of 20480 tokens kept by a preset used with short responses)."""
    buffer = min(buffer, max_len)
    out = torch.zeros(lengths.shape, dtype=torch.float64)
    for i, length in enumerate(lengths.tolist()):
        if length > max_len - buffer:
            out[i] = (length - (max_len - buffer)) / buffer * penalty
    return out


# ----------------------------------------------------------------------------
# 6. The PPO losses (Schulman et al. 2017; dual clip: Ye et al. 2020)
# ----------------------------------------------------------------------------

class PolicyTerms(NamedTuple):
    """Per-token terms of the policy loss, each of the inputs' shape."""
    pg: torch.Tensor          # the loss term (to minimise)
    clipped: torch.Tensor     # bool: ppo: a clipped branch (ε or dual) is the larger, so the gradient is 0;
    #                           cispo: the weight was truncated
    ratio: torch.Tensor       # ρ: π_θ / π_old of the token, or of the sequence (GSPO)
    approx_kl: torch.Tensor   # (r − 1) − log r of the token ratio r


RATIO_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("ppo", "cispo")


def policy_loss_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                      clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                      ratio_level: str = "token", policy_loss: str = "ppo",
                      mask: torch.Tensor | None = None) -> PolicyTerms:
    """The policy's loss per token: PPO's clipped surrogate (PPO eq. 7, negated) or CISPO's, at the token's or the
    sequence's ratio.

    ρ = exp(log π_θ − log π_old) per token (ratio_level="token"), or GSPO's sequence ratio (Zheng et al. 2025,
    ratio_level="sequence"): s = exp(mean over the row's valid tokens (``mask``) of log π_θ − log π_old) on every
    token of the row, its gradient flowing to each token through the mean.
    ppo:   pg = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high)), ε_high = ε unless given (clip-higher: DAPO's 0.28
           against ε = 0.2). Dual clip c > 1 (Ye et al. 2020): for A < 0 also pg = min(pg, −c·A), which bounds
           the loss of a token whose ratio has run far above 1 + ε.
    cispo: pg = −sg(min(ρ, 1 + ε_high))·A·log π_θ (MiniMax-M1, 2025): the importance weight truncated and
           detached, so every token keeps the gradient −w·A of its logprob; `clipped` marks truncated weights.
    ``approx_kl`` = (r − 1) − log r of the token ratio r is the k3 estimate of KL(π_old ‖ π_θ) on tokens drawn
    from π_old (Schulman 2020), ≥ 0, as CleanRL logs it; ``ratio`` is ρ.
    """
    if ratio_level not in RATIO_LEVELS or policy_loss not in POLICY_LOSSES:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS} and policy_loss one of {POLICY_LOSSES}, got "
                         f"{ratio_level!r}, {policy_loss!r}")
    high = 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        if mask is None:
            raise ValueError("ratio_level='sequence' needs the mask of each row's valid tokens")
        valid = _valid(mask)
        row_mean = _on_mask(log_ratio, valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
        ratio = torch.exp(row_mean.expand_as(log_ratio))
    else:
        ratio = torch.exp(log_ratio)
    approx_kl = (torch.exp(log_ratio) - 1) - log_ratio
    if policy_loss == "cispo":
        if dual_clip is not None:
            raise ValueError("dual_clip bounds PPO's surrogate; cispo has no such term")
        return PolicyTerms(-ratio.clamp(max=high).detach() * advantages * logprobs, ratio > high, ratio, approx_kl)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_eps, high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (bound < pg)
        pg = torch.where(dual, bound, pg)
        clipped = clipped | dual
    return PolicyTerms(pg, clipped, ratio, approx_kl)


class ValueTerms(NamedTuple):
    """Per-token terms of the value loss, each of the inputs' shape."""
    vf: torch.Tensor          # ½·max((V − R)², (V_clipped − R)²)
    clipped: torch.Tensor     # bool: the clipped branch is the larger, so the gradient is 0


def value_loss_terms(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                     value_clip: float | None = 0.2) -> ValueTerms:
    """The clipped value loss per token (PPO2 of OpenAI baselines, kept by PPO-max: Zheng et al. 2023).

    V_clipped = V_old + clip(V − V_old, −ε_v, ε_v),
    vf = ½·max((V − R)², (V_clipped − R)²); ``value_clip=None``: ½·(V − R)².
    """
    vf = (values - returns) ** 2
    clipped = torch.zeros_like(vf, dtype=torch.bool)
    if value_clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        vf_clipped = (v_clipped - returns) ** 2
        clipped = vf_clipped > vf
        vf = torch.maximum(vf, vf_clipped)
    return ValueTerms(0.5 * vf, clipped)


def _weighted(pg: torch.Tensor, policy_weight: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    return pg if policy_weight is None else pg * _on_mask(policy_weight, valid).to(pg.dtype)


def token_mean(x: torch.Tensor, mask: torch.Tensor,
               normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Σ_valid x / n, n = ``normalizer`` (default: the number of valid tokens); n ≤ 0 counts as 1."""
    valid = _valid(mask)
    n = valid.sum() if normalizer is None else normalizer
    n = torch.as_tensor(n, dtype=x.dtype, device=x.device)
    n = torch.where(n > 0, n, torch.ones_like(n))
    return _on_mask(x, valid).sum() / n


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2,
             clip_eps_high: float | None = None, value_clip: float | None = 0.2, vf_coef: float = 1.0,
             dual_clip: float | None = None, normalizer: float | torch.Tensor | None = None,
             policy_weight: torch.Tensor | None = None, ratio_level: str = "token",
             policy_loss: str = "ppo") -> PPOLossOutput:
    """PPO's loss and statistics over the valid tokens of a (micro-)batch, as `fastppo.kernels.ppo_loss`.

    loss = policy_loss + vf_coef·value_loss, each a token mean of
    `policy_loss_terms` / `value_loss_terms`, the policy term of token t
    times policy_weight w_t when given (a constant: rollout correction and
    loss aggregation; the normalizer is unchanged); clipfrac, value_clipfrac,
    approx_kl and ratio_mean are token means of the clipped indicators,
    (ρ − 1) − log ρ and ρ. Differentiable in logprobs and values.
    """
    valid = _valid(mask)
    lp, old_lp, adv, v, old_v, ret = (_on_mask(x, valid) for x in
                                      (logprobs, old_logprobs, advantages, values, old_values, returns))
    pol = policy_loss_terms(lp, old_lp, adv, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                            ratio_level=ratio_level, policy_loss=policy_loss, mask=valid)
    val = value_loss_terms(v, old_v, ret, value_clip=value_clip)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return token_mean(x.to(pol.pg.dtype), valid, normalizer)

    policy_loss, value_loss = mean(_weighted(pol.pg, policy_weight, valid)), mean(val.vf)
    return PPOLossOutput(loss=policy_loss + vf_coef * value_loss, policy_loss=policy_loss, value_loss=value_loss,
                         clipfrac=mean(pol.clipped), value_clipfrac=mean(val.clipped),
                         approx_kl=mean(pol.approx_kl), ratio_mean=mean(pol.ratio))


def policy_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                            advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                            clip_eps: float = 0.2, clip_eps_high: float | None = None,
                            dual_clip: float | None = None, ent_coef: float = 0.0,
                            ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                            kl_estimator: str = "k3", normalizer: float | torch.Tensor | None = None,
                            vocab_size: int | None = None, policy_weight: torch.Tensor | None = None,
                            ratio_level: str = "token", policy_loss: str = "ppo") -> LinearPPOLossOutput:
    """The policy's loss from its logits, as `fastppo.kernels.linear_ppo_loss` computes it from logits = h·Wᵀ.

    With lp, H = `token_logprobs` (at temperature T) and token means over the mask:
        policy_loss = mean w·`policy_loss_terms`.pg (w = policy_weight, else 1),  entropy = mean H,
        kl = mean `kl_penalty`(lp, ref_logprobs, kl_estimator) (0 without ref_logprobs),
        loss = policy_loss − ent_coef·entropy + kl_coef·kl
    (the entropy bonus of PPO eq. 9; the KL term is the in-loss penalty of
    GRPO-style trainers). ``logprobs`` is lp, 0 off the mask. Labels off the
    mask are never read. Differentiable in logits.
    """
    valid = _valid(mask)
    lp, entropy = token_logprobs(logits, torch.where(valid, labels, -100), temperature=temperature,
                                 ignore_index=-100, vocab_size=vocab_size)
    old_lp, adv = _on_mask(old_logprobs, valid), _on_mask(advantages, valid)
    pol = policy_loss_terms(lp, old_lp, adv, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
                            ratio_level=ratio_level, policy_loss=policy_loss, mask=valid)
    if ref_logprobs is None:
        kl = torch.zeros_like(lp)
    else:
        kl = kl_penalty(lp, _on_mask(ref_logprobs, valid), estimator=kl_estimator)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return token_mean(x.to(lp.dtype), valid, normalizer)

    policy_loss, mean_entropy, mean_kl = mean(_weighted(pol.pg, policy_weight, valid)), mean(entropy), mean(kl)
    return LinearPPOLossOutput(loss=policy_loss - ent_coef * mean_entropy + kl_coef * mean_kl,
                               policy_loss=policy_loss, entropy=mean_entropy, kl=mean_kl,
                               clipfrac=mean(pol.clipped), approx_kl=mean(pol.approx_kl),
                               ratio_mean=mean(pol.ratio), logprobs=lp)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *, estimator: str = "k3",
            weight: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """The KL-to-reference loss term of GRPO (Shao et al. 2024, eq. 4): the token mean of w·k(lp, ref), k the
    `kl_penalty` estimator (k3 there: exp(ref − lp) − (ref − lp) − 1, an unbiased estimate of KL(π_θ ‖ π_ref) on
    tokens sampled from π_θ), w the loss aggregation's per-token weight (1 when None), so that it is aggregated
    like the policy loss. The gradient flows through logprobs only (the reference is data)."""
    valid = _valid(mask)
    k = kl_penalty(logprobs, _on_mask(ref_logprobs, valid).detach(), estimator=estimator)
    return token_mean(_weighted(k, weight, valid), valid, normalizer)


# ----------------------------------------------------------------------------
# 7. Critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++)
# ----------------------------------------------------------------------------

def grpo_advantages(scores: torch.Tensor, valid: torch.Tensor, group_size: int, *, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage of each response (B,), the rows grouped by `group_size` consecutive rows:
    A_i = (R_i − mean_g R) / (std_g R + ε) over the valid responses of i's group, std with n − 1; Dr. GRPO
    (scale_by_std=False): A_i = R_i − mean_g R. 0 for invalid rows and for the only valid row of a group."""
    out = torch.zeros_like(scores)
    for g in range(0, scores.numel(), group_size):
        rows = [i for i in range(g, g + group_size) if valid[i]]
        if len(rows) < 2:                               # no other response to compare with: no signal
            continue
        vals = scores[rows]
        mean, std = vals.mean(), vals.std(unbiased=True)
        for i in rows:
            out[i] = (scores[i] - mean) / (std + eps) if scale_by_std else scores[i] - mean
    return out


def rloo_advantages(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage (B,): A_i = R_i − the mean of the other valid responses of i's group (the leave-one-out
    baseline); 0 for an invalid row and for the only valid row of a group."""
    out = torch.zeros_like(scores)
    for g in range(0, scores.numel(), group_size):
        rows = [i for i in range(g, g + group_size) if valid[i]]
        for i in rows:
            others = [j for j in rows if j != i]
            if others:
                out[i] = scores[i] - scores[others].mean()
    return out


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                            eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (B, T): (advantages, returns). The return-to-go G_t = r_t + γ·G_{t'} over each response's
    valid tokens (t' the next valid one), then whitened over every valid token of the batch
    (`masked_whiten`): A_t = (G_t − mean G) / sqrt(var G + ε), var with n − 1."""
    valid = _valid(mask)
    r = _on_mask(rewards, valid)
    returns = torch.zeros_like(r)
    for b in range(r.size(0)):
        acc = torch.zeros((), dtype=r.dtype, device=r.device)
        for t in reversed(range(r.size(1))):
            if valid[b, t]:
                acc = r[b, t] + gamma * acc
                returns[b, t] = acc
    return masked_whiten(returns, valid, eps=eps), returns


# ----------------------------------------------------------------------------
# 8. Rollout correction: the generator's and the trainer's logprobs differ
# ----------------------------------------------------------------------------

def rollout_correction_weight(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                              is_mode: str, cap: float, mask_mode: str, bounds: tuple[float, float]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy term's weight of each token (B, R), and which tokens were truncated / masked (bool).

    With w_t = π_old(y_t) / π_rollout(y_t), token by token over each response's valid tokens:
      is_mode   token:    min(w_t, cap) (TIS);  sequence: min(Π_t w_t, cap) on every token;  none: 1
      mask_mode token:    0 where w_t is outside [low, high];  sequence: 0 on the whole response where the
                          geometric mean (Π_t w_t)^(1/n) is outside;  none: no mask
    The log-ratios are summed exactly (math.fsum) in float64. 0 off the mask."""
    low, high = bounds
    B, R = mask.shape
    weight = torch.zeros(B, R, dtype=torch.float64)
    truncated = torch.zeros(B, R, dtype=torch.bool)
    masked = torch.zeros(B, R, dtype=torch.bool)
    valid = _valid(mask)
    for b in range(B):
        idx = [t for t in range(R) if valid[b, t]]
        log_w = {t: float(old_logprobs[b, t]) - float(rollout_logprobs[b, t]) for t in idx}
        seq = math.fsum(log_w.values())                                 # log Π_t w_t
        geo = seq / max(len(idx), 1)
        for t in idx:
            w = 1.0
            if is_mode == "token":
                w, truncated[b, t] = min(math.exp(log_w[t]), cap), math.exp(log_w[t]) > cap
            elif is_mode == "sequence":
                w, truncated[b, t] = math.exp(min(seq, math.log(cap))), seq > math.log(cap)
            if mask_mode == "token":
                masked[b, t] = not low <= math.exp(log_w[t]) <= high
            elif mask_mode == "sequence":
                masked[b, t] = not low <= math.exp(geo) <= high
            weight[b, t] = 0.0 if masked[b, t] else w
    return weight, truncated, masked
