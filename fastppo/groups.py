"""Phase 1 of an iteration: prompts, G responses to each, and their outcome scores.

    sample_groups    this rank's share of rollout.rollout_batch_size prompts, rollout.n_samples_per_prompt responses
                     to each (the engine), their outcome scores; with rollout.dynamic_sampling, groups without signal
                     redrawn (DAPO, Yu et al. 2025)
    OutcomeScorer    the raw outcome score of a response: the reward model at EOS plus the reward functions
    outcome_scores   the reward model's part, the functions' sum added, rows non-finite in float32 flagged

A group is the G consecutive rows sampled from one prompt; groups stay whole on one rank. Sampling noise is
fixed per (seed, iteration, sample id), so one process and N processes draw the same responses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import dist
from .config import RolloutConfig
from .data import EpochSampler, PromptBatch, collate_prompts
from .engine import Engine
from .envs import EnvRunner
from .models import Forward, ModelError, score_at
from .packing import in_row_order, index_targets, micro_batches, nonfinite_rows, padded_again, varlen_attention
from .rewards import FunctionScores, RewardFunctions, decode_rollout
from .rollout import Rollout, cat_rollouts, sampling_seed, with_eos_for_scoring

log = logging.getLogger("fastppo")


@torch.no_grad()
def outcome_scores(reward: nn.Module | None, tokenizer, rollout: Rollout, fwd: Forward, *, rows: int,
                   tokens: int | None = None, function_scores: torch.Tensor | None = None,
                   reward_path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw outcome score of each response: the reward model's at EOS (micro-batches of `rows` rows, or of
    `tokens` tokens, packed as `fwd` says), plus `function_scores` (B,), the reward functions' weighted sum
    (`fastppo.rewards`); either may be absent. reward_path names the reward model in errors.

    Returns (scores, nonfinite), (B,) float32 and bool. A score that is NaN or infinite in float32 (one odd
    response can overflow a half-precision reward model; reward functions' weighted sum can overflow float32)
    is set to 0 and flagged in `nonfinite`; `drop_rows` then takes those rows out of the update. Every row of
    the global batch non-finite from the reward model means the reward model itself is broken: that stops the run.
    """
    B = len(rollout.sequences)
    rm_scores = torch.zeros(B, device=rollout.sequences.device)
    packed = False
    if reward is not None:
        rm_ids, rm_mask, eos_index = with_eos_for_scoring(rollout, eos_id=tokenizer.eos_token_id,
                                                          pad_id=tokenizer.pad_token_id)
        (every_row,) = micro_batches([(rm_mask, index_targets(eos_index, rm_mask.size(1)))], rows=rows,
                                     tokens=tokens, packed=fwd.packed, one_row=varlen_attention(reward))
        done, parts = [], []
        for micro in every_row.micro:
            (pack,), mine = micro.packs, micro.rows
            score = score_at(reward, rm_ids[mine], rm_mask[mine], eos_index[mine], pack=pack)
            if not micro.dummy:                          # a dummy only keeps FSDP's collectives in step
                done.append(mine)
                parts.append(score)
        rm_scores = in_row_order(done, parts).float()
        packed = fwd.packed
    n_rm_bad = int(dist.all_reduce(nonfinite_rows(rm_scores).sum().float()))      # one host sync, to say which rows
    if n_rm_bad and packed:
        padded_again(nonfinite_rows(rm_scores), rows,
                     lambda bad: [score_at(reward, rm_ids[bad], rm_mask[bad], eos_index[bad]).float()], [rm_scores])
        n_rm_bad = int(dist.all_reduce(nonfinite_rows(rm_scores).sum().float()))
    rm_bad = nonfinite_rows(rm_scores)
    scores = torch.where(rm_bad, 0.0, rm_scores)
    if function_scores is not None:
        scores = scores + function_scores.to(scores.device, torch.float32)
    nonfinite = rm_bad | nonfinite_rows(scores)
    n_bad = n_rm_bad if function_scores is None else int(dist.all_reduce(nonfinite.sum().float()))
    if n_bad:
        bad = nonfinite.nonzero().flatten().tolist()
        where = f"rank {dist.rank()} " if dist.world_size() > 1 else ""
        if n_rm_bad == dist.world_size() * B:
            raise ModelError(f"the reward model at {reward_path} scored every response of the batch NaN "
                             f"or infinite (e.g. {rm_scores[0].item()}): check its weights and model.dtype")
        source = "the reward model" if function_scores is None else "the reward model and functions"
        log.warning("%s scored %srows %s NaN/inf in float32: they are dropped from this update", source, where,
                    bad[:16])
    return torch.where(nonfinite_rows(scores), 0.0, scores), nonfinite


class OutcomeScorer:
    """The raw outcome scores of rollouts (`outcome_scores`: the reward model at EOS + the reward functions on
    the decoded prompt and response with the prompt's record), and the functions' statistics of an iteration
    (`function_metrics`)."""

    def __init__(self, reward: nn.Module | None, tokenizer, reward_fns: RewardFunctions, records: list[dict],
                 fwd: Forward, *, rows: int, tokens: int | None, reward_path: str | None) -> None:
        self.reward, self.tokenizer, self.reward_fns, self.records = reward, tokenizer, reward_fns, records
        self.fwd, self.rows, self.tokens, self.reward_path = fwd, rows, tokens, reward_path
        self.stats: list[FunctionScores] = []

    def __call__(self, rollout: Rollout, prompt_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, nonfinite) of the rollout whose rows answer the prompts `prompt_rows` (indices into the data).
        With an environment the score also holds the sum of its step rewards."""
        fn_scores = None
        if self.reward_fns:
            prompt_texts, response_texts = decode_rollout(self.tokenizer, rollout)
            res = self.reward_fns.score(prompt_texts, response_texts, [self.records[i] for i in prompt_rows],
                                        prompt_rows)
            self.stats.append(res)
            fn_scores = torch.tensor(res.totals)
        if rollout.step_rewards is not None:
            steps = rollout.step_rewards.sum(-1).cpu()
            fn_scores = steps if fn_scores is None else fn_scores + steps
        return outcome_scores(self.reward, self.tokenizer, rollout, self.fwd, rows=self.rows, tokens=self.tokens,
                              function_scores=fn_scores, reward_path=self.reward_path)

    def function_metrics(self, device: torch.device) -> dict[str, torch.Tensor]:
        """reward_fn/<name>/mean and the invalid / timeout / error counts of the calls since the last call, over all
        ranks and generation rounds."""
        stats, self.stats = self.stats, []
        if not stats:
            return {}
        n = sum(len(r.totals) for r in stats)
        values = {f"reward_fn/{name}/sum": sum(r.means[name] * len(r.totals) for r in stats) for name in stats[0].means}
        values.update({f"reward_fn/{k}": float(sum(getattr(r, k) for r in stats)) for k in ("invalid", "timeouts", "errors")})
        values["n"] = float(n)
        keys = list(values)
        total = dict(zip(keys, dist.all_reduce(torch.tensor([values[k] for k in keys], device=device)).unbind()))
        out = {k.replace("/sum", "/mean"): v / total["n"] for k, v in total.items() if k.endswith("/sum")}
        out.update({k: v for k, v in total.items() if not k.endswith("/sum") and k != "n"})
        return out


@dataclass
class Prompts:
    """Where phase 1 draws its prompts: the tokenised prompts (`data.load_prompts`; None with an environment, whose
    reset gives each first turn) and the resumable sampler; with an environment, its trajectories' runner."""
    ids: list[list[int]] | None
    sampler: EpochSampler
    env: EnvRunner | None = None


@dataclass
class Sampled:
    """Phase 1 on this rank: whole groups of rollout.n_samples_per_prompt consecutive rows (B rows)."""
    rollout: Rollout
    scores: torch.Tensor
    """(B,) float32 raw outcome scores: reward model + reward functions (0 where non-finite)."""
    nonfinite: torch.Tensor
    """(B,) bool rows whose outcome score was NaN or infinite in float32."""
    valid: torch.Tensor
    """(B,) bool rows that enter the update: a finite score, and not a group padding a short dynamic-sampling batch."""
    metrics: dict


def _generate_groups(engine: Engine, prompts: Prompts, indices: list[int], *, G: int, pad_id: int, seed: int,
                     first_id: int) -> tuple[Rollout, list[int]]:
    """G responses to each of this rank's prompts among `indices` (the global draw, the same on all ranks): the
    rank's share is whole groups. Sampling noise is fixed per (seed, sample id); sample ids number the rows of
    the iteration's draws from `first_id` on. Returns the rollout and each row's prompt index."""
    world, rank = dist.world_size(), dist.rank()
    rows = [i for i in indices for _ in range(G)]                      # global rows, each group contiguous
    n = len(rows) // world
    mine = slice(rank * n, (rank + 1) * n)
    sample_ids = torch.arange(first_id + mine.start, first_id + mine.stop)
    # The engine samples from the current weights (FSDP: the policy all-gathered once, not per token).
    with engine.policy_loaded():
        if prompts.env is not None:                                    # trajectories, turn by turn
            return prompts.env.run(engine, rows[mine], seed=seed, sample_ids=sample_ids), rows[mine]
        # Collated together, so that every rank has the same prompt width.
        batch = collate_prompts([prompts.ids[i] for i in rows], pad_id)
        batch = PromptBatch(batch.input_ids[mine], batch.attention_mask[mine])
        return engine.generate(batch, seed=seed, sample_ids=sample_ids), rows[mine]


def _phase_metrics(scorer: OutcomeScorer, prompts: Prompts, device) -> dict[str, torch.Tensor]:
    """The reward functions' and the environment's metrics of the iteration's generation rounds."""
    return {**scorer.function_metrics(device), **({} if prompts.env is None else prompts.env.metrics(device))}


def _group_rows(rollout: Rollout, scores: torch.Tensor, nonfinite: torch.Tensor, groups: torch.Tensor, G: int):
    """Rows of `groups` (k,) int64: (Rollout, scores, nonfinite) of k * G rows."""
    idx = (groups[:, None] * G + torch.arange(G, device=groups.device)).flatten()
    return rollout.take(idx), scores[idx], nonfinite[idx]


def sample_groups(rc: RolloutConfig, prompts: Prompts, engine: Engine, scorer: OutcomeScorer, *, seed: int,
                  iteration: int, pad_id: int, device: torch.device) -> Sampled:
    """Phase 1: rc.rollout_batch_size / world_size prompts on this rank, G = rc.n_samples_per_prompt responses
    each, sampled with noise fixed per (seed, iteration, sample id), with their outcome scores.

    Dynamic sampling (DAPO, Yu et al. 2025): a group whose valid rewards are all equal carries no signal; such
    groups are dropped and more prompts drawn (all ranks draw together, as many as the neediest rank misses)
    until every rank has its groups, for at most rc.dynamic_sampling_max_tries rounds. A batch still short
    then is filled with dropped groups of the last round whose rows are not valid: they are masked out of the
    update, so the run trains on the groups it found (logged as rollout/groups_short) and never loops forever.
    """
    G, world = rc.n_samples_per_prompt, dist.world_size()
    draw = dict(G=G, pad_id=pad_id, seed=sampling_seed(seed, iteration))
    if not rc.dynamic_sampling:
        rollout, rows = _generate_groups(engine, prompts, prompts.sampler.next(rc.rollout_batch_size), first_id=0,
                                         **draw)
        # Prompts and responses padded to the widest on any rank: the ranks' experience rows then line up.
        local = torch.tensor([rollout.prompt_width, rollout.response_mask.size(1)], device=device)
        width_p, width_r = dist.all_reduce(local, "max").tolist()
        rollout = cat_rollouts([rollout], pad_id, prompt_width=width_p, response_width=width_r)
        scores, nonfinite = scorer(rollout, rows)
        return Sampled(rollout, scores, nonfinite, ~nonfinite, _phase_metrics(scorer, prompts, device))
    need = rc.rollout_batch_size // world                               # groups on each rank
    parts, n_kept, tries, first_id, dropped, last = [], 0, 0, 0, 0, None
    while tries < rc.dynamic_sampling_max_tries:
        missing = need - n_kept
        m = int(dist.all_reduce(torch.tensor(missing, device=device), "max"))    # host sync: one draw for all ranks
        if m == 0:
            break
        rollout, rows = _generate_groups(engine, prompts, prompts.sampler.next(m * world), first_id=first_id, **draw)
        first_id, tries = first_id + m * world * G, tries + 1
        scores, nonfinite = scorer(rollout, rows)
        signal = signal_groups(scores, ~nonfinite, G)                             # (m,)
        dropped += int((~signal).sum())
        take = signal.nonzero().flatten()[:missing]
        parts.append((*_group_rows(rollout, scores, nonfinite, take, G), True))
        n_kept += len(take)
        last = (rollout, scores, nonfinite, (~signal).nonzero().flatten())
    short = need - n_kept
    if short:
        rollout, scores, nonfinite, no_signal = last
        parts.append((*_group_rows(rollout, scores, nonfinite, no_signal[:short], G), False))
    # One rollout whose prompt and response widths are the widest on any rank (the rows of all ranks line up).
    widths = dist.all_reduce(torch.tensor([max(p[0].prompt_width for p in parts),
                                           max(p[0].response_mask.size(1) for p in parts)], device=device), "max")
    rollout = cat_rollouts([p[0] for p in parts], pad_id, prompt_width=int(widths[0]), response_width=int(widths[1]))
    scores, nonfinite = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    kept = torch.cat([torch.full_like(p[2], p[3]) for p in parts])
    counts = dist.all_reduce(torch.tensor([float(dropped), float(short)], device=device))
    metrics = {"rollout/sampling_tries": float(tries), "rollout/groups_dropped": counts[0],
               "rollout/groups_short": counts[1], **_phase_metrics(scorer, prompts, device)}
    return Sampled(rollout, scores, nonfinite, kept & ~nonfinite, metrics)


def signal_groups(scores: torch.Tensor, valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B/G,) bool: groups whose valid rows' rewards are not all equal (at least two valid rows). A group of equal
    rewards has advantage 0 under every group estimator: it carries no signal (DAPO's dynamic sampling drops it)."""
    s, v = scores.view(-1, group_size), valid.view(-1, group_size)                 # (B/G, G)
    hi = torch.where(v, s, -torch.inf).amax(-1)
    lo = torch.where(v, s, torch.inf).amin(-1)
    return (v.sum(-1) >= 2) & (hi > lo)
