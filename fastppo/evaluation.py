"""Evaluation on held-out prompts: k samples per prompt, their outcome scores, pass@k (`fastppo eval`, and `train`
with eval.data_path).

    pass_at_k       the unbiased pass@k estimator of Chen et al. 2021 (Codex)
    EvalSet         held-out prompts and the scorer of their responses (reward model + reward functions)
    evaluate        k = eval.n_samples responses to every prompt, each rank its share; metrics reduced over ranks
    Evaluator       `train`'s evaluation: before the first update, every eval.every iterations and at the end
    evaluate_model  `fastppo eval`: an export or a checkpoint, once

Metrics (docs/monitoring.md): eval/reward_mean (mean outcome score), eval/mean@k (fraction of the k samples
that are correct, averaged over prompts; correct = score >= eval.pass_threshold), eval/pass@k for k in
eval.pass_k, eval/length_mean (response tokens, EOS counted), and eval/reward_fn/<name>/mean per reward function.

Evaluation never changes the training run: its sampling noise is counter-based (`rollout.CounterSampler`) on a
seed of its own (eval.seed, hashed with a stream tag distinct from training's (run.seed, iteration)), and it
draws nothing from torch's global RNG; the policy is in eval mode (no dropout). The same seed is used at every
evaluation, so two evaluations of a run differ by the weights only (common random numbers), and `fastppo eval`
of the final export samples what the run's last evaluation sampled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist, lora
from .checkpoint import read_weights, verify_checkpoint
from .config import Config, ConfigError, derived, load_config
from .data import PromptBatch, collate_prompts, load_prompts
from .engine import HFEngine
from .groups import OutcomeScorer
from .logs import setup_logging
from .metrics import MetricWriter
from .models import Forward, Models, check_positions, load_models
from .rewards import RewardFunctions, decode_rollout
from .rollout import cat_rollouts, sampling_seed

log = logging.getLogger("fastppo")

EVAL_STREAM = 0x45564131
"""Hashed with eval.seed into the evaluation's sampling seed: a stream no training iteration's seed shares."""

SAMPLES_FILE = "eval_samples.jsonl"
"""Every evaluated sample (prompt, response, score, correct, length), one JSON object a line, beside metrics.jsonl."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n - c, k) / C(n, k), computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i) (no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def eval_metrics(scores: torch.Tensor, lengths: torch.Tensor, *, pass_k: list[int],
                 threshold: float) -> dict[str, float]:
    """The eval/* metrics of P prompts x k samples: scores and lengths (P, k) on the host. A NaN score (a response
    scored NaN/inf) counts as incorrect and is left out of eval/reward_mean."""
    n = scores.size(1)
    correct = scores.double() >= threshold                                              # NaN: False
    c = correct.sum(1).tolist()
    out = {"eval/reward_mean": float(scores.double().nanmean()), f"eval/mean@{n}": float(correct.double().mean()),
           "eval/length_mean": float(lengths.double().mean())}
    for k in pass_k:
        out[f"eval/pass@{k}"] = sum(pass_at_k(n, ci, k) for ci in c) / len(c)
    return out


@dataclass
class EvalSet:
    """Held-out prompts and what scores their responses."""
    ids: list[list[int]]
    """The tokenised prompts."""
    records: list[dict]
    """Each prompt's whole record (what reward functions see)."""
    scorer: OutcomeScorer
    """The reward model at EOS + the reward functions, on these records."""

    @classmethod
    def load(cls, cfg: Config, models: Models, reward_fns: RewardFunctions, fwd: Forward, *, rows: int) -> "EvalSet":
        """eval.data_path read as data.prompt_path is (its field, format and length), its first eval.max_prompts."""
        ec, dc, records = cfg.eval, cfg.data, []
        ids = load_prompts(ec.data_path, models.tokenizer, field=dc.prompt_field, prompt_format=dc.prompt_format,
                           max_len=dc.max_prompt_len, records=records, max_unknown_frac=dc.max_unknown_token_frac)
        ids, records = ids[:ec.max_prompts], records[:ec.max_prompts]
        longest = max(map(len, ids))
        check_positions(models, cfg.model, longest + cfg.rollout.max_new_tokens,
                        f"the longest prompt of eval.data_path ({longest} tokens) + rollout.max_new_tokens "
                        f"({cfg.rollout.max_new_tokens})")
        scorer = OutcomeScorer(models.reward, models.tokenizer, reward_fns, records, fwd, rows=rows,
                               tokens=cfg.rollout.forward_batch_tokens, reward_path=cfg.model.reward_path)
        return cls(ids, records, scorer)


@torch.no_grad()
def evaluate(cfg: Config, models: Models, evalset: EvalSet, *, generation_batch_size: int, device: torch.device,
             iteration: int = 0) -> tuple[dict[str, float], list[dict]]:
    """eval.n_samples responses to every prompt at eval.temperature, scored; returns (metrics, samples).

    Prompts are split over ranks in equal shares (the last prompt repeated to fill the last share, and left out of
    the metrics); every rank returns the same metrics, and rank 0 the samples of all ranks (others: []).
    Sample j of prompt i has sample id i * k + j and the evaluation's own seed (module docstring).
    """
    ec, tok = cfg.eval, models.tokenizer
    k, world, rank, P = ec.n_samples, dist.world_size(), dist.rank(), len(evalset.ids)
    share = -(-P // world)
    mine = [min(i, P - 1) for i in range(rank * share, (rank + 1) * share)]         # prompt index of each row group
    real = torch.tensor([rank * share + j < P for j in range(share)], device=device).repeat_interleave(k)
    rows = [i for i in mine for _ in range(k)]
    sample_ids = torch.tensor([i * k + j for i in mine for j in range(k)])
    engine = HFEngine(models.policy, dataclasses.replace(cfg.rollout, temperature=ec.temperature),
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=models.vocab_size,
                      generation_batch_size=generation_batch_size, unshard=cfg.parallel.unshard_for_generation)
    was_training = models.policy.training
    models.policy.eval()
    try:
        with engine.policy_loaded():
            batch = collate_prompts([evalset.ids[i] for i in rows], tok.pad_token_id)
            rollout = engine.generate(PromptBatch(batch.input_ids, batch.attention_mask),
                                      seed=sampling_seed(ec.seed, EVAL_STREAM), sample_ids=sample_ids)
    finally:
        models.policy.train(was_training)
    width = dist.all_reduce(torch.tensor(rollout.response_mask.size(1), device=device), "max")
    rollout = cat_rollouts([rollout], tok.pad_token_id, response_width=int(width))     # rows of every rank line up
    scores, nonfinite = evalset.scorer(rollout, rows)
    fn_metrics = evalset.scorer.function_metrics(device)
    scores = torch.where(nonfinite.to(scores.device), float("nan"), scores.float())
    local = torch.stack([scores.to(device), rollout.lengths.to(device).float(), real.float()], 1)    # (rows, 3)
    every = dist.all_gather_cat(local).double().cpu()
    every = every[every[:, 2] > 0]                                                      # (P * k, 3)
    table = every[:, :2].view(P, k, 2)
    if torch.isnan(table[..., 0]).any():
        log.warning("evaluation: %d of %d samples scored NaN/inf: counted as incorrect, left out of "
                    "eval/reward_mean", int(torch.isnan(table[..., 0]).sum()), P * k)
    metrics = eval_metrics(table[..., 0], table[..., 1], pass_k=list(ec.pass_k), threshold=ec.pass_threshold)
    metrics.update({f"eval/{key}": float(v) for key, v in fn_metrics.items() if key.endswith("/mean")})
    prompts, responses = decode_rollout(tok, rollout)
    local_samples = [{"iteration": iteration, "prompt_index": i, "sample": int(sid) % k, "prompt": p, "response": r,
                      "score": float(s), "correct": bool(s >= ec.pass_threshold), "length": int(n)}
                     for i, sid, p, r, s, n, ok in zip(rows, sample_ids.tolist(), prompts, responses, scores.tolist(),
                                                        rollout.lengths.tolist(), real.tolist()) if ok]
    samples = [s for part in dist.gather_object_to_main(local_samples) for s in part]
    return metrics, samples


def write_samples(path: Path, samples: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)


def keep_samples_until(path: Path, iteration: int | None) -> None:
    """A fresh run (iteration None) starts the samples file afresh; a resumed one drops the samples written past
    its checkpoint's iteration."""
    if not path.exists():
        return
    if iteration is None:
        path.unlink()
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= iteration:
                kept.append(line + "\n")
        except (json.JSONDecodeError, AttributeError):   # a line cut short by a crash
            continue
    path.write_text("".join(kept))


class Evaluator:
    """`train`'s evaluation on eval.data_path: `due(iteration)` says when, `__call__(iteration)` evaluates, appends the
    samples to <run dir>/eval_samples.jsonl and returns the metrics."""

    def __init__(self, cfg: Config, models: Models, reward_fns: RewardFunctions, fwd: Forward, *, run_dir: Path,
                 device: torch.device, resume_from: int | None) -> None:
        d = derived(cfg, dist.world_size())
        self.cfg, self.models, self.device, self.generation_batch_size = cfg, models, device, d.generation_batch_size
        self.evalset = EvalSet.load(cfg, models, reward_fns, fwd, rows=d.forward_batch_size)
        self.path = Path(run_dir) / SAMPLES_FILE
        if dist.is_main():
            keep_samples_until(self.path, resume_from)

    def due(self, iteration: int) -> bool:
        """Before the first update (0), every eval.every iterations, and after the last (run.iterations)."""
        every = self.cfg.eval.every
        return iteration in (0, self.cfg.run.iterations) or (every > 0 and iteration % every == 0)

    def __call__(self, iteration: int) -> dict[str, float]:
        metrics, samples = evaluate(self.cfg, self.models, self.evalset, device=self.device, iteration=iteration,
                                    generation_batch_size=self.generation_batch_size)
        if dist.is_main():
            write_samples(self.path, samples)
        log.info("evaluation at iteration %d: %s", iteration,
                 ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items()))
        return metrics


def evaluate_model(config: Config | str | Path | None, model: str | Path, *, data_path: str | Path | None = None,
                   checkpoint: bool = False, output_dir: str | Path = "runs/eval",
                   overrides: list[str] | None = None, preset: str | None = None) -> dict[str, float]:
    """`fastppo eval`: evaluate a model folder (a Hugging Face export) or, with checkpoint=True, a checkpoint folder
    of `train` (its weights on the architecture of its config's model.policy_path), with the reward model and
    functions of `config` (a Config, or a YAML path with `overrides` and `preset` as `train` takes them; None with a
    checkpoint: the checkpoint's config.yaml).

    Writes <output_dir>/metrics.jsonl (one record: the metrics, at the checkpoint's iteration or 0) and
    <output_dir>/eval_samples.jsonl (every sample); returns the metrics.
    """
    model, iteration = Path(model), 0
    extra = list(overrides or [])
    if checkpoint:
        state = verify_checkpoint(model)
        iteration = int(state["iteration"])
        config = model / "config.yaml" if config is None else config
    else:
        extra.insert(0, f"model.policy_path={model}")
    if data_path is not None:     # data.prompt_path (training prompts, required by the schema) is not read here
        extra += [f"eval.data_path={data_path}", f"data.prompt_path={data_path}"]
    if isinstance(config, Config):
        cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, policy_path=str(model))) \
            if not checkpoint else config
        if data_path is not None:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, data_path=str(data_path)))
        if overrides:
            raise ConfigError("evaluate_model: give overrides with a YAML config (or none), or set them on the Config")
    else:
        cfg = load_config(config, extra, preset=preset)
    if cfg.eval.data_path is None:
        raise ConfigError("eval.data_path: no prompts to evaluate: give a prompt file (fastppo eval --data FILE)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, cfg.run.log_level)
    device = dist.resolve_device(cfg.run.device, cfg.run.backend)
    reward_fns = RewardFunctions(cfg.reward)
    try:
        models = load_models(cfg.model, device, with_critic=False, with_reference=False)
        if checkpoint:
            _, unexpected = models.policy.load_state_dict(read_weights(model, "policy"),
                                                                strict=not lora.is_lora(models.policy))
            if unexpected:
                raise ConfigError(f"{model}: its policy weights do not fit model.policy_path={cfg.model.policy_path} "
                                  f"(unexpected: {unexpected[:4]})")
        d = derived(cfg)
        fwd = Forward(temperature=cfg.rollout.temperature, packed=cfg.ppo.packing, backend=cfg.run.backend,
                      chunk_size=cfg.model.lm_head_chunk_size, fused=models.fused_lm_head,
                      vocab_size=models.vocab_size)
        evalset = EvalSet.load(cfg, models, reward_fns, fwd, rows=d.forward_batch_size)
        metrics, samples = evaluate(cfg, models, evalset, generation_batch_size=d.generation_batch_size,
                                    device=device, iteration=iteration)
    finally:
        reward_fns.close()
    keep_samples_until(out / SAMPLES_FILE, None)
    write_samples(out / SAMPLES_FILE, samples)
    writer = MetricWriter(out, tensorboard=False)
    writer.write(iteration, metrics)
    writer.close()
    return metrics
