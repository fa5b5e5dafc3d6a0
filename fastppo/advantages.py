"""Critic-free advantage estimators, loss aggregation weights and group filtering (no value model, no GAE).

    group_advantages          grpo (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al. 2025), rloo (Ahmadian
                              et al. 2024): one advantage per response from its group's outcome rewards
    outcome_rewards           REINFORCE++-baseline (Hu 2025): the group mean subtracted from each outcome reward
    returns_to_go_whitened    REINFORCE++: returns-to-go of the KL-shaped token rewards, whitened over the batch
    critic_free_advantages    the configured estimator, as (advantages, returns) for the update
    loss_agg_weight           the loss aggregations as a per-token weight on the minibatch token mean
    signal_groups             groups whose rewards are not all equal (DAPO dynamic sampling, Yu et al. 2025)

A group is the G = rollout.n_samples_per_prompt consecutive rows sampled from one prompt. Groups are kept whole on
one rank (each rank generates rollout_batch_size / world_size whole groups, `config.validate_world`), so the group
statistics need no collective; only REINFORCE++'s whitening and the loss-aggregation counts are global over ranks.
Rows whose `valid` flag is false (a non-finite reward-model score, or a group padding a short dynamic-sampling
batch) are left out of their group's statistics and get advantage 0.
"""

from __future__ import annotations

import torch

from . import dist
from .config import Config
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


def outcome_rewards(scores: torch.Tensor, valid: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The per-response reward placed at the last token (B,): reinforce_pp_baseline subtracts the group mean
    (over the group's valid rows) first; every other estimator uses the score as it is."""
    if cfg.ppo.advantage != "reinforce_pp_baseline":
        return scores
    return group_advantages(scores, valid, cfg.rollout.n_samples_per_prompt, estimator="grpo", scale_by_std=False)


def returns_to_go_whitened(rewards: torch.Tensor, response_mask: torch.Tensor, *, gamma: float,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): G_t = Σ_l γ^l r_{t+l} over each response, then whitened over every valid token of
    the batch on all ranks. Returns (advantages, returns-to-go), each (B, R) float32, 0 off the mask.

    The returns-to-go are GAE with V ≡ 0 and λ = 1 (δ_t = r_t, A_t = Σ (γ·1)^l δ_{t+l}): the fused `gae` op.
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), response_mask, gamma=gamma, lam=1.0, backend=backend)
    advantages = masked_whiten(returns, response_mask, shift_mean=True, group=dist.group()) * response_mask
    return advantages, returns


def critic_free_advantages(shaped: torch.Tensor, rewards: torch.Tensor, response_mask: torch.Tensor,
                           valid: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 4 without a critic: (advantages, returns), each (B, R) float32, 0 off the mask.

    shaped: (B,) reparameterised scores R_i; rewards: (B, R) token rewards (−β·KL_t, plus `outcome_rewards` at the
    last token). grpo / rloo broadcast the response's advantage to its tokens and report R_i as its return;
    reinforce_pp(_baseline) use the returns-to-go. ppo.advantage_clip applies to all of them.
    """
    pc, mask = cfg.ppo, response_mask.float()
    if pc.advantage in ("grpo", "rloo"):
        adv = group_advantages(shaped, valid, cfg.rollout.n_samples_per_prompt, estimator=pc.advantage,
                               scale_by_std=pc.scale_by_std)
        advantages, returns = adv[:, None] * mask, shaped.float()[:, None] * mask
    elif pc.advantage in ("reinforce_pp", "reinforce_pp_baseline"):
        advantages, returns = returns_to_go_whitened(rewards, response_mask, gamma=pc.gamma, backend=cfg.run.backend)
    else:
        raise ValueError(f"critic_free_advantages: ppo.advantage={pc.advantage!r} is not critic-free")
    if pc.advantage_clip is not None:
        advantages = advantages.clamp(-pc.advantage_clip, pc.advantage_clip)
    return advantages, returns


def minibatch_counts(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid tokens, sequences with at least one valid token) of this rank's share of a minibatch, summed over
    ranks (one all-reduce): the two normalisers of `loss_agg_weight`. (B, R) bool in, two float32 scalars out."""
    valid = response_mask.bool()
    n_tokens, n_seqs = dist.all_reduce(torch.stack([valid.sum(dtype=torch.float32),
                                                    valid.any(-1).sum(dtype=torch.float32)])).unbind(0)
    return n_tokens, n_seqs


def loss_agg_weight(response_mask: torch.Tensor, *, mode: str, n_tokens: torch.Tensor, n_seqs: torch.Tensor,
                    max_new_tokens: int) -> torch.Tensor | None:
    """Per-token weights w (B, R) float32 of a micro-batch such that Σ_t w_t·ℓ_t / n_tokens (the minibatch token
    mean the loss ops compute, summed over micro-batches and ranks) is the configured aggregation of ℓ:

        token_mean               Σ_{i,t} ℓ_it / N                       w = 1 (None: no weight needed)
        seq_mean_token_mean      (1/S) Σ_i (1/n_i) Σ_t ℓ_it             w_it = N / (S · n_i)
        seq_mean_token_sum_norm  (1/S) Σ_i Σ_t ℓ_it / max_new_tokens    w_it = N / (S · max_new_tokens)   (Dr. GRPO)

    N = n_tokens and S = n_seqs are the minibatch's valid tokens and non-empty sequences on all ranks
    (`minibatch_counts`), n_i the valid tokens of sequence i. Weights are 0 off the mask. A separate factor:
    a rollout-correction weight multiplies it token by token.
    """
    if mode == "token_mean":
        return None
    mask = response_mask.float()
    if mode == "seq_mean_token_mean":
        per_seq = n_tokens / (n_seqs.clamp(min=1) * mask.sum(-1, keepdim=True).clamp(min=1))     # (B, 1)
    elif mode == "seq_mean_token_sum_norm":
        per_seq = n_tokens / (n_seqs.clamp(min=1) * max_new_tokens)                               # ()
    else:
        raise ValueError(f"loss_agg_weight: mode must be token_mean, seq_mean_token_mean or seq_mean_token_sum_norm, "
                         f"got {mode!r}")
    return per_seq * mask


def signal_groups(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B/G,) bool: groups whose valid rows' rewards are not all equal (at least two valid rows). A group of equal
    rewards has advantage 0 under every group estimator: it carries no signal (DAPO's dynamic sampling drops it)."""
    s, v = _groups(scores, group_size), _groups(valid, group_size)
    hi = torch.where(v, s, -torch.inf).amax(-1)
    lo = torch.where(v, s, torch.inf).amin(-1)
    return (v.sum(-1) >= 2) & (hi > lo)
