"""Phase 3 of an iteration: the token rewards (Zheng et al. 2023, §5.3).

    shape_scores            the missing-EOS and overlong penalties, then `reparameterise_scores`
    reparameterise_scores   running mean/std of the scores; scale, normalise, clip (PPO-max §5.3.1)
    token_rewards           r_t = -beta * KL_t(old, ref) on every response token, the shaped score at the last (§5.3.2)
    kl_controller           beta: fixed, or the adaptive controller of Ziegler et al. (2019)

Everything here runs without gradients.
"""

from __future__ import annotations

import torch

from . import dist
from .config import RewardConfig
from .kernels import kl_penalty
from .masked import masked_moments
from .metrics import RunningMoments


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor,
                 moments: RunningMoments, rc: RewardConfig, max_new_tokens: int) -> torch.Tensor:
    """(B,) shaped scores: reward.missing_eos_penalty off the raw score of a response cut at max_new_tokens
    (`ended` (B,) bool false) and the overlong penalty of its length (`lengths` (B,): sampled tokens), then
    `reparameterise_scores` over the `valid` rows."""
    if rc.missing_eos_penalty is not None:
        scores = scores - rc.missing_eos_penalty * (~ended).float()
    if rc.overlong_buffer is not None:
        scores = scores - overlong_penalty(lengths, max_new_tokens, rc.overlong_buffer, rc.overlong_penalty)
    return reparameterise_scores(scores, moments, rc, valid=valid)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (B,) float32: 0 up to max_len - buffer tokens, then
    rising linearly to `penalty` at max_len; a buffer longer than max_len is max_len. = `algo.overlong_penalty`."""
    buffer = min(buffer, max_len)
    return (lengths.float() - (max_len - buffer)).clamp(min=0) / buffer * penalty


def score_slope(moments: RunningMoments, rc: RewardConfig) -> torch.Tensor:
    """How much a shaped score moves per unit of raw score: 1 / sigma with reward_scale or reward_norm, else 1 (the
    scale the step rewards of an environment are placed in, `token_rewards`)."""
    if rc.reward_scale or rc.reward_norm:
        return 1.0 / moments.std.clamp(min=1e-8).float()
    return torch.ones(())


def reparameterise_scores(scores: torch.Tensor, moments: RunningMoments, rc: RewardConfig,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """PPO-max §5.3.1: update the running moments with this batch, then (s - mu)/sigma or s/sigma, clipped.

    The moments are updated with the current batch before they are used, so
    the first iteration is already normalised by its own statistics. Only
    `valid` (B,) bool rows (default: the finite scores) enter the moments; the
    others come out as 0, so a non-finite score never reaches the running
    statistics or a checkpoint.
    = `algo.reparameterise_scores`, with running moments global over ranks.
    """
    valid = torch.isfinite(scores) if valid is None else valid & torch.isfinite(scores)
    if rc.reward_scale or rc.reward_norm:
        moments.to(scores.device).merge(*masked_moments(scores, valid, unbiased=False, group=dist.group()))
    out = scores.float()
    std = moments.std.clamp(min=1e-8).float()
    if rc.reward_norm:
        out = (out - moments.mean.float()) / std
    elif rc.reward_scale:
        out = out / std
    if rc.reward_clip is not None:
        out = out.clamp(-rc.reward_clip, rc.reward_clip)
    return torch.where(valid, out, 0.0)


def token_rewards(shaped_scores: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
                  response_mask: torch.Tensor, *, kl_coef: float, estimator: str, clamp: float | None,
                  backend: str | None = None, step_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-max §5.3.2: r_t = -beta * KL_t on every response token, + shaped score at the last one.

    With an environment, step_rewards (B, R) (each turn's reward at its last sampled token, in the shaped scores'
    units: `score_slope`) stay where they were earned, and the last token gets the rest of the shaped score
    (shaped - sum of the step rewards): the token rewards of a trajectory still sum to its shaped score plus the
    KL terms. Returns (rewards (B, R), kl (B, R)); both 0 off the mask. Without a reference (ref_logprobs None:
    nothing reads it, `config.uses_reference`) the KL is 0.
    = `algo.token_rewards` (the KL by the fused `kl_penalty`).
    """
    mask = response_mask.float()
    kl = (torch.zeros_like(mask) if ref_logprobs is None else
          kl_penalty(old_logprobs, ref_logprobs, estimator=estimator, clamp=clamp, backend=backend) * mask)
    rewards = -kl_coef * kl
    shaped_scores = shaped_scores.float()
    if step_rewards is not None:
        rewards = rewards + step_rewards * mask
        shaped_scores = shaped_scores - (step_rewards * mask).sum(-1)
    columns = torch.arange(response_mask.size(1), device=response_mask.device)
    last = (columns * response_mask).amax(-1)                                        # (B,) last response column
    rewards = rewards.scatter_add(1, last[:, None], (shaped_scores * response_mask.any(-1))[:, None])
    return rewards, kl


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019): beta *= 1 + clip(KL/target - 1, ±0.2) * n / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class FixedKLController(AdaptiveKLController):
    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def kl_controller(rc: RewardConfig) -> AdaptiveKLController:
    cls = AdaptiveKLController if rc.adaptive_kl else FixedKLController
    return cls(rc.kl_coef, rc.kl_target, rc.kl_horizon)
