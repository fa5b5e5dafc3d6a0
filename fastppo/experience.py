"""Experience: score a rollout, shape rewards, GAE -> one typed batch (Zheng et al. 2023, §5.3).

    outcome_scores     raw score: reward model at EOS + reward functions (`fastppo.rewards`)
    score_rollout      old logprobs + entropy (policy), ref logprobs, values (critic, when there is one)
    reparameterise     running mean/std of scores; scale, normalise, clip (PPO-max §5.3.1)
    token_rewards      r_t = -beta * KL_t(old, ref), shaped score added at the last response token (§5.3.2)
    advantages         GAE, optional whitening and clipping
    rollout_correction the generator/trainer mismatch measured; off-policy weights of the policy loss

Everything here runs without gradients.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, fields

import torch

from . import dist
from .config import Config, ConfigError
from .kernels import gae, kl_penalty
from .masked import masked_count, masked_moments, masked_whiten
from .metrics import RunningMoments, explained_variance, masked_stats
from .models import ModelError, Models, response_logprobs, response_values, score_at
from .packing import in_row_order, index_targets, micro_batches, response_targets, varlen_attention
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
    policy_weight:  (B, R)   float32 off-policy weight of each token's policy surrogate (`rollout_correction`);
                                     None: every weight 1
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
    policy_weight: torch.Tensor | None = None

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
        (with rollout.old_logprobs=reuse: old_logprobs and old_entropy are the rollout's; old_entropy None when
        the engine gives no entropy)
    scores: (B,) float32 raw outcome scores; 0 where nonfinite
    nonfinite: (B,) bool rows whose score, logprobs, entropy or values were NaN or infinite (dropped from the update)
    """
    old_logprobs: torch.Tensor
    old_entropy: torch.Tensor | None
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    nonfinite: torch.Tensor


def _padded_again(bad: torch.Tensor, batch_size: int, forward, outs: list[torch.Tensor]) -> None:
    """Rows `bad` (B,) bool of a packed pass, computed again padded, in place in `outs` (each (B, ...)).

    In a packed row the sequences share the attention's matmuls, and a NaN or inf in one sequence's states
    reaches the others through 0 x NaN (a masked-out attention weight times a NaN value); a padded batch keeps
    it in its own row. The non-finite rows of a packed pass are such a row and its neighbours: computed again
    padded (`forward(rows)`: the outputs of those rows, pack=None), only the rows that are non-finite on their
    own stay so, and packed and padded passes drop the same rows. Under FSDP every rank runs as many forwards
    (a rank with fewer bad rows repeats its row 0 and drops the result). Host sync: one nonzero.
    """
    idx = bad.nonzero().flatten()
    n = int(dist.all_reduce(torch.tensor(idx.numel(), device=bad.device), "max"))
    for start in range(0, n, batch_size):
        rows = idx[start:start + batch_size]
        results = forward(rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=bad.device))
        if rows.numel():
            for out, res in zip(outs, results):
                out[rows] = res


def _nonfinite_rows(*xs: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: rows with a NaN or inf in any of the (B, ...) tensors."""
    bad = None
    for x in xs:
        if x is not None:
            row = ~torch.isfinite(x).flatten(1).all(1) if x.dim() > 1 else ~torch.isfinite(x)
            bad = row if bad is None else bad | row
    return bad


@torch.no_grad()
def outcome_scores(models: Models, rollout: Rollout, cfg: Config, *, batch_size: int,
                   function_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw outcome score of each response: the reward model's at EOS (batch_size rows at a time), plus
    `function_scores` (B,), the reward functions' weighted sum (`fastppo.rewards`); either may be absent.

    Returns (scores, nonfinite), (B,) float32 and bool. A score that is NaN or infinite in float32 (one odd
    response can overflow a half-precision reward model; reward functions' weighted sum can overflow float32)
    is set to 0 and flagged in `nonfinite`; `drop_rows` then takes those rows out of the update. Every row of
    the global batch non-finite from the reward model means the reward model itself is broken: that stops the run.
    """
    B = len(rollout.sequences)
    rm_scores = torch.zeros(B, device=rollout.sequences.device)
    packed = False
    if models.reward is not None:
        tok = models.tokenizer
        rm_ids, rm_mask, eos_index = with_eos_for_scoring(rollout, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        (every_row,) = micro_batches([(rm_mask, index_targets(eos_index, rm_mask.size(1)))], rows=batch_size,
                                     tokens=cfg.rollout.forward_batch_tokens, packed=cfg.ppo.packing,
                                     one_row=varlen_attention(models.reward))
        done, parts = [], []
        for micro in every_row.micro:
            (pack,), rows = micro.packs, micro.rows
            score = score_at(models.reward, rm_ids[rows], rm_mask[rows], eos_index[rows], pack=pack)
            if not micro.dummy:                          # a dummy only keeps FSDP's collectives in step
                done.append(rows)
                parts.append(score)
        rm_scores = in_row_order(done, parts).float()
        packed = cfg.ppo.packing
    n_rm_bad = int(dist.all_reduce(_nonfinite_rows(rm_scores).sum().float()))      # one host sync, to say which rows
    if n_rm_bad and packed:
        _padded_again(_nonfinite_rows(rm_scores), batch_size,
                      lambda rows: [score_at(models.reward, rm_ids[rows], rm_mask[rows], eos_index[rows]).float()],
                      [rm_scores])
        n_rm_bad = int(dist.all_reduce(_nonfinite_rows(rm_scores).sum().float()))
    rm_bad = _nonfinite_rows(rm_scores)
    scores = torch.where(rm_bad, 0.0, rm_scores)
    if function_scores is not None:
        scores = scores + function_scores.to(scores.device, torch.float32)
    nonfinite = rm_bad | _nonfinite_rows(scores)
    n_bad = n_rm_bad if function_scores is None else int(dist.all_reduce(nonfinite.sum().float()))
    if n_bad:
        rows = nonfinite.nonzero().flatten().tolist()
        where = f"rank {dist.rank()} " if dist.world_size() > 1 else ""
        if n_rm_bad == dist.world_size() * B:
            raise ModelError(f"the reward model at {cfg.model.reward_path} scored every response of the batch NaN "
                             f"or infinite (e.g. {rm_scores[0].item()}): check its weights and model.dtype")
        source = "the reward model" if function_scores is None else "the reward model and functions"
        log.warning("%s scored %srows %s NaN/inf in float32: they are dropped from this update", source, where,
                    rows[:16])
    return torch.where(_nonfinite_rows(scores), 0.0, scores), nonfinite


@torch.no_grad()
def score_rollout(models: Models, rollout: Rollout, cfg: Config, *, batch_size: int, fused: bool,
                  outcomes: tuple[torch.Tensor, torch.Tensor] | None = None) -> Scored:
    """Phase 2: run policy, reference and critic (when there is one) over the rollout, batch_size rows at a
    time, and take the outcome scores (`outcome_scores`, computed here unless given as (scores, nonfinite)).
    Without a critic the values are 0. A row whose logprobs, entropy or values are NaN or infinite (computed
    padded to tell, `_padded_again`) is flagged in `nonfinite` like a non-finite score, its values set to 0."""
    T = cfg.rollout.temperature
    P = rollout.prompt_width
    kw = dict(prompt_width=P, temperature=T, fused=fused, backend=cfg.run.backend, chunk_size=cfg.model.lm_head_chunk_size,
              vocab_size=models.vocab_size)
    reuse = cfg.rollout.old_logprobs == "reuse"
    if reuse and rollout.logprobs is None:
        raise ConfigError("rollout.old_logprobs=reuse takes pi_old from the generator's logprobs, but the generation "
                          "engine returned none (Rollout.logprobs is None): set rollout.old_logprobs=recompute")
    recomputed = () if reuse else ("old_logprobs", "old_entropy")

    def forward(rows: torch.Tensor, pack) -> list[torch.Tensor]:
        ids, mask, rmask = rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows]
        outs = []
        if not reuse:
            lp = response_logprobs(models.policy, ids, mask, rmask, return_entropy=True, pack=pack, **kw)
            outs += [lp.logprobs, lp.entropy]
        ref = response_logprobs(models.ref, ids, mask, rmask, pack=pack, **kw).logprobs
        return outs + [ref, torch.zeros_like(ref) if models.critic is None
                       else response_values(models.critic, ids, mask, rmask, prompt_width=P, pack=pack)]

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*recomputed, "ref_logprobs", "values")}
    frames = [(rollout.attention_mask, response_targets(rollout.response_mask, P))]
    done = []
    (every_row,) = micro_batches(frames, rows=batch_size, tokens=cfg.rollout.forward_batch_tokens, packed=cfg.ppo.packing,
                                 one_row=varlen_attention(models.policy))
    for micro in every_row.micro:
        outs = forward(micro.rows, micro.packs[0])
        if not micro.dummy:                              # a dummy only keeps FSDP's collectives in step
            done.append(micro.rows)
            for k, v in zip(parts, outs):
                parts[k].append(v)
    out = {k: in_row_order(done, v) for k, v in parts.items()}
    bad = _nonfinite_rows(*out.values())
    n_bad = int(dist.all_reduce(bad.sum().float()))                 # one host sync
    if n_bad and cfg.ppo.packing:
        _padded_again(bad, batch_size, lambda rows: forward(rows, None), list(out.values()))
        bad = _nonfinite_rows(*out.values())
        n_bad = int(dist.all_reduce(bad.sum().float()))
    if n_bad:
        if n_bad == dist.world_size() * bad.numel():
            raise ModelError(f"the policy, reference or critic forward gave NaN or inf on every response of the batch "
                             f"({cfg.model.policy_path}, {cfg.model.critic_path or cfg.model.reward_path}): check "
                             "their weights and model.dtype")
        log.warning("the policy, reference or critic forward gave NaN/inf on rows %s%s: they are dropped from this "
                    "update", bad.nonzero().flatten().tolist()[:16],
                    f" of rank {dist.rank()}" if dist.world_size() > 1 else "")
        out = {k: torch.where(bad.view(-1, *[1] * (v.dim() - 1)), 0.0, v) for k, v in out.items()}
    if reuse:
        rmask = rollout.response_mask
        out["old_logprobs"] = torch.where(rmask, rollout.logprobs.float(), 0.0)
        out["old_entropy"] = None if rollout.entropy is None else torch.where(rmask, rollout.entropy.float(), 0.0)
    scores, nonfinite = outcomes if outcomes is not None else outcome_scores(models, rollout, cfg, batch_size=batch_size)
    return Scored(**out, scores=scores, nonfinite=nonfinite | bad)


def drop_rows(rollout: Rollout, rows: torch.Tensor, pad_id: int) -> Rollout:
    """The rollout with `rows` (B,) bool blanked: response masks zeroed, so that they add nothing to the rewards,
    advantages, losses or statistics of the update, and tokens replaced by padding, so that no forward of the
    update sees them (a sequence whose forward gives NaN would otherwise spread it through the gradients)."""
    return dataclasses.replace(rollout, response_mask=rollout.response_mask & ~rows[:, None],
                               sequences=torch.where(rows[:, None], pad_id, rollout.sequences))


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


# ----------------------------------------------------------------------------
# Rollout logprobs: the generator/trainer mismatch and its off-policy correction
# ----------------------------------------------------------------------------
#
# The tokens were sampled from pi_rollout (the generator's numerics); PPO's ratio refers to pi_old (the score
# phase's recompute). Where they differ, the surrogate of token t can be weighted by w_t = pi_old / pi_rollout
# (truncated importance sampling, Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
# RL training"), and tokens or responses whose ratio is far from 1 dropped (IcePop, Ling Team 2025). Everything
# is computed in float64 from log w_t = log pi_old - log pi_rollout: a k3 of a rounding-level mismatch
# (~d^2/2 with d ~ 1e-6) and a product of thousands of w_t are meaningless in float32.

def mismatch_metrics(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """|log pi_old - log pi_rollout| over valid tokens (mean, max, fraction > 0.1) and the k3 estimate of
    KL(pi_rollout || pi_old), token mean (Schulman 2020: with r = pi_old / pi_rollout on tokens sampled from
    pi_rollout, k3 = (r - 1) - log r >= 0). Global over ranks; device tensors, no host sync."""
    d = torch.where(response_mask, old_logprobs.double() - rollout_logprobs.double(), 0.0)       # log w_t, (B, R)
    k3 = torch.expm1(d) - d                                                                     # 0 off the mask
    sums = dist.all_reduce(torch.stack([d.abs().sum(), k3.sum(), (d.abs() > 0.1).sum().double()]))
    n = masked_count(response_mask, group=dist.group()).clamp(min=1).double()
    return {
        "rollout/logprob_diff_mean": sums[0] / n,
        "rollout/logprob_diff_max": dist.all_reduce(d.abs().max(), "max"),
        "rollout/kl_k3": sums[1] / n,
        "rollout/diff_gt_0.1_frac": sums[2] / n,
    }


def correction_weight(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor, *,
                      is_mode: str, cap: float, mask_mode: str, bounds: tuple[float, float]
                      ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The per-token weight of the policy surrogate, (B, R) float32 (0 off the mask), and its metrics.

    With log w_t = log pi_old - log pi_rollout (no gradient flows: both are data):
      is_mode   token:    min(w_t, cap)                                         (truncated IS)
                sequence: exp(min(sum_t log w_t, log cap)), on every token of the response
      mask_mode token:    0 where w_t is outside [low, high]
                sequence: 0 on the whole response where the geometric mean exp(mean_t log w_t) is outside
    The two multiply. Masked tokens keep their place in the token-mean normaliser (the loss divides by the
    number of valid tokens as before), so masking never raises the weight of the tokens left.
    Metrics (global, fractions of valid tokens): rollout/is_truncated_frac (the IS weight was capped, whether
    or not the token is also masked), rollout/masked_frac. None and no metrics when both modes are none.
    """
    if is_mode == "none" and mask_mode == "none":
        return None, {}
    valid = response_mask.bool()
    d = torch.where(valid, old_logprobs.double() - rollout_logprobs.double(), 0.0)                # (B, R)
    n_tokens = valid.sum(-1, keepdim=True).clamp(min=1)                                         # (B, 1)
    seq = d.sum(-1, keepdim=True).expand_as(d)                                                  # log prod_t w_t
    log_cap = math.log(cap)
    weight = torch.ones_like(d)
    truncated = torch.zeros_like(valid)
    if is_mode in ("token", "sequence"):
        log_w = d if is_mode == "token" else seq
        weight, truncated = torch.exp(log_w.clamp(max=log_cap)), log_w > log_cap
    keep = torch.ones_like(valid)
    if mask_mode in ("token", "sequence"):
        log_w = d if mask_mode == "token" else seq / n_tokens
        low, high = bounds
        keep = (log_w >= (math.log(low) if low > 0 else -math.inf)) & (log_w <= math.log(high))
    weight = torch.where(valid & keep, weight, 0.0).float()
    metrics = {}
    counts = dist.all_reduce(torch.stack([(truncated & valid).sum(), (~keep & valid).sum()]).float())
    n = masked_count(valid, group=dist.group()).clamp(min=1)
    if is_mode != "none":
        metrics["rollout/is_truncated_frac"] = counts[0] / n
    if mask_mode != "none":
        metrics["rollout/masked_frac"] = counts[1] / n
    return weight, metrics


def rollout_correction(rollout: Rollout, scored: Scored, cfg: Config) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Phase 4: `Experience.policy_weight` (`correction_weight` with ppo.rollout_is / rollout_mask) and the
    rollout/* metrics: with rollout.old_logprobs=recompute and the engine's logprobs, the mismatch
    (`mismatch_metrics`) every iteration. With reuse there is nothing to measure (pi_old is pi_rollout)."""
    pc = cfg.ppo
    correcting = pc.rollout_is != "none" or pc.rollout_mask != "none"
    if cfg.rollout.old_logprobs == "reuse" or rollout.logprobs is None:
        if correcting:
            raise ConfigError(f"ppo.rollout_is={pc.rollout_is} / ppo.rollout_mask={pc.rollout_mask} weigh "
                              "pi_old / pi_rollout, but the generation engine returned no logprobs "
                              "(Rollout.logprobs is None): set both to none")
        return None, {}
    mask = rollout.response_mask
    weight, metrics = correction_weight(scored.old_logprobs, rollout.logprobs, mask, is_mode=pc.rollout_is,
                                        cap=pc.rollout_is_cap, mask_mode=pc.rollout_mask,
                                        bounds=tuple(pc.rollout_mask_bounds))
    return weight, {**mismatch_metrics(scored.old_logprobs, rollout.logprobs, mask), **metrics}


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
        **({} if scored.old_entropy is None else
           {"policy/entropy": dist.all_reduce((scored.old_entropy * mask).sum()) / n_tokens}),
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

