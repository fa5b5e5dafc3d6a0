"""The health monitor: reads every iteration's metrics and says, once per check, when a run goes wrong.

    HealthMonitor   the checks of health.* on a stream of metric records (`observe`), or a whole run (`check_run`)
    RunMonitor      `train`'s hook: the evaluation (`evaluation.Evaluator`) and the monitor, and health.action=stop

Checks (docs/monitoring.md; each fires once, with one line naming the metric, its value and the threshold):

    entropy_collapse     policy/entropy < health.entropy_floor
    kl_drift             kl/ref_per_sequence > health.kl_ceiling
    pattern_collapse     Zheng et al. 2023's signs, over two windows of health.window iterations (the first after
                         health.warmup, and the last): response/clipped_frac up by health.clipped_rise, and either
                         response/repeat_frac up by health.repeat_rise or policy/perplexity down by
                         health.perplexity_drop (relative)
    rollout_mismatch_kl  rollout/kl_k3 > health.mismatch_kl_ceiling (generator vs trainer, Yao et al. 2025)
    rollout_mismatch_frac  rollout/diff_gt_0.1_frac > health.mismatch_frac_ceiling
    clip_frac            policy/clipfrac > health.clip_frac_ceiling
    nonfinite_steps      train/skipped_steps >= health.nonfinite_steps
    nonfinite_scores     score/nonfinite summed over the run >= health.nonfinite_steps
    reward_hacking       score/raw/mean up by health.hacking_reward_rise over the windows while eval/reward_mean
                         fell by health.hacking_eval_drop from the first evaluation to the latest

A check that fires logs a warning and sets health/<check> = 1 in that iteration's record; every record carries
health/alerts, the number fired so far. The checks read the logged metrics only, so `check_run` replays them on
a finished run's metrics.jsonl and reaches the same verdict (the demo reports its runs' verdicts so).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, HealthConfig, load_config
from .evaluation import Evaluator
from .metrics import read_metrics
from .models import Forward, Models
from .rewards import RewardFunctions

log = logging.getLogger("fastppo")


@dataclass
class Alert:
    check: str
    """The check's name (health/<check> in the metrics)."""
    iteration: int
    message: str
    """One line: the metric, its value, the threshold."""


THRESHOLD_CHECKS = (
    ("entropy_collapse", "policy/entropy", "entropy_floor", True),
    ("kl_drift", "kl/ref_per_sequence", "kl_ceiling", False),
    ("rollout_mismatch_kl", "rollout/kl_k3", "mismatch_kl_ceiling", False),
    ("rollout_mismatch_frac", "rollout/diff_gt_0.1_frac", "mismatch_frac_ceiling", False),
    ("clip_frac", "policy/clipfrac", "clip_frac_ceiling", False),
)
"""(check, metric, its health.* threshold field, True: fires below the threshold, False: above)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class HealthMonitor:
    """The health.* checks over metric records, in iteration order; state: the series the trend checks read and the
    checks fired."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self.fired: dict[str, Alert] = {}
        self.series: dict[str, list[float]] = {}
        self.evals: list[float] = []
        self.skipped_scores = 0.0

    def observe(self, iteration: int, record: dict) -> list[Alert]:
        """The alerts that fire at this record (each check fires once in a run)."""
        h, new = self.cfg, []

        def fire(check: str, message: str) -> None:
            if check not in self.fired:
                alert = Alert(check, iteration, f"{message} at iteration {iteration}")
                self.fired[check] = alert
                new.append(alert)

        def value(key: str) -> float | None:
            v = record.get(key)
            return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

        # Non-finite steps count from the first iteration.
        if h.nonfinite_steps is not None:
            skipped = value("train/skipped_steps")
            if skipped is not None and skipped >= h.nonfinite_steps:
                fire("nonfinite_steps", f"non-finite steps: train/skipped_steps = {skipped:g} >= "
                                        f"health.nonfinite_steps = {h.nonfinite_steps}")
            self.skipped_scores += value("score/nonfinite") or 0.0
            if self.skipped_scores >= h.nonfinite_steps:
                fire("nonfinite_scores", f"non-finite scores: score/nonfinite summed = {self.skipped_scores:g} >= "
                                         f"health.nonfinite_steps = {h.nonfinite_steps}")
        if (e := value("eval/reward_mean")) is not None:
            self.evals.append(e)
        if iteration <= h.warmup:
            return new
        for key in ("response/clipped_frac", "response/repeat_frac", "policy/perplexity", "score/raw/mean"):
            if (v := value(key)) is not None:
                self.series.setdefault(key, []).append(v)

        for check, key, field, below in THRESHOLD_CHECKS:
            v, limit = value(key), getattr(h, field)
            if limit is not None and v is not None and (v < limit if below else v > limit):
                fire(check, f"{check.replace('_', ' ')}: {key} = {v:.4g} {'<' if below else '>'} "
                            f"health.{field} = {limit:g}")

        if h.clipped_rise is not None and (clipped := self._trend("response/clipped_frac")) is not None:
            repeat, ppl = self._trend("response/repeat_frac"), self._trend("policy/perplexity")
            signs = []
            if repeat is not None and repeat[1] - repeat[0] >= h.repeat_rise:
                signs.append(f"response/repeat_frac {repeat[0]:.3f} -> {repeat[1]:.3f} "
                             f"(rise >= health.repeat_rise = {h.repeat_rise:g})")
            if ppl is not None and ppl[1] <= ppl[0] * (1 - h.perplexity_drop):
                signs.append(f"policy/perplexity {ppl[0]:.3f} -> {ppl[1]:.3f} "
                             f"(fall >= health.perplexity_drop = {h.perplexity_drop:g})")
            if clipped[1] - clipped[0] >= h.clipped_rise and signs:
                fire("pattern_collapse", f"pattern collapse: response/clipped_frac {clipped[0]:.3f} -> {clipped[1]:.3f} "
                                         f"(rise >= health.clipped_rise = {h.clipped_rise:g}) and "
                                         f"{' and '.join(signs)}, first vs last {h.window} iterations")

        if (h.hacking_reward_rise is not None and len(self.evals) >= 2 and value("eval/reward_mean") is not None
                and (reward := self._trend("score/raw/mean")) is not None):
            rise, drop = reward[1] - reward[0], self.evals[0] - self.evals[-1]
            if rise >= h.hacking_reward_rise and drop >= h.hacking_eval_drop:
                fire("reward_hacking", f"reward hacking: score/raw/mean {reward[0]:.4g} -> {reward[1]:.4g} (rise >= "
                                       f"health.hacking_reward_rise = {h.hacking_reward_rise:g}) while "
                                       f"eval/reward_mean {self.evals[0]:.4g} -> {self.evals[-1]:.4g} (fall >= "
                                       f"health.hacking_eval_drop = {h.hacking_eval_drop:g})")
        return new

    def _trend(self, key: str) -> tuple[float, float] | None:
        """(mean of the first window, mean of the last window) of a series once it holds two whole windows."""
        xs, w = self.series.get(key, []), self.cfg.window
        return (_mean(xs[:w]), _mean(xs[-w:])) if len(xs) >= 2 * w else None

    def metrics(self, alerts: list[Alert]) -> dict[str, float]:
        """health/<check> = 1 for the alerts of this record, and health/alerts: the number fired so far."""
        return {**{f"health/{a.check}": 1.0 for a in alerts}, "health/alerts": float(len(self.fired))}


def check_run(run_dir: str | Path, cfg: HealthConfig | None = None) -> list[Alert]:
    """The alerts of a run, replayed from its metrics.jsonl with `cfg` (None: the run's config.yaml's health.*)."""
    if cfg is None:
        cfg = load_config(Path(run_dir) / "config.yaml").health
    monitor = HealthMonitor(cfg)
    return [a for r in read_metrics(run_dir) for a in monitor.observe(int(r["iteration"]), r)]


class RunMonitor:
    """`train`'s evaluation and health checks: `start` before the loop, `after` each iteration (its metrics to
    add), `stop_reason` once health.action=stop has fired."""

    def __init__(self, cfg: Config, models: Models, reward_fns: RewardFunctions, fwd: Forward, *, run_dir: Path,
                 device: torch.device, resume_from: int | None) -> None:
        """The evaluation on eval.data_path (none when null) with the run's models, reward functions and forward
        settings. resume_from: the checkpoint's iteration (None: a fresh run); a resumed run replays the records kept
        in metrics.jsonl, so that a check that fired before the checkpoint does not fire again."""
        self.cfg = cfg
        self.evaluator = None if cfg.eval.data_path is None else Evaluator(
            cfg, models, reward_fns, fwd, run_dir=run_dir, device=device, resume_from=resume_from)
        self.health = HealthMonitor(cfg.health)
        self.stop_reason: str | None = None
        if resume_from is not None and (Path(run_dir) / "metrics.jsonl").exists():
            for r in read_metrics(run_dir):
                if r["iteration"] <= resume_from:
                    self.health.observe(int(r["iteration"]), r)

    def start(self, writer, iteration: int) -> None:
        """The evaluation before the first update (a fresh run only), written as the record of iteration 0."""
        if self.evaluator is not None and iteration == 0:
            writer.write(0, self.after(0, {}))

    def after(self, iteration: int, scalars: dict[str, float]) -> dict[str, float]:
        """The evaluation when due, then the health checks on the iteration's metrics: what to add to its record."""
        out = dict(scalars)
        if self.evaluator is not None and self.evaluator.due(iteration):
            out.update(self.evaluator(iteration))
        alerts = self.health.observe(iteration, out)
        for a in alerts:
            log.warning("health: %s", a.message)
        # health.action=stop ends the run early; an alert at the last iteration leaves the run to finish (and export).
        stopping = self.cfg.health.action == "stop" and iteration < self.cfg.run.iterations
        if alerts and stopping and self.stop_reason is None:
            self.stop_reason = f"the health monitor ({alerts[0].check}; health.action=stop)"
        return {**out, **self.health.metrics(alerts)}
