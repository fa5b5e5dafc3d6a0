"""The PPO update: epochs x shuffled minibatches x micro-batches.

One optimizer step per minibatch. Losses are token means over the whole
minibatch: every micro-batch's loss is divided by the minibatch's valid-token
count (all ranks, `masked_count` over `dist.group()`), so summing micro-batch gradients gives
exactly the minibatch token mean however the tokens fall into micro-batches.

    total = pg_loss + vf_coef * vf_loss - ent_coef * entropy + ptx_coef * ptx_loss

The policy and critic are separate models with separate AdamW optimizers and
LR schedules; each gets its own global grad-norm clip. A step whose loss or
gradient norm is not finite is skipped (gradients dropped) and counted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from . import dist
from .advantages import loss_agg_weight, minibatch_counts
from .config import Config, OptimConfig
from .data import SFTBatch
from .experience import Experience
from .kernels import linear_ppo_loss, ppo_loss
from .metrics import MetricBuffer, explained_variance
from .models import IGNORE_INDEX, _hidden_states, real_vocab_size, response_logprobs, response_values, sequence_logprobs
from .masked import masked_count
from .packing import (Packing, in_row_order, micro_batches, minibatch_shares, response_targets,
                      varlen_attention)

log = logging.getLogger("fastppo")


# ----------------------------------------------------------------------------
# Optimizers and schedules
# ----------------------------------------------------------------------------

def make_optimizer(model: nn.Module, lr: float, cfg: OptimConfig) -> torch.optim.AdamW:
    # Under FSDP the module exposes its gathered parameters while they are gathered (the root after a
    # forward); the optimizer must hold the shards.
    dist.reshard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warmup over cfg.warmup_steps, then constant / linear / cosine decay to min_lr_ratio at total_steps."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay
    return f


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------

def ptx_loss(policy: nn.Module, batch: SFTBatch, *, fused: bool, backend: str | None, chunk_size: int | None,
             packed: bool = False) -> torch.Tensor:
    """Token-mean LM loss (temperature 1) on the response tokens of an SFT batch (the mean over all ranks' tokens).

    packed: one padding-free forward over the batch's sequences (`packing.Packing`).
    """
    valid = batch.labels != IGNORE_INDEX
    pack = Packing.build(batch.attention_mask, valid, batch.input_ids.device,
                         one_row=varlen_attention(policy)) if packed else None
    logprobs = sequence_logprobs(policy, batch.input_ids, batch.attention_mask, batch.labels, fused=fused,
                                 backend=backend, chunk_size=chunk_size, pack=pack)         # (B, L)
    return -(logprobs * valid).sum() / masked_count(valid, group=dist.group()).clamp(min=1)


def _times(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The product of two optional per-token weights (None = all ones)."""
    return b if a is None else a if b is None else a * b


def fused_policy_loss(policy: nn.Module, micro: Experience, normalizer: torch.Tensor, cfg: Config,
                      pack: Packing | None = None, weight: torch.Tensor | None = None):
    """Clipped surrogate − ent_coef·entropy of one micro-batch, from the policy's hidden states in one pass.

    `linear_ppo_loss` computes the loss and its gradients chunk by chunk in forward: 6·N·H·V lm_head
    FLOP, where response_logprobs + ppo_loss take 8 (the logits are recomputed in backward). Like
    `response_logprobs(fused=True)` it runs as a forward of the root (`dist.run_as_forward`), so that
    under FSDP the full lm_head weight is gathered and its gradient goes back to the shards.
    pack: padding-free (targets `packing.response_targets`): the op sees the response tokens only.
    weight: (B, R) per-token weight of the surrogate (rollout correction × loss aggregation) or None.
    """
    P, pc = micro.prompt_width, cfg.ppo

    def run(model, sequences, attention_mask):
        # Float inputs come in through the closure: FSDP casts a forward's floating-point arguments to its
        # param dtype, and bf16 old logprobs would move every ratio by up to ~3%.
        per_token = (sequences[:, P:], micro.old_logprobs, micro.advantages, micro.response_mask)    # (B, R) each
        token_weight = weight                                                          # (B, R) or None
        if pack is None:
            hidden = _hidden_states(model, sequences, attention_mask)[:, P - 1:-1]    # (B, R, H): state before y_t
        else:                                                                          # (M, H), (M,): response only
            hidden, per_token = _hidden_states(model, sequences, None, pack), [pack.take(x, P - 1) for x in per_token]
            token_weight = None if weight is None else pack.take(weight, P - 1)
        out = linear_ppo_loss(
            hidden, model.get_output_embeddings().weight, *per_token,
            temperature=cfg.rollout.temperature, clip_eps=pc.clip_eps, dual_clip=pc.dual_clip,
            ent_coef=pc.ent_coef, normalizer=normalizer, backend=cfg.run.backend,
            chunk_size=cfg.model.lm_head_chunk_size, vocab_size=real_vocab_size(model), policy_weight=token_weight,
            clip_eps_high=pc.clip_eps_high,
        )
        out = type(out)(*(t.clone() for t in out))      # not views of the op's buffer: FSDP hooks the outputs
        return out if pack is None else out._replace(logprobs=pack.unpack(out.logprobs)[:, P - 1:-1])

    return dist.run_as_forward(policy, run, micro.sequences, micro.attention_mask)


@dataclass
class UpdateCounters:
    """Host-side counters of the optimizer steps, kept across iterations (checkpointed by `train`)."""
    optimizer_steps: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Trained:
    """A model with its optimizer and LR schedule, as one optimizer step sees it."""
    name: str
    """Names its gradient in metrics (grad_norm/<name>) and errors; "" for a stage's one model (grad_norm)."""
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    train: bool = True
    """False: not stepped (its grad norm is reported as 0), e.g. the policy during the critic warm-up."""

    def label(self, what: str) -> str:
        return f"{self.name} {what}" if self.name else what


def optimizer_step(loss: torch.Tensor, trained: list[Trained], *, max_grad_norm: float | None,
                   counters: UpdateCounters, max_nonfinite_in_a_row: int, metrics: MetricBuffer, advice: str) -> bool:
    """Clip each model's gradients (global norm), then the step's one host sync: whether the loss (summed over
    ranks) and every grad norm are finite. Finite: every trained model's optimizer steps, then its LR schedule.
    Not: the step is skipped (gradients dropped, schedules not advanced) and counted; after
    `max_nonfinite_in_a_row` skipped steps in a row, NonFiniteError (one line naming what was non-finite,
    run.max_nonfinite_in_a_row and `advice`: the fields to change). True when the models stepped.
    """
    norms = [dist.grad_norm(t.model, max_grad_norm) if t.train else torch.zeros((), device=loss.device)
             for t in trained]
    # The loss summed over ranks: a non-finite loss on any rank skips the step on all of them.
    check = torch.stack([dist.all_reduce(loss.detach().float()), *(n.float() for n in norms)])
    finite = bool(torch.isfinite(check).all())                                           # host sync (1 per step)
    if finite:
        for t in trained:
            if t.train:
                t.opt.step()
                t.sched.step()
        counters.optimizer_steps += 1
        counters.nonfinite_in_a_row = 0
        metrics.add_dict({"/".join(filter(None, ("grad_norm", t.name))): n for t, n in zip(trained, check[1:])})
    else:
        counters.skipped_steps += 1
        counters.nonfinite_in_a_row += 1
        log.warning("non-finite loss or gradient: optimizer step skipped (%d in a row, run.max_nonfinite_in_a_row=%d)",
                    counters.nonfinite_in_a_row, max_nonfinite_in_a_row)
    for t in trained:
        t.opt.zero_grad(set_to_none=True)
    if counters.nonfinite_in_a_row >= max_nonfinite_in_a_row:
        labels = ["loss", *(t.label("gradient") for t in trained)]
        values = check.tolist()
        what = [n for n, v in zip(labels, values) if not math.isfinite(v)]
        last = ", ".join(f"{name}={v:.4g}" for name, v in
                         zip(["loss", *(t.label("grad norm") for t in trained)], values))
        raise NonFiniteError(
            f"non-finite {' and '.join(what)} in {counters.nonfinite_in_a_row} optimizer steps in a row (last: "
            f"{last}); stopped at run.max_nonfinite_in_a_row={max_nonfinite_in_a_row}. {advice}"
        )
    return finite


def ppo_update(
    exp: Experience,
    *,
    policy: nn.Module,
    critic: nn.Module | None,
    policy_opt: torch.optim.Optimizer,
    critic_opt: torch.optim.Optimizer | None,
    policy_sched,
    critic_sched,
    cfg: Config,
    train_policy: bool,
    fused: bool,
    ptx_batches: Iterator[SFTBatch] | None,
    counters: UpdateCounters,
    metrics: MetricBuffer,
) -> None:
    """Phase 5: ppo_epochs passes of shuffled minibatches over `exp`, one optimizer step per minibatch.

    train_policy=False is the critic warm-up (PPO-max §5.4): the policy is not
    run, its loss terms are zero, and only the critic steps. critic=None (a
    critic-free estimator): no value forward, loss, metric or step.
    """
    pc, oc = cfg.ppo, cfg.optim
    with_critic = critic is not None
    B = len(exp)
    T = cfg.rollout.temperature
    use_ptx = train_policy and ptx_batches is not None and pc.ptx_coef > 0
    # train() matters only for gradient checkpointing: dropout is 0 in every config (models.no_dropout_config).
    policy.train(train_policy)
    if with_critic:
        critic.train()
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
                                  groups=minibatch_shares(orders, pc.minibatch_size), one_row=varlen_attention(policy)))
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
                values = (response_values(critic, micro.sequences, micro.attention_mask, mask,
                                          prompt_width=micro.prompt_width, pack=pack)
                          if with_critic else torch.zeros_like(micro.old_logprobs))
                # The surrogate's per-token weight: rollout correction times the loss aggregation (None: all ones).
                weight = _times(micro.policy_weight,
                                loss_agg_weight(mask, mode=pc.loss_agg, n_tokens=normalizer, n_seqs=n_seqs,
                                                max_new_tokens=cfg.rollout.max_new_tokens))
                policy_out = None
                if train_policy and fused and pc.fused_policy_loss:
                    policy_out = fused_policy_loss(policy, micro, normalizer, cfg, pack, weight)
                    logprobs = policy_out.logprobs                  # detached: ppo_loss below only trains the critic
                elif train_policy:
                    lp = response_logprobs(policy, micro.sequences, micro.attention_mask, mask, prompt_width=micro.prompt_width,
                                           temperature=T, return_entropy=True, fused=fused, backend=cfg.run.backend,
                                           chunk_size=cfg.model.lm_head_chunk_size, pack=pack)
                    logprobs, entropy = lp.logprobs, lp.entropy
                else:
                    logprobs, entropy = micro.old_logprobs, torch.zeros_like(micro.old_logprobs)
                out = ppo_loss(
                    logprobs, micro.old_logprobs, micro.advantages, values, micro.old_values, micro.returns, mask,
                    clip_eps=pc.clip_eps, value_clip=pc.value_clip if with_critic else None,
                    vf_coef=pc.vf_coef if with_critic else 0.0, dual_clip=pc.dual_clip,
                    normalizer=normalizer, backend=cfg.run.backend, clip_eps_high=pc.clip_eps_high,
                    policy_weight=weight,
                )
                if policy_out is not None:
                    # The policy statistics of `out` are those of policy_out (same logprobs, same formulas).
                    entropy_mean = policy_out.entropy
                    loss = policy_out.loss + pc.vf_coef * out.value_loss if with_critic else policy_out.loss
                else:
                    entropy_mean = (entropy * mask).sum() / normalizer
                    # Without an entropy bonus the entropy is a metric only: keep it out of the backward pass.
                    loss = out.loss - pc.ent_coef * entropy_mean if pc.ent_coef > 0 else out.loss
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
                if with_critic:
                    terms += [("loss/value", out.value_loss), ("values/clipfrac", out.value_clipfrac)]
                for k, v in terms:
                    minibatch_sums[k] = minibatch_sums.get(k, 0.0) + v.detach()
                minibatch_values.append(values.detach())
                minibatch_rows.append(planned.rows)
            metrics.add_dict(dist.all_reduce_dict(minibatch_sums))                      # this rank's share -> global
            if with_critic:
                # Over the whole minibatch (all ranks), so it does not depend on how it is split into micro-batches.
                metrics.add("values/explained_variance",
                            explained_variance(in_row_order(minibatch_rows, minibatch_values), minibatch.returns,
                                               minibatch.response_mask))
            if use_ptx:
                ptx = pc.ptx_coef * ptx_loss(policy, next(ptx_batches), fused=fused, backend=cfg.run.backend,
                                             chunk_size=cfg.model.lm_head_chunk_size, packed=pc.packing)
                ptx.backward()
                losses.append(ptx.detach())
                metrics.add("loss/ptx", dist.all_reduce(ptx.detach()) / pc.ptx_coef)

            trained = [Trained("policy", policy, policy_opt, policy_sched, train=train_policy)]
            if with_critic:
                trained.append(Trained("critic", critic, critic_opt, critic_sched))
            optimizer_step(
                torch.stack(losses).sum(), trained,
                max_grad_norm=oc.max_grad_norm, counters=counters,
                max_nonfinite_in_a_row=cfg.run.max_nonfinite_in_a_row, metrics=metrics,
                advice="Lower optim.policy_lr / optim.critic_lr, set optim.max_grad_norm, or check the reward model's "
                       "scores (reward.reward_clip).")
    policy.eval()
    if with_critic:
        critic.eval()
