"""Phase 4 of an iteration: the advantages, by one estimator.

    estimate_advantages       the one dispatch: GAE (PPO with a critic, Schulman et al. 2016) or a critic-free
                              estimator, as (advantages, returns) for the update
    group_advantages          grpo (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al. 2025), rloo (Ahmadian
                              et al. 2024): one advantage per response from its group's outcome rewards
    outcome_rewards           REINFORCE++-baseline (Hu 2025): the group mean subtracted from each outcome reward
    returns_to_go_whitened    REINFORCE++: returns-to-go of the KL-shaped token rewards, whitened over the batch

A group is the G = rollout.n_samples_per_prompt consecutive rows sampled from one prompt. Groups are kept whole on
one rank (each rank generates rollout_batch_size / world_size whole groups, `config.validate_world`), so the group
statistics need no collective; only the whitening (GAE's optional one, REINFORCE++'s) is global over ranks.
Rows whose `valid` flag is false (a non-finite reward-model score, or a group padding a short dynamic-sampling
batch) are left out of their group's statistics and get advantage 0.
"""

from __future__ import annotations

import torch

from . import dist
from .config import AdvantageConfig
from .kernels import gae
from .masked import masked_whiten

GROUP_STD_EPS = 1e-6
"""ε of GRPO's (R − mean) / (std + ε): keeps a group of nearly equal rewards finite (the advantage stays ~0)."""


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.dim() != 1 or x.numel() % group_size:
        raise ValueError(f"expected a (B,) tensor with B a multiple of the group size {group_size}, got {tuple(x.shape)}")
    return x.view(-1, group_size)                                                    # (B/G, G)


def group_advantages(scores: torch.Tensor, valid: torch.Tensor, group_size: int, *, estimator: str,
                     scale_by_std: bool = True, eps: float = GROUP_STD_EPS) -> torch.Tensor:
    """(B,) float32 outcome advantages from (B,) rewards, rows grouped by `group_size` consecutive rows.

    grpo:  A_i = (R_i − mean_g R) / (std_g R + ε), std the sample (n − 1) standard deviation of the group;
           scale_by_std=False gives Dr. GRPO's A_i = R_i − mean_g R.
    rloo:  A_i = R_i − mean_{j≠i} R_j (leave-one-out baseline).
    Only `valid` rows enter a group's statistics; a group with one valid row gives it advantage 0. Computed in
    float64 (B numbers: free) so that a near-constant group does not lose its differences to cancellation.
    = `algo.grpo_advantages` / `algo.rloo_advantages`, vectorised over the groups.
    """
    v = _groups(valid, group_size).double()
    s = torch.where(v > 0, _groups(scores, group_size).double(), 0.0)          # an invalid row's score never enters
    n = v.sum(-1, keepdim=True)                                                       # (B/G, 1) valid rows per group
    total = (s * v).sum(-1, keepdim=True)
    if estimator == "rloo":
        adv = torch.where(n > 1, s - (total - s) / (n - 1).clamp(min=1), 0.0)
    elif estimator == "grpo":
        mean = total / n.clamp(min=1)
        adv = s - mean
        if scale_by_std:
            var = ((s - mean).square() * v).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
            adv = adv / (var.sqrt() + eps)
    else:
        raise ValueError(f"group_advantages: estimator must be grpo or rloo, got {estimator!r}")
    return (adv * v).flatten().float()


def outcome_rewards(scores: torch.Tensor, valid: torch.Tensor, ac: AdvantageConfig, group_size: int) -> torch.Tensor:
    """The per-response reward placed at the last token (B,): reinforce_pp_baseline subtracts the group mean
    (over the group's valid rows) first; every other estimator uses the score as it is."""
    if ac.estimator != "reinforce_pp_baseline":
        return scores
    return group_advantages(scores, valid, group_size, estimator="grpo", scale_by_std=False)


def returns_to_go_whitened(rewards: torch.Tensor, response_mask: torch.Tensor, *, gamma: float,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): G_t = Σ_l γ^l r_{t+l} over each response, then whitened over every valid token of
    the batch on all ranks. Returns (advantages, returns-to-go), each (B, R) float32, 0 off the mask.

    The returns-to-go are GAE with V ≡ 0 and λ = 1 (δ_t = r_t, A_t = Σ (γ·1)^l δ_{t+l}): the fused `gae` op.
    = `algo.reinforce_pp_advantages` (the returns-to-go by the fused `gae`), global over ranks.
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), response_mask, gamma=gamma, lam=1.0, backend=backend)
    advantages = masked_whiten(returns, response_mask, shift_mean=True, group=dist.group()) * response_mask
    return advantages, returns


def estimate_advantages(ac: AdvantageConfig, *, rewards: torch.Tensor, values: torch.Tensor,
                        response_mask: torch.Tensor, shaped: torch.Tensor, valid: torch.Tensor, group_size: int,
                        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 4: (advantages, returns), each (B, R) float32, 0 off the mask, by the estimator ac.estimator.

    rewards: (B, R) token rewards (−β·KL_t, plus `outcome_rewards` at the last token); values: (B, R) the critic's
    (gae only); shaped: (B,) reparameterised scores R_i; valid: (B,) rows in the group statistics.
      gae                     GAE over the response tokens (V after the last token = 0); returns R_t = A_t + V_t
                              before the optional global whitening (ac.whiten)
      grpo / rloo             the response's group advantage (`group_advantages`) on each of its tokens; its return
                              is R_i
      reinforce_pp(_baseline) returns-to-go of the token rewards, whitened over the batch
    ac.clip then clamps the advantages of every estimator.
    """
    mask = response_mask.float()
    if ac.estimator == "gae":
        advantages, returns = gae(rewards, values, response_mask, gamma=ac.gamma, lam=ac.lam, backend=backend)
        if ac.whiten:
            # Global over the batch: statistics of all ranks' valid tokens (group=None in one process).
            advantages = masked_whiten(advantages, response_mask, shift_mean=True, group=dist.group()) * response_mask
    elif ac.estimator in ("grpo", "rloo"):
        adv = group_advantages(shaped, valid, group_size, estimator=ac.estimator, scale_by_std=ac.scale_by_std)
        advantages, returns = adv[:, None] * mask, shaped.float()[:, None] * mask
    elif ac.estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        advantages, returns = returns_to_go_whitened(rewards, response_mask, gamma=ac.gamma, backend=backend)
    else:
        raise ValueError(f"estimate_advantages: unknown advantage.estimator {ac.estimator!r}")
    if ac.clip is not None:
        advantages = advantages.clamp(-ac.clip, ac.clip)
    return advantages, returns
