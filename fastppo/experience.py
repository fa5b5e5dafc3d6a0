"""Phase 2 of an iteration: score the rollout with the models, and the typed batch the update trains on.

    score_rollout       old logprobs + entropy (policy), ref logprobs (when a reference is loaded), values (critic,
                        when there is one); rows whose forward is not finite flagged
    drop_rows           rows out of the update (non-finite, filler groups): masked and blanked
    rollout_correction  the generator/trainer mismatch measured; off-policy weights of the policy loss
    Experience          one rollout batch ready for the update; `gather_experience` makes it global

Everything here runs without gradients.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, fields

import torch

from . import dist
from .config import ConfigError, CorrectionConfig
from .masked import masked_count
from .models import Forward, ModelError, Models
from .packing import in_row_order, micro_batches, nonfinite_rows, padded_again, response_targets, varlen_attention
from .rollout import Rollout

log = logging.getLogger("fastppo")


@dataclass
class Experience:
    """One rollout batch ready for the PPO update: B rows, prompt width P, response width R.

    sequences:      (B, P+R) int64   prompt + response
    attention_mask: (B, P+R) int64
    response_mask:  (B, R)   bool    response tokens (EOS included)
    old_logprobs:   (B, R)   float32 policy logprobs at rollout time (logits / T)
    ref_logprobs:   (B, R)   float32 reference logprobs (logits / T); None when no reference model is loaded
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
    ref_logprobs: torch.Tensor | None
    old_values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    prompt_width: int
    policy_weight: torch.Tensor | None = None

    @staticmethod
    def of(rollout: Rollout, scored: "Scored", rewards: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
           policy_weight: torch.Tensor | None) -> "Experience":
        """The batch of a scored rollout with its token rewards, advantages, returns and policy weights."""
        return Experience(sequences=rollout.sequences, attention_mask=rollout.attention_mask,
                          response_mask=rollout.response_mask, old_logprobs=scored.old_logprobs,
                          ref_logprobs=scored.ref_logprobs, old_values=scored.values, rewards=rewards,
                          advantages=advantages, returns=returns, prompt_width=rollout.prompt_width,
                          policy_weight=policy_weight)

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
        the engine gives no entropy; ref_logprobs None when no reference model is loaded; values 0 without a critic)
    scores: (B,) float32 raw outcome scores; 0 where nonfinite
    nonfinite: (B,) bool rows whose score, logprobs, entropy or values were NaN or infinite (dropped from the update)
    """
    old_logprobs: torch.Tensor
    old_entropy: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor
    scores: torch.Tensor
    nonfinite: torch.Tensor


@torch.no_grad()
def score_rollout(models: Models, rollout: Rollout, fwd: Forward, *, outcomes: tuple[torch.Tensor, torch.Tensor],
                  old_logprobs: str = "recompute", rows: int, tokens: int | None = None) -> Scored:
    """Phase 2: run policy, reference and critic (those loaded) over the rollout in micro-batches of `rows` rows
    (or `tokens` tokens), as `fwd` says, and join the outcome scores of phase 1, (scores, nonfinite).
    old_logprobs: rollout.old_logprobs (reuse: pi_old is the generator's, no policy forward). Without a critic
    the values are 0; without a reference the ref logprobs are None. A row whose logprobs, entropy or values
    are NaN or infinite (computed padded to tell, `packing.padded_again`) is flagged in `nonfinite` like a
    non-finite score, its values set to 0."""
    P = rollout.prompt_width
    reuse = old_logprobs == "reuse"
    if reuse and rollout.logprobs is None:
        raise ConfigError("rollout.old_logprobs=reuse takes pi_old from the generator's logprobs, but the generation "
                          "engine returned none (Rollout.logprobs is None): set rollout.old_logprobs=recompute")
    names = [*(() if reuse else ("old_logprobs", "old_entropy")), *(() if models.ref is None else ("ref_logprobs",)),
             *(() if models.critic is None else ("values",))]

    def forward(rows: torch.Tensor, pack) -> list[torch.Tensor]:
        ids, mask, rmask = rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows]
        outs = []
        if not reuse:
            outs += fwd.response_logprobs(models.policy, ids, mask, rmask, P, return_entropy=True, pack=pack)
        if models.ref is not None:
            outs.append(fwd.response_logprobs(models.ref, ids, mask, rmask, P, pack=pack).logprobs)
        if models.critic is not None:
            outs.append(fwd.response_values(models.critic, ids, mask, rmask, P, pack=pack))
        return outs

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    frames = [(rollout.attention_mask, response_targets(rollout.response_mask, P))]
    done = []
    (every_row,) = micro_batches(frames, rows=rows, tokens=tokens, packed=fwd.packed,
                                 one_row=varlen_attention(models.policy))
    for micro in every_row.micro:
        outs = forward(micro.rows, micro.packs[0])
        if not micro.dummy:                              # a dummy only keeps FSDP's collectives in step
            done.append(micro.rows)
            for k, v in zip(parts, outs):
                parts[k].append(v)
    out = {k: in_row_order(done, v) for k, v in parts.items()}
    B = rollout.sequences.size(0)
    bad = nonfinite_rows(*out.values()) if out else torch.zeros(B, dtype=torch.bool, device=rollout.sequences.device)
    n_bad = int(dist.all_reduce(bad.sum().float()))                 # one host sync
    if n_bad and fwd.packed:
        padded_again(bad, rows, lambda again: forward(again, None), list(out.values()))
        bad = nonfinite_rows(*out.values())
        n_bad = int(dist.all_reduce(bad.sum().float()))
    if n_bad:
        if n_bad == dist.world_size() * bad.numel():
            raise ModelError("the policy, reference or critic forward gave NaN or inf on every response of the batch: "
                             "check their weights and model.dtype")
        log.warning("the policy, reference or critic forward gave NaN/inf on rows %s%s: they are dropped from this "
                    "update", bad.nonzero().flatten().tolist()[:16],
                    f" of rank {dist.rank()}" if dist.world_size() > 1 else "")
        out = {k: torch.where(bad.view(-1, *[1] * (v.dim() - 1)), 0.0, v) for k, v in out.items()}
    if reuse:
        rmask = rollout.response_mask
        out["old_logprobs"] = torch.where(rmask, rollout.logprobs.float(), 0.0)
        out["old_entropy"] = None if rollout.entropy is None else torch.where(rmask, rollout.entropy.float(), 0.0)
    scores, nonfinite = outcomes
    return Scored(old_logprobs=out["old_logprobs"], old_entropy=out["old_entropy"], ref_logprobs=out.get("ref_logprobs"),
                  values=out.get("values", torch.zeros_like(out["old_logprobs"])), scores=scores,
                  nonfinite=nonfinite | bad)


def drop_rows(rollout: Rollout, rows: torch.Tensor, pad_id: int) -> Rollout:
    """The rollout with `rows` (B,) bool blanked: response masks zeroed, so that they add nothing to the rewards,
    advantages, losses or statistics of the update, and tokens replaced by padding, so that no forward of the
    update sees them (a sequence whose forward gives NaN would otherwise spread it through the gradients)."""
    return dataclasses.replace(rollout, response_mask=rollout.response_mask & ~rows[:, None],
                               sequences=torch.where(rows[:, None], pad_id, rollout.sequences))


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
    = `algo.rollout_correction_weight`, with its metrics global over ranks.
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


def rollout_correction(rollout: Rollout, scored: Scored, correction: CorrectionConfig, old_logprobs: str
                       ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """`Experience.policy_weight` (`correction_weight` with the correction section) and the rollout/* metrics:
    with rollout.old_logprobs=recompute (`old_logprobs`) and the engine's logprobs, the mismatch
    (`mismatch_metrics`) every iteration. With reuse there is nothing to measure (pi_old is pi_rollout)."""
    c = correction
    correcting = c.importance != "none" or c.mask != "none"
    if old_logprobs == "reuse" or rollout.logprobs is None:
        if correcting:
            raise ConfigError(f"correction.importance={c.importance} / correction.mask={c.mask} weigh "
                              "pi_old / pi_rollout, but the generation engine returned no logprobs "
                              "(Rollout.logprobs is None): set both to none")
        return None, {}
    mask = rollout.response_mask
    weight, metrics = correction_weight(scored.old_logprobs, rollout.logprobs, mask, is_mode=c.importance,
                                        cap=c.importance_cap, mask_mode=c.mask, bounds=tuple(c.mask_bounds))
    return weight, {**mismatch_metrics(scored.old_logprobs, rollout.logprobs, mask), **metrics}


