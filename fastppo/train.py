"""`fastppo train`: the PPO-max loop (Zheng et al. 2023), top to bottom; each phase is a module of its own.

    setup: config, models, data, optimizers, (resume)
    for iteration:
        1 rollout      `groups`: prompts, G responses each, outcome scores (reward model, reward functions);
                       dynamic sampling repeats this for groups without signal
        2 score        `experience`: old logprobs + entropy, ref logprobs, values; the rollout mismatch
        3 shape        `shaping`: score reparameterisation, token-level KL penalty
        4 advantages   `advantages`: GAE, or a critic-free estimator (grpo, rloo, reinforce_pp)
        5 update       `update`: PPO epochs x minibatches x micro-batches
        6 log          `metrics`: one host sync; JSONL, TensorBoard, wandb, progress bar; `health`: the evaluation
                       (eval.*) when due and the health checks (health.*)
        7 checkpoint   `checkpoint`: every save_every iterations, at the end, and on SIGTERM/Ctrl-C
    export the policy as a Hugging Face directory

The same code runs in one process and under torchrun (`dist.setup` joins the
process group from torchrun's environment). With N processes every model is
sharded (FSDP2, `parallel`) and each rank generates and scores rollout_batch_size / N
prompts' rollouts of the global batch (prompts drawn by one sampler, identical on all
ranks; sampling noise fixed per sample, `rollout.CounterSampler`); the scored
experience is then exchanged (`gather_experience`) so that all ranks draw the
same minibatches and each trains on its share. Every statistic is global.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import dist, parallel
from . import run_dir as rundir
from .advantages import estimate_advantages, outcome_rewards
from .checkpoint import export_hf, load_checkpoint, resume_point, save_checkpoint, set_rng_state
from .config import (Config, ConfigError, Derived, derived, from_dict, load_config, to_yaml, uses_critic, uses_reference,
                     validate, validate_world)
from .data import EpochSampler, load_prompts, load_records, ptx_batches
from .engine import Engine, make_engine
from .envs import EnvRunner
from .experience import Experience, drop_rows, gather_experience, rollout_correction, score_rollout
from .groups import OutcomeScorer, Prompts, sample_groups
from .health import RunMonitor
from .logs import GracefulStop, PhaseTimer, progress, seed_everything, setup_logging
from .memory import peak_memory_mb
from .metrics import MetricBuffer, MetricWriter, RunningMoments, experience_metrics, open_wandb
from .models import Forward, Models, check_positions, load_models
from .optim import Trained, UpdateCounters, make_optimizer, make_scheduler
from .rewards import RewardFunctions
from .shaping import AdaptiveKLController, kl_controller, score_slope, shape_scores, token_rewards
from .update import ppo_update

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
    fwd: Forward
    """How the logprob and value forwards run."""
    prompts: Prompts
    scorer: OutcomeScorer
    """Phase 1's outcome scores: the reward model and reward.functions (their worker pool: `close` it)."""
    engine: Engine
    """Generation (`fastppo.engine`): the policy's HF generate, or an external engine."""
    ptx_batches: Iterator | None
    """Endless ptx batches (None without data.ptx_path)."""
    policy_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer | None
    state: TrainState


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
    device = dist.resolve_device(cfg.run.device, cfg.run.backend)
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


def _setup(cfg: Config, device: torch.device, d: Derived) -> Setup:
    """Models (sharded or autocast), prompt and ptx data, optimizers, schedulers and the fresh train state."""
    # Precision: model.dtype master weights (and optimizer state), parallel.param_dtype compute: FSDP2's
    # MixedPrecisionPolicy when sharded (on CUDA also in one process), else autocast around the blocks.
    prepare = parallel.parallelize(cfg.parallel, device, parallel.compute_dtype(cfg.parallel.param_dtype, device))
    reward_fns = RewardFunctions(cfg.reward)                   # imports the functions: fails before any model loads
    models = load_models(cfg.model, device, shard=prepare, with_critic=uses_critic(cfg),
                         with_reference=uses_reference(cfg))
    tok = models.tokenizer
    records: list[dict] = []
    if cfg.env.name is None:
        prompts = load_prompts(cfg.data.prompt_path, tok, field=cfg.data.prompt_field,
                               prompt_format=cfg.data.prompt_format, max_len=cfg.data.max_prompt_len, records=records,
                               max_unknown_frac=cfg.data.max_unknown_token_frac)
        longest = max(map(len, prompts))
        check_positions(models, cfg.model, longest + cfg.rollout.max_new_tokens,
                        f"the longest prompt ({longest} tokens; data.max_prompt_len={cfg.data.max_prompt_len}) + "
                        f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens})")
        env = None
    else:                                    # the environment's reset(record) gives each trajectory's first turn
        prompts, records = None, load_records(cfg.data.prompt_path)
        if cfg.env.max_tokens is not None:   # else the observations' lengths are known only as they come
            check_positions(models, cfg.model, cfg.env.max_tokens, f"env.max_tokens ({cfg.env.max_tokens})")
        env = EnvRunner(cfg.env, cfg.reward, tok, records, max_new_tokens=cfg.rollout.max_new_tokens,
                        max_prompt_len=cfg.data.max_prompt_len, prompt_format=cfg.data.prompt_format)
    sampler = EpochSampler(len(records), seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    ptx_sampler, ptx = ptx_batches(cfg.data, tok, seed=cfg.run.seed, batch_size=cfg.ppo.micro_batch_size,
                                   device=device) if cfg.data.ptx_path else (None, None)
    if ptx is not None and cfg.ppo.ptx_coef == 0:
        log.warning("data.ptx_path is set but ppo.ptx_coef is 0: the ptx loss is off")
    fwd = Forward(temperature=cfg.rollout.temperature, packed=cfg.ppo.packing, backend=cfg.run.backend,
                  chunk_size=cfg.model.lm_head_chunk_size, fused=models.fused_lm_head, vocab_size=models.vocab_size)
    scorer = OutcomeScorer(models.reward, tok, reward_fns, records, fwd, rows=d.forward_batch_size,
                           tokens=cfg.rollout.forward_batch_tokens, reward_path=cfg.model.reward_path)
    policy_opt = make_optimizer(models.policy, cfg.optim.policy_lr, cfg.optim)
    critic_opt = None if models.critic is None else make_optimizer(models.critic, cfg.optim.critic_lr, cfg.optim)
    state = TrainState(policy_sched=make_scheduler(policy_opt, cfg.optim, d.policy_optimizer_steps),
                       critic_sched=None if critic_opt is None else make_scheduler(critic_opt, cfg.optim,
                                                                                   d.critic_optimizer_steps),
                       reward_moments=RunningMoments().to(device), kl_controller=kl_controller(cfg.reward),
                       counters=UpdateCounters(), sampler=sampler, ptx_sampler=ptx_sampler)
    engine = make_engine(models.policy, cfg.rollout, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         vocab_size=len(tok), generation_batch_size=d.generation_batch_size,
                         unshard=cfg.parallel.unshard_for_generation)
    return Setup(models=models, fwd=fwd, prompts=Prompts(prompts, sampler, env), scorer=scorer, engine=engine,
                 ptx_batches=ptx, policy_opt=policy_opt, critic_opt=critic_opt, state=state)


def _resume(path: Path | None, su: Setup, fingerprint: dict) -> int:
    """Weights, optimizer states, the train state and the RNG of checkpoint `path` (rank 0's RNG: all ranks keep
    one stream); the iteration to start from (0 for a fresh start, path None)."""
    if path is None:
        return 0
    models = su.models
    saved = load_checkpoint(path, policy=models.policy, critic=models.critic, policy_opt=su.policy_opt,
                            critic_opt=su.critic_opt, models=fingerprint)
    su.state.load_state_dict(saved)
    set_rng_state(saved["rng"])
    return saved["iteration"]


def _open_run(cfg: Config, device: torch.device) -> tuple[Path, Path | None, str]:
    """The run folder (created, logged to), the checkpoint to continue (None: a fresh start; checked before anything
    in the folder is written) and the resolved config (written beside the run); every RNG seeded."""
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, cfg.run.log_level, dist.rank())
    path = resume_point(cfg)
    config_yaml = to_yaml(cfg)
    if dist.is_main():
        (run_dir / "config.yaml").write_text(config_yaml)
    seed_everything(cfg.run.seed)                               # the same on every rank: they draw the same minibatches
    log.info("run dir %s, device %s, %d process(es)", run_dir, device, dist.world_size())
    return run_dir, path, config_yaml


def _train(cfg: Config, device: torch.device) -> TrainResult:
    # ---- setup ------------------------------------------------------------
    world = dist.world_size()
    validate_world(cfg, world)
    d = derived(cfg, world)
    run_dir, path, config_yaml = _open_run(cfg, device)
    su = _setup(cfg, device, d)
    models, state, fwd, pad_id = su.models, su.state, su.fwd, su.models.tokenizer.pad_token_id
    fingerprint = rundir.model_fingerprint(models)
    start = _resume(path, su, fingerprint)
    critic = None if models.critic is None else Trained("critic", models.critic, su.critic_opt, state.critic_sched)
    last_ckpt, scalars, done, G = None, {}, start, cfg.rollout.n_samples_per_prompt
    # From its metrics.jsonl on (the evaluation before the first update included), a stop signal ends the run at
    # the next safe point: after an iteration and its checkpoint.
    with GracefulStop() as stop:
        # On resume, records past the checkpoint (written before a crash) are dropped from the logs.
        writer = MetricWriter(run_dir, tensorboard=cfg.run.tensorboard,
                              resume_from=start if path is not None else None,
                              wandb=open_wandb(cfg, run_dir, resumed=path is not None))
        monitor = RunMonitor(cfg, models, su.scorer.reward_fns, fwd, run_dir=run_dir, device=device,
                             resume_from=start if path is not None else None)
        bar = progress(cfg.run.iterations, "ppo", cfg.run.progress_bar, initial=start)
        try:
            monitor.start(writer, start)
            for it in range(start, cfg.run.iterations):
                timer, buf, t_iter = PhaseTimer(device), MetricBuffer(), time.perf_counter()
                policy = Trained("policy", models.policy, su.policy_opt, state.policy_sched,
                                 train=it >= cfg.ppo.critic_warmup_steps)        # PPO-max §5.4: critic warm-up

                # 1. Rollout: this rank's whole groups of G responses, sampled with noise fixed per (seed,
                #    iteration, sample), and their raw outcome scores (reward model at EOS, reward functions).
                with timer("rollout"):
                    sampled = sample_groups(cfg.rollout, su.prompts, su.engine, su.scorer, seed=cfg.run.seed,
                                            iteration=it, pad_id=pad_id, device=device)
                    buf.add_dict(sampled.metrics)

                # 2. Score: old/ref logprobs at temperature T, values (with a critic).
                with timer("score"):
                    scored = score_rollout(models, sampled.rollout, fwd, outcomes=(sampled.scores, sampled.nonfinite),
                                           old_logprobs=cfg.rollout.old_logprobs, rows=d.forward_batch_size,
                                           tokens=cfg.rollout.forward_batch_tokens)
                    parallel.reshard(models.policy, models.ref, models.critic, models.reward)

                # 3. Shape rewards: reparameterise the score (§5.3.1), token-level KL penalty (§5.3.2); rows with a
                #    non-finite score or forward, and filler groups, leave the update.
                with timer("shape"):
                    valid = sampled.valid & ~scored.nonfinite
                    rollout = drop_rows(sampled.rollout, ~valid, pad_id)
                    shaped = shape_scores(scored.scores, rollout.ended, rollout.response_mask.sum(-1), valid,
                                          state.reward_moments, cfg.reward, d.max_sampled_tokens)
                    steps = (None if rollout.step_rewards is None else     # an environment's, where they were earned
                             rollout.step_rewards * score_slope(state.reward_moments, cfg.reward).to(device))
                    rewards, kl = token_rewards(outcome_rewards(shaped, valid, cfg.advantage, G), scored.old_logprobs,
                                                scored.ref_logprobs, rollout.response_mask,
                                                kl_coef=state.kl_controller.value, estimator=cfg.reward.kl_estimator,
                                                clamp=cfg.reward.kl_clamp, backend=cfg.run.backend, step_rewards=steps)

                # 4. Advantages by the configured estimator; the off-policy weights of the generator/trainer
                #    mismatch; then every rank receives the whole global batch.
                with timer("advantages"):
                    advantages, returns = estimate_advantages(
                        cfg.advantage, rewards=rewards, values=scored.values, response_mask=rollout.response_mask,
                        shaped=shaped, valid=valid, group_size=G, backend=cfg.run.backend)
                    policy_weight, mismatch = rollout_correction(rollout, scored, cfg.correction, cfg.rollout.old_logprobs)
                    exp = Experience.of(rollout, scored, rewards, advantages, returns, policy_weight)
                    buf.add_dict({**mismatch, **experience_metrics(
                        rollout, scored, shaped, kl, exp, cfg.rollout.max_new_tokens, with_critic=critic is not None,
                        with_ref=models.ref is not None)})
                    exp = gather_experience(exp)

                # 5. Update: PPO epochs x shuffled minibatches x micro-batches (critic only during warm-up).
                with timer("update"):
                    skipped = state.counters.skipped_steps
                    ppo_update(exp, policy, critic, cfg.ppo, fwd, max_grad_norm=cfg.optim.max_grad_norm,
                               max_new_tokens=d.max_sampled_tokens,
                               max_nonfinite_in_a_row=cfg.run.max_nonfinite_in_a_row, ptx_batches=su.ptx_batches,
                               counters=state.counters, metrics=buf)

                # 6. Log: the iteration's single host sync for metrics; the evaluation when due, the health checks.
                buf.add("memory/peak_mb", dist.all_reduce(torch.tensor(peak_memory_mb(device), device=device), "max"))
                scalars = monitor.after(it + 1, _scalars(buf, state, policy, critic, skipped, timer,
                                                         time.perf_counter() - t_iter))
                if "kl/ref_per_sequence" in scalars:
                    state.kl_controller.update(scalars["kl/ref_per_sequence"], len(exp))
                writer.write(it + 1, scalars, histograms={"score/raw": dist.all_gather_cat(scored.scores)})
                bar.set_postfix(refresh=False, reward=f"{scalars['score/raw/mean']:.3f}",
                                kl=f"{scalars.get('kl/ref_per_sequence', 0.0):.3f}",
                                len=f"{scalars['response/length_mean']:.1f}", tok_s=f"{scalars['throughput/tokens_per_s']:.0f}")
                bar.update(1)

                # 7. Checkpoint: periodically, at the end, and at the first safe point after a signal; all ranks
                #    stop together (a signal may reach them at different iterations).
                done = it + 1
                if cfg.run.stop_after is not None and done - start >= cfg.run.stop_after and not stop.requested:
                    stop.requested = "run.stop_after"
                stop.requested = stop.requested or monitor.stop_reason        # health.action=stop
                if dist.any_rank(stop.requested is not None, device) and not stop.requested:
                    stop.requested = "a stop on another rank"
                if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.iterations or stop.requested:
                    last_ckpt = save_checkpoint(cfg.run.output_dir, done, policy=models.policy, critic=models.critic,
                                                policy_opt=su.policy_opt, critic_opt=su.critic_opt,
                                                trainer_state={**state.state_dict(), "world_size": world,
                                                               "models": fingerprint},
                                                config_yaml=config_yaml, keep_last=cfg.run.keep_last)
                if stop.requested:
                    log.warning("stopped by %s after iteration %d; resume with run.resume=latest (or --resume)",
                                stop.requested, done)
                    break
        finally:
            bar.close()
            writer.close()
            su.scorer.reward_fns.close()
            if su.prompts.env is not None:
                su.prompts.env.close()

    export = None
    if cfg.run.export_at_end and not stop.requested and done == cfg.run.iterations:
        export = export_hf(models.policy, models.tokenizer, run_dir / "export" / "policy",   # collective when sharded
                           adapter_only=cfg.run.export_adapter)
    return TrainResult(run_dir=run_dir, iterations_done=done, metrics=scalars, checkpoint=last_ckpt,
                       export=export, interrupted=stop.requested is not None)


def _scalars(buf: MetricBuffer, state: TrainState, policy: Trained, critic: Trained | None, skipped_before: int,
             timer: PhaseTimer, elapsed: float) -> dict[str, float]:
    """The iteration's metrics (`MetricBuffer.flush`: its one host sync) and the loop's own: KL coefficient,
    running reward moments, learning rates, step counters, throughput and time per phase."""
    scalars, counters, moments = buf.flush(), state.counters, state.reward_moments
    scalars.update({
        "kl/coef": state.kl_controller.value,
        "reward/running_mean": float(moments.mean), "reward/running_std": float(moments.std),
        "lr/policy": policy.sched.get_last_lr()[0],
        **({"lr/critic": critic.sched.get_last_lr()[0]} if critic is not None else {}),
        "train/policy_trained": float(policy.train),
        "train/skipped_steps": float(counters.skipped_steps),
        "train/skipped_this_iter": float(counters.skipped_steps - skipped_before),
        "train/optimizer_steps": float(counters.optimizer_steps),
        "throughput/tokens_per_s": scalars["response/total_tokens"] / elapsed,
        "throughput/response_tokens_per_s": scalars["response/tokens"] / elapsed,
        "throughput/rollout_tokens_per_s": scalars["response/tokens"] / max(timer.times["rollout"], 1e-9),
        "time/iteration_s": elapsed,
        **{f"time/{k}_s": v for k, v in timer.times.items()},
    })
    return scalars
