"""Running moments, metric aggregation and writers (JSONL, TensorBoard).

Metrics are accumulated as device tensors during an iteration and brought to
the host in a single `.tolist()` per iteration (`MetricBuffer.flush`), so the
training loop has one host sync point for logging.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist

log = logging.getLogger("fastppo")


@dataclass
class RunningMoments:
    """Running mean and standard deviation of a scalar stream (parallel Welford / Chan et al.).

    `update` merges the moments of a whole batch (all ranks) into the running
    ones: with counts n_a, n_b, means mu_a, mu_b and sums of squared
    deviations M_a, M_b, the merged M = M_a + M_b + delta^2 n_a n_b / n.
    Stored in float64 on the host: a handful of numbers per iteration.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count > 0 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def merge(self, n_b: float, mean_b: float, var_b: float) -> None:
        """Merge a batch given as (count, mean, population variance)."""
        if n_b <= 0:
            return
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += var_b * n_b + delta * delta * n_a * n_b / n
        self.count = n

    def update(self, x: torch.Tensor) -> None:
        """Merge the global batch x (all ranks); costs one host sync."""
        count, mean, var = dist.global_moments(x.detach().reshape(-1).double() if x.device.type == "cpu" else x.detach().reshape(-1))
        n_b, mean_b, var_b = torch.stack([count.double(), mean.double(), var.double()]).tolist()
        self.merge(n_b, mean_b, var_b)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.m2 = float(d["count"]), float(d["mean"]), float(d["m2"])


class MetricBuffer:
    """Scalars as 0-d device tensors, averaged per key, synced to the host once."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(())
        if key in self._sums:
            self._sums[key] = self._sums[key] + value
            self._counts[key] += 1
        else:
            self._sums[key] = value
            self._counts[key] = 1

    def add_dict(self, values: dict) -> None:
        for k, v in values.items():
            self.add(k, v)

    def flush(self) -> dict[str, float]:
        """Means of everything added since the last flush; the one host sync."""
        keys = list(self._sums)
        tensors = [k for k in keys if isinstance(self._sums[k], torch.Tensor)]
        host = {}
        if tensors:
            values = torch.stack([self._sums[k].to(self._sums[tensors[0]].device) for k in tensors]).tolist()
            host.update(dict(zip(tensors, values)))
        for k in keys:
            if k not in host:
                host[k] = float(self._sums[k])
        out = {k: host[k] / self._counts[k] for k in keys}
        self._sums.clear()
        self._counts.clear()
        return out


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens (1: perfect critic, 0: constant, < 0: worse)."""
    _, _, var_r = dist.global_moments(returns, mask)
    _, _, var_err = dist.global_moments(returns - values, mask)
    return 1.0 - var_err / var_r.clamp(min=1e-8)


def masked_stats(prefix: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """mean, std, min, max of x over mask (all ranks) as device tensors."""
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    _, mean, var = dist.global_moments(x, m)
    big = torch.finfo(torch.float32).max
    return {
        f"{prefix}/mean": mean,
        f"{prefix}/std": var.sqrt(),
        f"{prefix}/min": dist.all_reduce_min(torch.where(m, x.float(), big).min()),
        f"{prefix}/max": dist.all_reduce_max(torch.where(m, x.float(), -big).max()),
    }


class MetricWriter:
    """Writes one record per iteration to metrics.jsonl and TensorBoard (main rank only)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.enabled = dist.is_main()
        self.jsonl = None
        self.tb = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except Exception as exc:  # tensorboard missing or broken: keep training, say so
                log.warning("TensorBoard disabled: %s", exc)

    def write(self, step: int, scalars: dict[str, float], histograms: dict[str, torch.Tensor] | None = None) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"iteration": step, **{k: _finite_or_str(v) for k, v in scalars.items()}}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            for k, h in (histograms or {}).items():
                self.tb.add_histogram(k, h.detach().float().cpu(), step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _finite_or_str(v: float):
    return v if math.isfinite(v) else str(v)


def histogram_counts(x: torch.Tensor, bins: int = 10) -> dict[str, list[float]]:
    """Text histogram (edges, counts) of a host tensor, for the JSONL log."""
    x = x.detach().float().cpu()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return {"edges": [round(e, 6) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}
