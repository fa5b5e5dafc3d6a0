"""Phase 5 of an iteration: the PPO update, epochs x shuffled minibatches x micro-batches.

One optimizer step per minibatch (`optim.optimizer_step`). Losses are token means over the whole minibatch:
every micro-batch's loss is divided by the minibatch's valid-token count (all ranks, `masked_count` over
`dist.group()`), so summing micro-batch gradients gives exactly the minibatch token mean however the tokens
fall into micro-batches; other aggregations (`ppo.loss_agg`) are per-token weights on that mean.

    total = pg_loss - ent_coef * entropy + kl_loss_coef * kl + vf_coef * vf_loss + ptx_coef * ptx_loss

The policy and critic are separate models with separate AdamW optimizers and LR schedules; each gets its own
global grad-norm clip.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import nn

from . import dist, parallel
from .config import PPOConfig
from .experience import Experience
from .kernels import kl_penalty, linear_ppo_loss, ppo_loss
from .masked import masked_count
from .metrics import MetricBuffer, explained_variance
from .models import Forward, backbone_states, ptx_loss, real_vocab_size
from .optim import Trained, UpdateCounters, optimizer_step
from .packing import Packing, in_row_order, micro_batches, minibatch_shares, response_targets, varlen_attention

log = logging.getLogger("fastppo")


def _times(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The product of two optional per-token weights (None = all ones)."""
    return b if a is None else a if b is None else a * b


def policy_loss_kind(pc: PPOConfig) -> dict:
    """The loss ops' ratio_level (token: PPO; sequence: GSPO) and policy_loss (ppo or cispo) arguments."""
    return dict(ratio_level=str(pc.ratio_level), policy_loss=str(pc.policy_loss))


def fused_policy_loss(policy: nn.Module, micro: Experience, normalizer: torch.Tensor, pc: PPOConfig, fwd: Forward,
                      pack: Packing, weight: torch.Tensor | None = None, kl: bool = False):
    """Clipped surrogate − ent_coef·entropy (+ kl_loss_coef·KL to the reference when `kl`) of one micro-batch, from
    the policy's hidden states in one pass.

    `linear_ppo_loss` computes the loss and its gradients chunk by chunk in forward: 6·N·H·V lm_head
    FLOP, where response_logprobs + ppo_loss take 8 (the logits are recomputed in backward). Like
    `response_logprobs` it runs as a forward of the root (`parallel.run_as_forward`), so that under FSDP the
    full lm_head weight is gathered and its gradient goes back to the shards. The op sees the target states of
    `pack` (the response tokens), each sequence's contiguous (GSPO's sequence ratio reads their padded rows as
    sequence ids). weight: (B, R) per-token weight of the surrogate (rollout correction × loss
    aggregation) or None. The KL term is the token mean over the minibatch (ppo.loss_agg token_mean).
    """
    P = micro.prompt_width

    def run(model, sequences, attention_mask):
        # Float inputs come in through the closure: FSDP casts a forward's floating-point arguments to its
        # param dtype, and bf16 old logprobs would move every ratio by up to ~3%.
        per_token = [pack.take(x, P - 1) for x in (sequences[:, P:], micro.old_logprobs, micro.advantages,
                                                    micro.response_mask)]            # (M,) each: response only
        out = linear_ppo_loss(
            backbone_states(model, sequences, attention_mask, pack), model.get_output_embeddings().weight,
            *per_token, temperature=fwd.temperature, clip_eps=pc.clip_eps, dual_clip=pc.dual_clip,
            ent_coef=pc.ent_coef, normalizer=normalizer, backend=fwd.backend, chunk_size=fwd.chunk_size,
            vocab_size=real_vocab_size(model, fwd.vocab_size), policy_weight=None if weight is None else pack.take(weight, P - 1),
            clip_eps_high=pc.clip_eps_high, **policy_loss_kind(pc),
            sequence_ids=pack.target_row if pc.ratio_level == "sequence" else None,
            **(dict(ref_logprobs=pack.take(micro.ref_logprobs, P - 1), kl_coef=pc.kl_loss_coef,
                    kl_estimator=pc.kl_loss_estimator) if kl else {}),
        )
        out = type(out)(*(t.clone() for t in out))      # not views of the op's buffer: FSDP hooks the outputs
        return out._replace(logprobs=pack.unpack(out.logprobs)[:, P - 1:-1])

    return parallel.run_as_forward(policy, run, micro.sequences, micro.attention_mask)


def ppo_update(exp: Experience, policy: Trained, critic: Trained | None, pc: PPOConfig, fwd: Forward, *,
               max_grad_norm: float | None, max_new_tokens: int, max_nonfinite_in_a_row: int,
               ptx_batches: Iterator | None, counters: UpdateCounters, metrics: MetricBuffer) -> None:
    """Phase 5: pc.ppo_epochs passes of shuffled minibatches over `exp`, one optimizer step per minibatch.

    policy.train=False is the critic warm-up (PPO-max §5.4): the policy is not run, its loss terms are zero, and
    only the critic steps. critic=None (a critic-free estimator): no value forward, loss, metric or step.
    ptx_batches: endless SFT batches (`data.sft_batches`) for the ptx loss, or None. max_new_tokens: the
    constant of the seq_mean_token_sum_norm aggregation.
    """
    B = len(exp)
    train_policy = policy.train
    use_ptx = train_policy and ptx_batches is not None and pc.ptx_coef > 0
    use_kl = train_policy and pc.kl_loss_coef > 0
    fused_path = train_policy and fwd.fused and pc.fused_policy_loss
    # The fused op's KL term is a token mean: other aggregations weigh it per token as the policy loss, outside it.
    fused_kl = use_kl and fused_path and pc.loss_agg == "token_mean"
    # train() matters only for gradient checkpointing: dropout is 0 in every config (models.no_dropout_config).
    policy.model.train(train_policy)
    if critic is not None:
        critic.model.train()
    # `exp` is the whole global batch on every rank (experience.gather_experience); the global RNG is the
    # same on all ranks, so all draw the same minibatches, and each rank trains on its own share of each.
    # Every epoch's permutation drawn up front (the global RNG, checkpointed; the same draws in the same order
    # as one per epoch), and every minibatch's micro-batches planned (and packed) with one copy each way
    # between host and device for the whole update: no transfer per minibatch. Micro-batches of
    # pc.micro_batch_size rows or pc.micro_batch_tokens tokens, padding-free with pc.packing, as many on every
    # rank (dummies, whose loss is multiplied by 0).
    orders = torch.stack([torch.randperm(B) for _ in range(pc.ppo_epochs)])
    schedule = iter(micro_batches([(exp.attention_mask, response_targets(exp.response_mask, exp.prompt_width))],
                                  rows=pc.micro_batch_size, tokens=pc.micro_batch_tokens, packed=pc.packing,
                                  groups=minibatch_shares(orders, pc.minibatch_size),
                                  one_row=varlen_attention(policy.model)))
    for _ in orders:
        for _ in range(0, B, pc.minibatch_size):
            group = next(schedule)                                                      # this minibatch's share
            minibatch = exp.select(group.rows)
            # Token mean over the whole minibatch on all ranks, not per micro-batch.
            normalizer, n_seqs = ((masked_count(minibatch.response_mask, group=dist.group()), None)
                                  if pc.loss_agg == "token_mean" else minibatch_counts(minibatch.response_mask))
            losses, minibatch_sums, minibatch_values, minibatch_rows = [], {}, [], []
            for planned in group.micro:
                micro, (pack,) = minibatch.select(planned.rows), planned.packs
                mask = micro.response_mask
                values = (fwd.response_values(critic.model, micro.sequences, micro.attention_mask, mask,
                                              micro.prompt_width, pack=pack)
                          if critic is not None else torch.zeros_like(micro.old_logprobs))
                agg = loss_agg_weight(mask, mode=pc.loss_agg, n_tokens=normalizer, n_seqs=n_seqs,
                                      max_new_tokens=max_new_tokens)
                # The surrogate's per-token weight: rollout correction times the loss aggregation (None: all ones).
                weight = _times(micro.policy_weight, agg)
                policy_out = None
                if fused_path:
                    policy_out = fused_policy_loss(policy.model, micro, normalizer, pc, fwd, pack, weight, kl=fused_kl)
                    logprobs = policy_out.logprobs                  # detached: ppo_loss below only trains the critic
                    if use_kl and not fused_kl:
                        # The KL needs logprobs with a gradient: the separate path's (same numbers, one more pass).
                        logprobs = fwd.response_logprobs(policy.model, micro.sequences, micro.attention_mask, mask,
                                                         micro.prompt_width, pack=pack).logprobs
                elif train_policy:
                    logprobs, entropy = fwd.response_logprobs(policy.model, micro.sequences, micro.attention_mask, mask,
                                                              micro.prompt_width, return_entropy=True, pack=pack)
                else:
                    logprobs, entropy = micro.old_logprobs, torch.zeros_like(micro.old_logprobs)
                out = ppo_loss(
                    logprobs if policy_out is None else logprobs.detach(), micro.old_logprobs, micro.advantages,
                    values, micro.old_values, micro.returns, mask,
                    clip_eps=pc.clip_eps, value_clip=pc.value_clip if critic is not None else None,
                    vf_coef=pc.vf_coef if critic is not None else 0.0, dual_clip=pc.dual_clip,
                    normalizer=normalizer, backend=fwd.backend, clip_eps_high=pc.clip_eps_high,
                    policy_weight=weight, **policy_loss_kind(pc),
                )
                kl_mean = None
                if policy_out is not None:
                    # The policy statistics of `out` are those of policy_out (same logprobs, same formulas).
                    entropy_mean = policy_out.entropy
                    loss = policy_out.loss + pc.vf_coef * out.value_loss if critic is not None else policy_out.loss
                    if fused_kl:
                        kl_mean = policy_out.kl
                else:
                    entropy_mean = (entropy * mask).sum() / normalizer
                    # Without an entropy bonus the entropy is a metric only: keep it out of the backward pass.
                    loss = out.loss - pc.ent_coef * entropy_mean if pc.ent_coef > 0 else out.loss
                if use_kl and not fused_kl:
                    # = algo.kl_loss: the estimate of KL(pi_theta || pi_ref) per token, aggregated as the policy
                    # loss (its loss_agg weight), gradient through the policy's logprobs only.
                    k = kl_penalty(logprobs, micro.ref_logprobs, estimator=pc.kl_loss_estimator, backend=fwd.backend)
                    kl_mean = (k * (mask.float() if agg is None else agg)).sum() / normalizer
                    loss = loss + pc.kl_loss_coef * kl_mean
                if planned.dummy:                   # the same collectives as the other ranks, no contribution
                    (loss * 0.0).backward()
                    continue
                loss.backward()
                losses.append(loss.detach())
                # Each term is already divided by the minibatch normalizer: summing over
                # micro-batches gives the minibatch value.
                terms = [("loss/policy", out.policy_loss), ("loss/total", loss), ("policy/clipfrac", out.clipfrac),
                         ("policy/approx_kl", out.approx_kl), ("policy/ratio_mean", out.ratio_mean),
                         ("policy/entropy_new", entropy_mean)]
                if kl_mean is not None:
                    terms.append(("loss/kl", kl_mean))
                if critic is not None:
                    terms += [("loss/value", out.value_loss), ("values/clipfrac", out.value_clipfrac)]
                for k, v in terms:
                    minibatch_sums[k] = minibatch_sums.get(k, 0.0) + v.detach()
                minibatch_values.append(values.detach())
                minibatch_rows.append(planned.rows)
            metrics.add_dict(dist.all_reduce_dict(minibatch_sums))                      # this rank's share -> global
            if critic is not None:
                # Over the whole minibatch (all ranks), so it does not depend on how it is split into micro-batches.
                metrics.add("values/explained_variance",
                            explained_variance(in_row_order(minibatch_rows, minibatch_values), minibatch.returns,
                                               minibatch.response_mask))
            if use_ptx:
                ptx = pc.ptx_coef * ptx_loss(policy.model, next(ptx_batches), fused=fwd.fused, backend=fwd.backend,
                                             chunk_size=fwd.chunk_size, packed=pc.packing)
                ptx.backward()
                losses.append(ptx.detach())
                metrics.add("loss/ptx", dist.all_reduce(ptx.detach()) / pc.ptx_coef)
            optimizer_step(
                torch.stack(losses).sum(), [policy] if critic is None else [policy, critic],
                max_grad_norm=max_grad_norm, counters=counters, max_nonfinite_in_a_row=max_nonfinite_in_a_row,
                metrics=metrics,
                advice="Lower optim.policy_lr / optim.critic_lr, set optim.max_grad_norm, or check the reward model's "
                       "scores (reward.reward_clip).")
    policy.model.eval()
    if critic is not None:
        critic.model.eval()


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
    The weights whose token mean `algo.token_mean` takes to each aggregation (`algo.ppo_loss`'s policy_weight).
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
