"""Fixtures shared by the trainer tests: tiny model setups built once per session."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from .tiny_models import make_tiny_setup


@pytest.fixture(scope="session")
def tiny_setups(tmp_path_factory):
    """arch -> TinySetup, built lazily and cached for the session."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_tiny_setup(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return cache[arch]

    return get


@pytest.fixture
def logged():
    """The messages ("LEVEL message") of the `fastppo` logger during the test, INFO and up (a handler of its own: the
    logger stops propagating once a run has set up its logging)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname} {record.getMessage()}")

    logger, handler = logging.getLogger("fastppo"), Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------
# The trainer's phases called as `train` calls them, from a whole Config (tests build their batches by hand)
# ----------------------------------------------------------------------------

def forward_for(cfg, models, fused: bool | None = None):
    """The `models.Forward` `train` builds for this config and these models (fused: override the lm_head path)."""
    from fastppo.models import Forward

    return Forward(temperature=cfg.rollout.temperature, packed=cfg.ppo.packing, backend=cfg.run.backend,
                   chunk_size=cfg.model.lm_head_chunk_size,
                   fused=getattr(models, "fused_lm_head", True) if fused is None else fused,
                   vocab_size=getattr(models, "vocab_size", None))


def outcomes_for(models, rollout, cfg, *, batch_size: int, function_scores=None):
    """Phase 1's outcome scores (scores, nonfinite) of a rollout: the reward model at EOS (+ function scores)."""
    from fastppo.groups import outcome_scores

    return outcome_scores(models.reward, models.tokenizer, rollout, forward_for(cfg, models), rows=batch_size,
                          tokens=cfg.rollout.forward_batch_tokens, function_scores=function_scores,
                          reward_path=cfg.model.reward_path)


def score(models, rollout, cfg, *, batch_size: int, fused: bool | None = None, outcomes=None):
    """Phase 2 (`experience.score_rollout`) with the outcome scores of phase 1 (computed here unless given)."""
    from fastppo.experience import score_rollout

    if outcomes is None:
        outcomes = outcomes_for(models, rollout, cfg, batch_size=batch_size)
    return score_rollout(models, rollout, forward_for(cfg, models, fused), outcomes=outcomes,
                         old_logprobs=cfg.rollout.old_logprobs, rows=batch_size, tokens=cfg.rollout.forward_batch_tokens)


def update(exp, *, policy, critic, policy_opt, critic_opt, policy_sched, critic_sched, cfg, train_policy: bool = True,
           fused: bool = True, ptx_batches=None, counters, metrics) -> None:
    """Phase 5 (`update.ppo_update`) as `train` calls it for this config."""
    from fastppo.models import Forward
    from fastppo.optim import Trained
    from fastppo.update import ppo_update

    fwd = Forward(temperature=cfg.rollout.temperature, packed=cfg.ppo.packing, backend=cfg.run.backend,
                  chunk_size=cfg.model.lm_head_chunk_size, fused=fused)
    ppo_update(exp, Trained("policy", policy, policy_opt, policy_sched, train=train_policy),
               None if critic is None else Trained("critic", critic, critic_opt, critic_sched), cfg.ppo, fwd,
               max_grad_norm=cfg.optim.max_grad_norm, max_new_tokens=cfg.rollout.max_new_tokens,
               max_nonfinite_in_a_row=cfg.run.max_nonfinite_in_a_row, ptx_batches=ptx_batches, counters=counters,
               metrics=metrics)


def nan_value_loss(ppo_loss):
    """`ppo_loss` whose value loss (and total) comes out NaN, gradients kept: every update step goes non-finite."""
    def wrapped(*args, **kwargs):
        out = ppo_loss(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"), value_loss=out.value_loss * float("nan"))
    return wrapped
