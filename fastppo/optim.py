"""Optimizers, LR schedules and the one optimizer step, shared by the PPO update and the stages (sft, train-rm).

Each trained model (policy, critic; a stage's one model) has its own AdamW and schedule and its own global
gradient-norm clip. A step whose loss (summed over ranks) or gradient norm is not finite is skipped
(gradients dropped, schedules not advanced) and counted; too many in a row stop the run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from . import dist, parallel
from .config import BaseOptimConfig
from .metrics import MetricBuffer

log = logging.getLogger("fastppo")


def make_optimizer(model: nn.Module, lr: float, cfg: BaseOptimConfig) -> torch.optim.AdamW:
    # Under FSDP the module exposes its gathered parameters while they are gathered (the root after a
    # forward); the optimizer must hold the shards.
    parallel.reshard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: BaseOptimConfig, total_steps: int):
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


def make_scheduler(opt: torch.optim.Optimizer, cfg: BaseOptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))


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
    norms = [grad_norm(t.model, max_grad_norm) if t.train else torch.zeros((), device=loss.device)
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
def grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of the model's gradients (all shards), clipped to max_norm when given."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):
        total = total.full_tensor()                                      # reduces the per-shard partial norms
    if max_norm is not None:
        # clip_grads_with_norm_ takes the parameters and scales their .grad: given the gradient tensors
        # themselves it finds no .grad on them and silently clips nothing.
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
