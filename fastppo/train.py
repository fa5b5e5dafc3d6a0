"""`fastppo train`: the PPO-max loop (Zheng et al. 2023), top to bottom.

    setup: config, models, data, optimizers, (resume)
    for iteration:
        1 rollout      sample prompts, generate G responses each, outcome scores (reward model, reward functions);
                       dynamic sampling repeats this for groups without signal
        2 score        old logprobs + entropy, ref logprobs, values (with a critic)
        3 shape        score reparameterisation, token-level KL penalty
        4 advantages   GAE, optional whitening/clipping; or a critic-free estimator (grpo, rloo, reinforce_pp)
        5 update       PPO epochs x minibatches x micro-batches
        6 log          one host sync: metrics to JSONL, TensorBoard, progress bar
        7 checkpoint   every save_every iterations, at the end, and on SIGTERM/Ctrl-C
    export the policy as a Hugging Face directory

The same code runs in one process and under torchrun (`dist.setup` joins the
process group from torchrun's environment). With N processes every model is
sharded (FSDP2) and each rank generates and scores rollout_batch_size / N
rollouts of the global batch (prompts drawn by one sampler, identical on all
ranks; sampling noise fixed per sample, `rollout.CounterSampler`); the scored
experience is then exchanged (`gather_experience`) so that all ranks draw the
same minibatches and each trains on its share. Every statistic is global.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import dist
from . import run_dir as rundir
from .checkpoint import export_hf, load_checkpoint, resume_point, save_checkpoint, set_rng_state
from .advantages import critic_free_advantages, outcome_rewards, signal_groups
from .config import (Config, ConfigError, Derived, derived, from_dict, load_config, to_yaml, uses_critic, validate,
                     validate_world)
from .data import EpochSampler, PromptBatch, SFTBatch, collate_prompts, collate_sft, load_prompts, load_sft
from .experience import (Experience, compute_advantages, drop_rows, experience_metrics, gather_experience,
                         AdaptiveKLController, kl_controller, outcome_scores, reparameterise_scores, rollout_correction,
                         score_rollout, token_rewards)
from .engine import Engine, HFEngine
from .logs import seed_everything, setup_logging
from .memory import peak_memory_mb
from .metrics import MetricBuffer, MetricWriter, RunningMoments
from .models import Models, _dtype, load_models
from .ppo import UpdateCounters, make_optimizer, make_scheduler, ppo_update
from .rewards import RewardFunctions, decode_rollout
from .rollout import Rollout, cat_rollouts, pad_responses, sampling_seed
from .sft import progress

log = logging.getLogger("fastppo")


@dataclass
class TrainResult:
    run_dir: Path
    """The run directory."""
    iterations_done: int
    """Iterations completed (including those before a resume)."""
    metrics: dict
    """The last iteration's logged metrics."""
    checkpoint: Path | None
    """The last checkpoint written."""
    export: Path | None
    """The exported policy directory (None when not exported)."""
    interrupted: bool
    """True when SIGTERM/SIGINT stopped the run early."""


# ----------------------------------------------------------------------------
# Small helpers the loop uses
# ----------------------------------------------------------------------------

class GracefulStop:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next safe point and exits.

    A second SIGINT raises KeyboardInterrupt at once, with a one-line message (`fastppo.cli` prints it and
    exits 130). Checkpoints are written to a temporary directory and renamed when complete, so stopping in
    the middle of a save leaves the previous checkpoints intact.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("stopped at once by a second Ctrl-C, without saving this iteration; "
                                    "the last checkpoint is intact: resume from it with --resume")
        self.requested = name
        log.warning("%s received: will save a checkpoint after this iteration and exit", name)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class PhaseTimer:
    """Wall time per phase (synchronising CUDA so the time lands in the right phase)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def sft_batches(examples, sampler: EpochSampler, batch_size: int, pad_id: int, device) -> Iterator[SFTBatch]:
    """Endless ptx batches; the sampler's state is what a checkpoint records.

    Each draw takes batch_size x world_size examples (the same on every rank)
    and keeps this rank's batch_size of them.
    """
    r = dist.rank()
    while True:
        drawn = sampler.next(batch_size * dist.world_size())
        b = collate_sft([examples[i] for i in drawn[r * batch_size:(r + 1) * batch_size]], pad_id)
        yield SFTBatch(*(t.to(device) for t in (b.input_ids, b.attention_mask, b.labels)))


@dataclass
class TrainState:
    """Everything the loop carries across iterations besides weights, optimizers and RNG (`checkpoint` saves
    those). Saved and loaded here alone, field by field under the field's name: a new field is resumed
    without another line."""
    policy_sched: torch.optim.lr_scheduler.LRScheduler
    critic_sched: torch.optim.lr_scheduler.LRScheduler | None
    """None without a critic (a critic-free estimator)."""
    reward_moments: RunningMoments
    kl_controller: AdaptiveKLController
    counters: UpdateCounters
    sampler: EpochSampler
    """The prompt sampler."""
    ptx_sampler: EpochSampler | None
    """The ptx data sampler (None without data.ptx_path)."""

    def state_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = value.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Load in place; a field the checkpoint lacks or saved as None (ptx off then) keeps its fresh state."""
        for f in dataclasses.fields(self):
            value, saved = getattr(self, f.name), state.get(f.name)
            if value is None or saved is None:
                continue
            if dataclasses.is_dataclass(value):
                vars(value).update(vars(type(value)(**saved)))       # in place: the loop holds this object
            else:
                value.load_state_dict(saved)


@dataclass
class Setup:
    """What `_train` builds before the loop."""
    models: Models
    prompts: list[list[int]]
    """Tokenised prompts (`data.load_prompts`)."""
    records: list[dict]
    """Each prompt's data row, for the reward functions."""
    reward_fns: RewardFunctions
    """reward.functions and their worker pool (falsy when there are none)."""
    engine: Engine
    """Generation (`fastppo.engine`): the policy's HF generate, or an external engine."""
    ptx_batches: Iterator[SFTBatch] | None
    """Endless ptx batches (None without data.ptx_path)."""
    policy_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer | None
    state: TrainState


# ----------------------------------------------------------------------------
# Phase 1: groups of responses and their outcome scores
# ----------------------------------------------------------------------------

@dataclass
class Sampled:
    """Phase 1 on this rank: whole groups of rollout.n_samples_per_prompt consecutive rows (B rows)."""
    rollout: Rollout
    scores: torch.Tensor
    """(B,) float32 raw outcome scores: reward model + reward functions (0 where the reward model gave NaN/inf)."""
    nonfinite: torch.Tensor
    """(B,) bool rows whose reward-model score was NaN or infinite."""
    valid: torch.Tensor
    """(B,) bool rows that enter the update: a finite score, and not a group padding a short dynamic-sampling batch."""
    metrics: dict


def _generate_groups(su: Setup, cfg: Config, it: int, indices: list[int],
                     first_id: int) -> tuple[Rollout, list[int]]:
    """G responses to each of this rank's prompts among `indices` (the global draw, the same on all ranks): the
    rank's share is whole groups. Sampling noise is fixed per (seed, iteration, sample id); sample ids number the
    rows of the iteration's draws from `first_id` on. Returns the rollout and each row's prompt index."""
    G, world, rank = cfg.rollout.n_samples_per_prompt, dist.world_size(), dist.rank()
    models, tok = su.models, su.models.tokenizer
    rows = [i for i in indices for _ in range(G)]                      # global rows, each group contiguous
    # Collated together, so that every rank has the same prompt width.
    batch = collate_prompts([su.prompts[i] for i in rows], tok.pad_token_id)
    n = len(rows) // world
    mine = slice(rank * n, (rank + 1) * n)
    batch = PromptBatch(batch.input_ids[mine], batch.attention_mask[mine])
    # The engine samples from the current weights (FSDP: the policy all-gathered once, not per token).
    with su.engine.policy_loaded():
        rollout = su.engine.generate(batch, seed=sampling_seed(cfg.run.seed, it),
                                     sample_ids=torch.arange(first_id + mine.start, first_id + mine.stop))
    return rollout, rows[mine]


def _outcomes(su: Setup, cfg: Config, d: Derived, rollout: Rollout, rows: list[int],
              fn_stats: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw outcome scores (scores, nonfinite) of a rollout: reward functions (stats appended to fn_stats) + reward model."""
    fn_scores = None
    if su.reward_fns:
        prompt_texts, response_texts = decode_rollout(su.models.tokenizer, rollout)
        res = su.reward_fns.score(prompt_texts, response_texts, [su.records[i] for i in rows], rows)
        fn_stats.append(res)
        fn_scores = torch.tensor(res.totals)
    return outcome_scores(su.models, rollout, cfg, batch_size=d.forward_batch_size, function_scores=fn_scores)


def _group_rows(rollout: Rollout, scores: torch.Tensor, nonfinite: torch.Tensor, groups: torch.Tensor, G: int):
    """Rows of `groups` (k,) int64: (Rollout, scores, nonfinite) of k * G rows."""
    idx = (groups[:, None] * G + torch.arange(G, device=groups.device)).flatten()
    return rollout.take(idx), scores[idx], nonfinite[idx]


def _function_metrics(fn_stats: list, device: torch.device) -> dict[str, torch.Tensor]:
    """reward_fn/<name>/mean and the invalid / timeout / error counts, over all ranks and rounds."""
    if not fn_stats:
        return {}
    n = sum(len(r.totals) for r in fn_stats)
    values = {f"reward_fn/{name}/sum": sum(r.means[name] * len(r.totals) for r in fn_stats) for name in fn_stats[0].means}
    values.update({f"reward_fn/{k}": float(sum(getattr(r, k) for r in fn_stats)) for k in ("invalid", "timeouts", "errors")})
    values["n"] = float(n)
    keys = list(values)
    total = dict(zip(keys, dist.all_reduce(torch.tensor([values[k] for k in keys], device=device)).unbind()))
    out = {k.replace("/sum", "/mean"): v / total["n"] for k, v in total.items() if k.endswith("/sum")}
    out.update({k: v for k, v in total.items() if not k.endswith("/sum") and k != "n"})
    return out


def sample_groups(su: Setup, cfg: Config, d: Derived, it: int, device: torch.device) -> Sampled:
    """Phase 1: rollout_batch_size / world_size prompts on this rank, G responses each, with outcome scores.

    Dynamic sampling (DAPO, Yu et al. 2025): a group whose valid rewards are all equal carries no signal; such
    groups are dropped and more prompts drawn (all ranks draw together, as many as the neediest rank misses)
    until every rank has its groups, for at most rollout.dynamic_sampling_max_tries rounds. A batch still short
    then is filled with dropped groups of the last round whose rows are not valid: they are masked out of the
    update, so the run trains on the groups it found (logged as rollout/groups_short) and never loops forever.
    """
    rc, G, world = cfg.rollout, cfg.rollout.n_samples_per_prompt, dist.world_size()
    pad_id, sampler, fn_stats = su.models.tokenizer.pad_token_id, su.state.sampler, []
    if not rc.dynamic_sampling:
        rollout, rows = _generate_groups(su, cfg, it, sampler.next(rc.rollout_batch_size), 0)
        # Responses padded to the widest on any rank: the ranks' experience rows then line up.
        width = dist.all_reduce(torch.tensor(rollout.response_mask.size(1), device=device), "max")
        rollout = pad_responses(rollout, int(width), pad_id)
        scores, nonfinite = _outcomes(su, cfg, d, rollout, rows, fn_stats)
        return Sampled(rollout, scores, nonfinite, ~nonfinite, _function_metrics(fn_stats, device))
    need, parts, n_kept, tries, first_id, dropped, last = d.groups_per_rank, [], 0, 0, 0, 0, None
    while tries < rc.dynamic_sampling_max_tries:
        missing = need - n_kept
        m = int(dist.all_reduce(torch.tensor(missing, device=device), "max"))    # host sync: one draw for all ranks
        if m == 0:
            break
        rollout, rows = _generate_groups(su, cfg, it, sampler.next(m * world), first_id)
        first_id, tries = first_id + m * world * G, tries + 1
        scores, nonfinite = _outcomes(su, cfg, d, rollout, rows, fn_stats)
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
               "rollout/groups_short": counts[1], **_function_metrics(fn_stats, device)}
    return Sampled(rollout, scores, nonfinite, kept & ~nonfinite, metrics)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

def train(config: Config | dict | str | Path) -> TrainResult:
    """Run PPO-max. `config` is a Config, a nested dict, or a YAML path.

    Under torchrun every rank calls this; it joins (and at the end leaves)
    the process group unless the caller already made one.
    """
    if isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = from_dict(config)
    elif isinstance(config, Config):
        cfg = config
        validate(cfg)
    else:
        raise ConfigError(f"train() takes a Config, dict or YAML path, got {type(config).__name__}")
    device = dist.resolve_device(cfg.run.device)
    pc = cfg.parallel
    created = dist.setup(pc.shard, pc.backend, pc.timeout_s, device)
    try:
        mc, export = cfg.model, Path(cfg.run.output_dir) / "export" / "policy"
        with dist.collective_errors("training"), rundir.claim(
                cfg.run.output_dir, device=device, export=export if cfg.run.export_at_end else None,
                reads={"model.policy_path": mc.policy_path, "model.reward_path": mc.reward_path,
                       "model.critic_path": mc.critic_path}):
            return _train(cfg, device)
    finally:
        if created:
            dist.teardown()


def _compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """parallel.param_dtype: auto = bfloat16 on CUDA, the storage dtype (no cast) on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _dtype(name)


def _setup(cfg: Config, device: torch.device, d: Derived) -> Setup:
    """Models (sharded or autocast), prompt and ptx data, optimizers, schedulers and the fresh train state."""
    # Precision: model.dtype master weights (and optimizer state), parallel.param_dtype compute: FSDP2's
    # MixedPrecisionPolicy when sharded (on CUDA also in one process), else autocast around the blocks.
    prepare = dist.parallelize(cfg.parallel, device, _compute_dtype(cfg.parallel.param_dtype, device))
    reward_fns = RewardFunctions(cfg.reward)                   # imports the functions: fails before any model loads
    models = load_models(cfg.model, device, shard=prepare, with_critic=uses_critic(cfg))
    tok = models.tokenizer
    records: list[dict] = []
    prompts = load_prompts(cfg.data.prompt_path, tok, field=cfg.data.prompt_field,
                           prompt_format=cfg.data.prompt_format, max_len=cfg.data.max_prompt_len, records=records,
                           max_unknown_frac=cfg.data.max_unknown_token_frac)
    sampler = EpochSampler(len(prompts), seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    ptx_sampler, ptx_iter = None, None
    if cfg.data.ptx_path:
        if cfg.ppo.ptx_coef == 0:
            log.warning("data.ptx_path is set but ppo.ptx_coef is 0: the ptx loss is off")
        ptx_examples = load_sft(cfg.data.ptx_path, tok, prompt_field=cfg.data.ptx_prompt_field,
                                response_field=cfg.data.ptx_response_field,
                                messages_field=cfg.data.ptx_messages_field, max_len=cfg.data.max_ptx_len,
                                keys=("data.ptx_prompt_field", "data.ptx_response_field", "data.ptx_messages_field"),
                                max_unknown_frac=cfg.data.max_unknown_token_frac)
        ptx_sampler = EpochSampler(len(ptx_examples), seed=cfg.run.seed + 1, shuffle=True)
        ptx_iter = sft_batches(ptx_examples, ptx_sampler, cfg.ppo.micro_batch_size, tok.pad_token_id, device)
    log.info("%d prompts from %s", len(prompts), cfg.data.prompt_path)

    policy_opt = make_optimizer(models.policy, cfg.optim.policy_lr, cfg.optim)
    critic_opt = None if models.critic is None else make_optimizer(models.critic, cfg.optim.critic_lr, cfg.optim)
    state = TrainState(policy_sched=make_scheduler(policy_opt, cfg.optim, d.policy_optimizer_steps),
                       critic_sched=None if critic_opt is None else make_scheduler(critic_opt, cfg.optim,
                                                                                   d.critic_optimizer_steps),
                       reward_moments=RunningMoments().to(device), kl_controller=kl_controller(cfg),
                       counters=UpdateCounters(), sampler=sampler, ptx_sampler=ptx_sampler)
    engine = HFEngine(models.policy, cfg.rollout, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                      vocab_size=len(tok), generation_batch_size=d.generation_batch_size,
                      unshard=cfg.parallel.unshard_for_generation)
    return Setup(models=models, prompts=prompts, records=records, reward_fns=reward_fns, engine=engine,
                 ptx_batches=ptx_iter, policy_opt=policy_opt, critic_opt=critic_opt, state=state)


def _train(cfg: Config, device: torch.device) -> TrainResult:
    # ---- setup ------------------------------------------------------------
    world, rank = dist.world_size(), dist.rank()
    validate_world(cfg, world)
    d = derived(cfg, world)
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, cfg.run.log_level, rank)
    path = resume_point(cfg)                                    # checked before anything in run_dir is written
    config_yaml = to_yaml(cfg)
    if dist.is_main():
        (run_dir / "config.yaml").write_text(config_yaml)      # the resolved config, next to the run
    seed_everything(cfg.run.seed)                               # the same on every rank: they draw the same minibatches
    log.info("run dir %s, device %s, %d process(es)", run_dir, device, world)

    su = _setup(cfg, device, d)
    models, tok, ptx_iter = su.models, su.models.tokenizer, su.ptx_batches
    policy_opt, critic_opt, state = su.policy_opt, su.critic_opt, su.state
    with_critic = models.critic is not None
    start = 0
    fingerprint = rundir.model_fingerprint(models)
    if path is not None:
        saved = load_checkpoint(path, policy=models.policy, critic=models.critic, policy_opt=policy_opt,
                                critic_opt=critic_opt, models=fingerprint)
        state.load_state_dict(saved)
        set_rng_state(saved["rng"])                               # rank 0's: all ranks keep one RNG stream
        start = saved["iteration"]
    # The loop's names for the state's parts (the same objects: a checkpoint saves what the loop changed).
    policy_sched, critic_sched, moments = state.policy_sched, state.critic_sched, state.reward_moments
    kl_ctl, counters = state.kl_controller, state.counters

    # On resume, records past the checkpoint (written before a crash) are dropped from the logs.
    writer = MetricWriter(run_dir, tensorboard=cfg.run.tensorboard, resume_from=start if path is not None else None)
    bar = progress(cfg.run.iterations, "ppo", cfg.run.progress_bar, initial=start)
    last_ckpt, scalars, done = None, {}, start
    with GracefulStop() as stop:
        try:
            for it in range(start, cfg.run.iterations):
                timer = PhaseTimer(device)
                buf = MetricBuffer()
                t_iter = time.perf_counter()
                train_policy = it >= cfg.ppo.critic_warmup_steps

                # 1. Rollout: the next prompts (rollout_batch_size / world_size whole groups on this rank), G
                #    responses each, sampled with noise fixed per (seed, iteration, sample), and their raw outcome
                #    scores (reward model at EOS, reward functions); dynamic sampling redraws groups without signal.
                with timer("rollout"):
                    sampled = sample_groups(su, cfg, d, it, device)
                    rollout = sampled.rollout
                    buf.add_dict(sampled.metrics)

                # 2. Score: old/ref logprobs at temperature T, values (with a critic).
                with timer("score"):
                    scored = score_rollout(models, rollout, cfg, batch_size=d.forward_batch_size,
                                           fused=models.fused_lm_head, outcomes=(sampled.scores, sampled.nonfinite))
                    for m in (models.policy, models.ref, models.critic, models.reward):
                        if m is not None:
                            dist.reshard(m)                      # free the roots FSDP keeps gathered after forward

                # 3. Shape rewards: reparameterise the score (§5.3.1), token-level KL penalty (§5.3.2); the score
                #    at the last token is the group-centred one for reinforce_pp_baseline.
                with timer("shape"):
                    valid = sampled.valid & ~scored.nonfinite    # NaN/inf scores or forwards, filler groups:
                    rollout = drop_rows(rollout, ~valid, tok.pad_token_id)          # out of the update
                    scores = scored.scores
                    if cfg.reward.missing_eos_penalty is not None:
                        scores = scores - cfg.reward.missing_eos_penalty * (~rollout.ended).float()
                    shaped = reparameterise_scores(scores, moments, cfg, valid=valid)
                    rewards, kl = token_rewards(outcome_rewards(shaped, valid, cfg), scored.old_logprobs,
                                                scored.ref_logprobs, rollout.response_mask,
                                                kl_coef=kl_ctl.value, estimator=cfg.reward.kl_estimator,
                                                clamp=cfg.reward.kl_clamp, backend=cfg.run.backend)

                # 4. Advantages: GAE over response tokens, optional whitening / clipping (or the critic-free
                #    estimator); then every rank receives the whole global batch.
                with timer("advantages"):
                    if with_critic:
                        advantages, returns = compute_advantages(rewards, scored.values, rollout.response_mask, cfg)
                    else:
                        advantages, returns = critic_free_advantages(shaped, rewards, rollout.response_mask, valid, cfg)
                    # pi_old vs the generator's pi_rollout: the mismatch, and the off-policy weight of the loss.
                    policy_weight, mismatch = rollout_correction(rollout, scored, cfg)
                    exp = Experience(
                        sequences=rollout.sequences, attention_mask=rollout.attention_mask,
                        response_mask=rollout.response_mask, old_logprobs=scored.old_logprobs,
                        ref_logprobs=scored.ref_logprobs, old_values=scored.values, rewards=rewards,
                        advantages=advantages, returns=returns, prompt_width=rollout.prompt_width,
                        policy_weight=policy_weight,
                    )
                    buf.add_dict(experience_metrics(rollout, scored, shaped, kl, exp, cfg.rollout.max_new_tokens,
                                                    with_critic=with_critic))
                    buf.add_dict(mismatch)
                    exp = gather_experience(exp)

                # 5. Update: PPO epochs x shuffled minibatches x micro-batches (critic only during warm-up).
                with timer("update"):
                    steps_before = counters.skipped_steps
                    ppo_update(exp, policy=models.policy, critic=models.critic, policy_opt=policy_opt,
                               critic_opt=critic_opt, policy_sched=policy_sched, critic_sched=critic_sched, cfg=cfg,
                               train_policy=train_policy, fused=models.fused_lm_head, ptx_batches=ptx_iter,
                               counters=counters, metrics=buf)

                # 6. Log: the iteration's single host sync for metrics.
                buf.add("memory/peak_mb", dist.all_reduce(torch.tensor(peak_memory_mb(device), device=device), "max"))
                scalars = buf.flush()
                elapsed = time.perf_counter() - t_iter
                scalars.update({
                    "kl/coef": kl_ctl.value,
                    "reward/running_mean": float(moments.mean), "reward/running_std": float(moments.std),
                    "lr/policy": policy_sched.get_last_lr()[0],
                    **({"lr/critic": critic_sched.get_last_lr()[0]} if with_critic else {}),
                    "train/policy_trained": float(train_policy),
                    "train/skipped_steps": float(counters.skipped_steps),
                    "train/skipped_this_iter": float(counters.skipped_steps - steps_before),
                    "train/optimizer_steps": float(counters.optimizer_steps),
                    "throughput/tokens_per_s": scalars["response/total_tokens"] / elapsed,
                    "throughput/response_tokens_per_s": scalars["response/tokens"] / elapsed,
                    "throughput/rollout_tokens_per_s": scalars["response/tokens"] / max(timer.times["rollout"], 1e-9),
                    "time/iteration_s": elapsed,
                    **{f"time/{k}_s": v for k, v in timer.times.items()},
                })
                kl_ctl.update(scalars["kl/ref_per_sequence"], len(exp))
                writer.write(it + 1, scalars, histograms={"score/raw": dist.all_gather_cat(scored.scores)})
                bar.set_postfix(refresh=False, reward=f"{scalars['score/raw/mean']:.3f}",
                                kl=f"{scalars['kl/ref_per_sequence']:.3f}", len=f"{scalars['response/length_mean']:.1f}",
                                tok_s=f"{scalars['throughput/tokens_per_s']:.0f}")
                bar.update(1)

                # 7. Checkpoint: periodically, at the end, and at the first safe point after a signal.
                done = it + 1
                if cfg.run.stop_after is not None and done - start >= cfg.run.stop_after and not stop.requested:
                    stop.requested = "run.stop_after"
                # All ranks stop together (a signal may reach them at different iterations).
                if dist.any_rank(stop.requested is not None, device) and not stop.requested:
                    stop.requested = "a stop on another rank"
                if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.iterations or stop.requested:
                    last_ckpt = save_checkpoint(cfg.run.output_dir, done, policy=models.policy, critic=models.critic,
                                                policy_opt=policy_opt, critic_opt=critic_opt,
                                                trainer_state={**state.state_dict(), "world_size": world,
                                                               "models": fingerprint},
                                                config_yaml=config_yaml, keep_last=cfg.run.keep_last)
                if stop.requested:
                    log.warning("stopped by %s after iteration %d; resume with run.resume=latest (or --resume)",
                                stop.requested, done)
                    break
            else:
                done = cfg.run.iterations
        finally:
            bar.close()
            writer.close()
            su.reward_fns.close()

    export = None
    if cfg.run.export_at_end and not stop.requested and done == cfg.run.iterations:
        export = export_hf(models.policy, tok, run_dir / "export" / "policy",   # collective when sharded
                           adapter_only=cfg.run.export_adapter)
    return TrainResult(run_dir=run_dir, iterations_done=done, metrics=scalars, checkpoint=last_ckpt,
                       export=export, interrupted=stop.requested is not None)
