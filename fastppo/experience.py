"""Experience: score a rollout, shape rewards, GAE -> one typed batch (Zheng et al. 2023, §5.3).

    outcome_scores     raw score: reward model at EOS + reward functions (`fastppo.rewards`)
    score_rollout      old logprobs + entropy (policy), ref logprobs, values (critic, when there is one)
    reparameterise     running mean/std of scores; scale, normalise, clip (PPO-max §5.3.1)
    token_rewards      r_t = -beta * KL_t(old, ref), shaped score added at the last response token (§5.3.2)
    advantages         GAE, optional whitening and clipping

Everything here runs without gradients.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, fields

import torch

from . import dist
from .config import Config
from .kernels import gae, kl_penalty
from .masked import masked_count, masked_moments, masked_whiten
from .metrics import RunningMoments, explained_variance, masked_stats
from .models import ModelError, Models, response_logprobs, response_values, score_at
from .rollout import Rollout, with_eos_for_scoring

log = logging.getLogger("fastppo")


@dataclass
class Experience:
    """One rollout batch ready for the PPO update: B rows, prompt width P, response width R.

    sequences:      (B, P+R) int64   prompt + response
    attention_mask: (B, P+R) int64
    response_mask:  (B, R)   bool    response tokens (EOS included)
    old_logprobs:   (B, R)   float32 policy logprobs at rollout time (logits / T)
    ref_logprobs:   (B, R)   float32 reference logprobs (logits / T)
    old_values:     (B, R)   float32 critic values, V of y_t read at the state before y_t (0 without a critic)
    rewards:        (B, R)   float32 token rewards: -beta*KL_t, plus the shaped score at the last token
    advantages:     (B, R)   float32 GAE advantages (whitened/clipped if configured)
    returns:        (B, R)   float32 advantages + old_values (before whitening); without a critic the return the
                             estimator starts from (R_i on each token, or REINFORCE++'s returns-to-go)
    prompt_width:   P
    """
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    prompt_width: int

    def __len__(self) -> int:
        return self.sequences.size(0)

    def select(self, index: torch.Tensor | slice) -> "Experience":
        """Rows `index` (B',) of every tensor; a slice gives views."""
        return Experience(**{
            f.name: (getattr(self, f.name)[index] if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
            for f in fields(self)
        })


def gather_experience(exp: Experience) -> Experience:
    """The global batch on every rank: each tensor concatenated over ranks, in rank order.

    Every rank holds the same number of rows, the same prompt width (the
    global batch is collated before it is split) and the same response width
    (padded to the widest on any rank before scoring), so the rows line up
    exactly as in one process. Identity in one process.
    """
    if dist.world_size() == 1:
        return exp
    return Experience(**{
        f.name: (dist.all_gather_cat(getattr(exp, f.name)) if isinstance(getattr(exp, f.name), torch.Tensor)
                 else getattr(exp, f.name))
        for f in fields(exp)
    })


@dataclass
class Scored:
    """No-grad model outputs for a rollout (B rows, R response columns).

    old_logprobs, old_entropy, ref_logprobs, values: (B, R) float32
    scores: (B,) float32 raw reward-model scores at EOS; 0 where nonfinite
    nonfinite: (B,) bool rows whose reward-model score was NaN or infinite (dropped from the update)
    """
    old_logprobs: torch.Tensor
    old_entropy: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    nonfinite: torch.Tensor


@torch.no_grad()
def outcome_scores(models: Models, rollout: Rollout, cfg: Config, *, batch_size: int,
                   function_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw outcome score of each response: the reward model's at EOS (batch_size rows at a time), plus
    `function_scores` (B,), the reward functions' weighted sum (`fastppo.rewards`); either may be absent.

    Returns (scores, nonfinite), (B,) float32 and bool. A NaN or infinite reward-model score (one odd response
    can overflow a half-precision reward model) is set to 0 and flagged in `nonfinite`; `drop_rows` then takes
    those rows out of the update. Every row of the global batch non-finite means the reward model itself is
    broken: that stops the run.
    """
    B = len(rollout.sequences)
    scores = torch.zeros(B, device=rollout.sequences.device)
    if models.reward is not None:
        tok = models.tokenizer
        rm_ids, rm_mask, eos_index = with_eos_for_scoring(rollout, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        scores = torch.cat([score_at(models.reward, rm_ids[s:s + batch_size], rm_mask[s:s + batch_size],
                                     eos_index[s:s + batch_size]) for s in range(0, B, batch_size)])
    nonfinite = ~torch.isfinite(scores)
    n_bad = int(dist.all_reduce(nonfinite.sum().float()).item())  # one scalar host sync, to say which rows
    if n_bad:
        rows = nonfinite.nonzero().flatten().tolist()
        where = f"rank {dist.rank()} " if dist.world_size() > 1 else ""
        if n_bad == dist.world_size() * nonfinite.numel():
            raise ModelError(f"the reward model at {cfg.model.reward_path} scored every response of the batch NaN "
                             f"or infinite (e.g. {scores[0].item()}): check its weights and model.dtype")
        log.warning("the reward model at %s scored %s rows %s NaN/inf: they are dropped from this update",
                    cfg.model.reward_path, where, rows[:16])
    scores = torch.where(nonfinite, 0.0, scores.float())
    if function_scores is not None:
        scores = scores + function_scores.to(scores.device, torch.float32)
    return scores, nonfinite


@torch.no_grad()
def score_rollout(models: Models, rollout: Rollout, cfg: Config, *, batch_size: int, fused: bool,
                  outcomes: tuple[torch.Tensor, torch.Tensor] | None = None) -> Scored:
    """Phase 2: run policy, reference and critic (when there is one) over the rollout, batch_size rows at a
    time, and take the outcome scores (`outcome_scores`, computed here unless given as (scores, nonfinite)).
    Without a critic the values are 0."""
    T = cfg.rollout.temperature
    P = rollout.prompt_width
    kw = dict(prompt_width=P, temperature=T, fused=fused, backend=cfg.run.backend, chunk_size=cfg.model.lm_head_chunk_size,
              vocab_size=models.vocab_size)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("old_logprobs", "old_entropy", "ref_logprobs", "values")}
    for s in range(0, len(rollout.sequences), batch_size):
        rows = slice(s, s + batch_size)
        ids, mask, rmask = rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows]
        lp = response_logprobs(models.policy, ids, mask, rmask, return_entropy=True, **kw)
        parts["old_logprobs"].append(lp.logprobs)
        parts["old_entropy"].append(lp.entropy)
        parts["ref_logprobs"].append(response_logprobs(models.ref, ids, mask, rmask, **kw).logprobs)
        parts["values"].append(torch.zeros_like(lp.logprobs) if models.critic is None
                               else response_values(models.critic, ids, mask, rmask, prompt_width=P))
    out = {k: torch.cat(v) for k, v in parts.items()}
    scores, nonfinite = outcomes if outcomes is not None else outcome_scores(models, rollout, cfg, batch_size=batch_size)
    return Scored(**out, scores=scores, nonfinite=nonfinite)


def drop_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout with the response masks of `rows` (B,) bool zeroed: those rows add nothing to the
    rewards, advantages, losses or statistics of the update."""
    return dataclasses.replace(rollout, response_mask=rollout.response_mask & ~rows[:, None])


def reparameterise_scores(scores: torch.Tensor, moments: RunningMoments, cfg: Config,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """PPO-max §5.3.1: update the running moments with this batch, then (s - mu)/sigma or s/sigma, clipped.

    The moments are updated with the current batch before they are used, so
    the first iteration is already normalised by its own statistics. Only
    `valid` (B,) bool rows (default: the finite scores) enter the moments; the
    others come out as 0, so a non-finite score never reaches the running
    statistics or a checkpoint.
    """
    rc = cfg.reward
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


def token_rewards(shaped_scores: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  response_mask: torch.Tensor, *, kl_coef: float, estimator: str, clamp: float | None,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-max §5.3.2: r_t = -beta * KL_t on every response token, + shaped score at the last one.

    Returns (rewards (B, R), kl (B, R)); both 0 off the mask.
    """
    mask = response_mask.float()
    kl = kl_penalty(old_logprobs, ref_logprobs, estimator=estimator, clamp=clamp, backend=backend) * mask
    rewards = -kl_coef * kl
    last = (response_mask.long().sum(-1) - 1).clamp(min=0)                           # (B,) last response column
    rewards = rewards.scatter_add(1, last[:, None], shaped_scores[:, None].float())
    return rewards, kl


def compute_advantages(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, cfg: Config
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over response tokens (V after the last token = 0), then optional global whitening and clipping.

    Returns (advantages, returns), each (B, R) float32; returns are computed
    from the raw advantages (R_t = A_t + V_t) before whitening.
    """
    advantages, returns = gae(rewards, values, response_mask, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
                                  backend=cfg.run.backend)
    if cfg.ppo.whiten_advantages:
        # Global over the batch: statistics of all ranks' valid tokens (group=None in one process).
        advantages = masked_whiten(advantages, response_mask, shift_mean=True, group=dist.group()) * response_mask
    if cfg.ppo.advantage_clip is not None:
        advantages = advantages.clamp(-cfg.ppo.advantage_clip, cfg.ppo.advantage_clip)
    return advantages, returns


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


def kl_controller(cfg: Config) -> AdaptiveKLController:
    cls = AdaptiveKLController if cfg.reward.adaptive_kl else FixedKLController
    return cls(cfg.reward.kl_coef, cfg.reward.kl_target, cfg.reward.kl_horizon)


def experience_metrics(rollout: Rollout, scored: Scored, shaped: torch.Tensor, kl: torch.Tensor,
                       exp: Experience, max_new_tokens: int, with_critic: bool = True) -> dict[str, torch.Tensor]:
    """Rollout-side diagnostics of pattern collapse (Zheng et al. 2023), as device tensors (synced once with the rest)."""
    mask = rollout.response_mask
    n_tokens = masked_count(mask, group=dist.group())
    n_rows = float(mask.size(0) * dist.world_size())                 # every rank scores the same number of rows
    seq_kl = dist.all_reduce(kl.sum()) / n_rows
    mean_logprob = dist.all_reduce((scored.old_logprobs * mask).sum()) / n_tokens
    out = {
        **masked_stats("score/raw", scored.scores, ~scored.nonfinite),
        **masked_stats("score/shaped", shaped, ~scored.nonfinite),
        "score/nonfinite": dist.all_reduce(scored.nonfinite.sum().float()),
        "kl/ref_per_sequence": seq_kl,
        "kl/ref_per_token": dist.all_reduce(kl.sum()) / n_tokens,
        "policy/entropy": dist.all_reduce((scored.old_entropy * mask).sum()) / n_tokens,
        "policy/perplexity": torch.exp(-mean_logprob),
        "response/length_mean": n_tokens / n_rows,
        "response/length_max": dist.all_reduce(rollout.lengths.max().float(), "max"),
        "response/clipped_frac": dist.all_reduce((rollout.lengths >= max_new_tokens).float().sum()) / n_rows,
        "response/no_eos_frac": dist.all_reduce((~rollout.ended).float().sum()) / n_rows,
        "response/tokens": n_tokens,
        "response/total_tokens": masked_count(rollout.attention_mask, group=dist.group()),  # prompt + response tokens
        **masked_stats("advantages", exp.advantages, mask),
        **masked_stats("returns", exp.returns, mask),
        "reward/token_mean": dist.all_reduce(exp.rewards.sum()) / n_rows,
    }
    if with_critic:
        out.update({**masked_stats("values", exp.old_values, mask),
                    "values/explained_variance_old": explained_variance(exp.old_values, exp.returns, mask)})
    return out

