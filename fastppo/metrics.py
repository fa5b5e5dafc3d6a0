"""Running moments, metric aggregation and writers (JSONL, TensorBoard, wandb).

Metrics are accumulated as device tensors during an iteration and brought to
the host in a single `.tolist()` per iteration (`MetricBuffer.flush`), so the
training loop has one host sync point for logging.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from . import dist
from .config import ConfigError
from .masked import masked_count, masked_moments

log = logging.getLogger("fastppo")


class RunningMoments:
    """Running mean and standard deviation of a scalar stream (parallel Welford / Chan et al.).

    `update` merges the moments of a whole batch (all ranks) into the running
    ones: with counts n_a, n_b, means mu_a, mu_b and sums of squared
    deviations M_a, M_b, the merged M = M_a + M_b + delta^2 n_a n_b / n.
    The state is three float64 scalars kept on the batch's device, so an
    update costs no host sync.
    """

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros((), dtype=torch.float64)
        self.m2 = torch.zeros((), dtype=torch.float64)

    @property
    def var(self) -> torch.Tensor:
        """Population variance (1 before any data)."""
        return torch.where(self.count > 0, self.m2 / self.count.clamp(min=1), torch.ones_like(self.m2))

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def merge(self, n_b: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor) -> None:
        """Merge a batch given as (count, mean, population variance)."""
        n_b, mean_b, var_b = (torch.as_tensor(v, dtype=torch.float64, device=self.count.device) for v in (n_b, mean_b, var_b))
        n_a = self.count
        n = (n_a + n_b).clamp(min=1)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + var_b * n_b + delta * delta * n_a * n_b / n
        self.count = n_a + n_b

    def update(self, x: torch.Tensor) -> None:
        """Merge the global batch x (all ranks)."""
        self.to(x.device)
        flat = x.detach().reshape(-1)
        count, mean, var = masked_moments(flat, torch.ones_like(flat, dtype=torch.bool), unbiased=False, group=dist.group())
        self.merge(count, mean, var)

    def to(self, device: torch.device) -> "RunningMoments":
        self.count, self.mean, self.m2 = (t.to(device) for t in (self.count, self.mean, self.m2))
        return self

    def state_dict(self) -> dict:
        return {"count": self.count.item(), "mean": self.mean.item(), "m2": self.m2.item()}

    def load_state_dict(self, d: dict) -> None:
        dev = self.count.device
        self.count, self.mean, self.m2 = (torch.tensor(float(d[k]), dtype=torch.float64, device=dev) for k in ("count", "mean", "m2"))


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
    _, _, var_r = masked_moments(returns, mask, unbiased=False, group=dist.group())
    _, _, var_err = masked_moments(returns - values, mask, unbiased=False, group=dist.group())
    return 1.0 - var_err / var_r.clamp(min=1e-8)


def masked_stats(prefix: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """mean, std, min, max of x over mask (all ranks) as device tensors."""
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    _, mean, var = masked_moments(x, m, unbiased=False, group=dist.group())
    big = torch.finfo(torch.float32).max
    return {
        f"{prefix}/mean": mean,
        f"{prefix}/std": var.sqrt(),
        f"{prefix}/min": dist.all_reduce(torch.where(m, x.float(), big).min(), "min"),
        f"{prefix}/max": dist.all_reduce(torch.where(m, x.float(), -big).max(), "max"),
    }


WANDB_ID_FILE = "wandb_run_id"
"""The wandb run's id, kept in the run directory: a resumed run logs to the same wandb run."""


def open_wandb(cfg, run_dir: Path, *, resumed: bool):
    """The wandb run of a `train` config with run.wandb (None without it, and on ranks other than 0): project, name
    and tags from run.wandb_*, the resolved config as its config; WANDB_MODE (e.g. offline) is wandb's own."""
    if not cfg.run.wandb or not dist.is_main():
        return None
    try:
        import wandb  # lazy: the optional `wandb` extra
    except ImportError:
        raise ConfigError("run.wandb is true but wandb is not installed: pip install 'fastppo[wandb]' (or set "
                          "run.wandb=false)") from None
    from omegaconf import OmegaConf

    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None      # None: wandb picks one
    config = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    run = wandb.init(project=cfg.run.wandb_project, name=cfg.run.wandb_name or Path(cfg.run.output_dir).name,
                     tags=list(cfg.run.wandb_tags), config=config, dir=str(run_dir), id=run_id,
                     resume="allow" if run_id else None)
    id_file.write_text(run.id)
    return run


class MetricWriter:
    """Writes one record per iteration to metrics.jsonl, TensorBoard and wandb (main rank only)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_from: int | None = None,
                 wandb=None) -> None:
        """resume_from: the iteration a resumed run restarts after; later records are dropped. wandb: a wandb run
        (`open_wandb`) the scalars are also logged to (finished by `close`)."""
        self.enabled = dist.is_main()
        self.jsonl = None
        self.tb = None
        self.wandb = wandb
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_from is not None and path.exists():
            keep = []
            for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:  # a record cut short by a crash (kill, full disk) while it was written
                    log.warning("%s:%d: dropping an incomplete metrics record", path, lineno)
                    continue
                if isinstance(record, dict) and record.get("iteration", 0) <= resume_from:
                    keep.append(line)
            path.write_text("".join(line + "\n" for line in keep))
        elif resume_from is None and path.exists():
            path.unlink()  # a fresh run starts a fresh log
        purge_step = resume_from + 1 if resume_from is not None else None
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: heavy, only with tensorboard on

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except Exception as exc:  # tensorboard missing or broken: keep training, say so
                log.warning("TensorBoard disabled: %s", exc)

    def write(self, step: int, scalars: dict[str, float], histograms: dict[str, torch.Tensor] | None = None) -> None:
        """One JSONL record (scalars + histogram counts) and the TensorBoard scalars/histograms."""
        if not self.enabled:
            return
        record = {"iteration": step, **{k: _finite_or_str(v) for k, v in scalars.items()}}
        histograms = {k: h[torch.isfinite(h)] for k, h in (histograms or {}).items()}
        histograms = {k: h for k, h in histograms.items() if h.numel() > 0}  # non-finite values are not binned
        record.update({f"{k}/histogram": histogram_counts(h) for k, h in (histograms or {}).items()})
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            for k, h in (histograms or {}).items():
                self.tb.add_histogram(k, h.detach().float().cpu(), step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run directory's metrics.jsonl (a line cut short by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl: give the run directory of `fastppo train` "
                                "(its run.output_dir) or of `fastppo eval`")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "iteration" in record:
            records.append(record)
    return records


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


def bigram_repeats(responses: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(repeated, total) token bigrams of responses (B, R) over mask (B, R), each a 0-d float tensor: a bigram is
    repeated when it occurred earlier in the same response (seq-rep-2, Welleck et al. 2019: 1 - unique / total; bigrams
    because the demo's collapse repeats short phrases, "and gentle and gentle"). Sorting each row's bigram keys
    (a * 2^31 + b: exact in int64 for token ids below 2^31) finds the repeats on the device, with no host sync."""
    if responses.size(1) < 2:
        zero = torch.zeros((), device=responses.device)
        return zero, zero
    valid = mask[:, :-1] & mask[:, 1:]
    key = responses[:, :-1].long() * (1 << 31) + responses[:, 1:].long()
    # Positions outside the mask get distinct negative keys: never equal to each other or to a real bigram.
    key = torch.where(valid, key, -1 - torch.arange(key.size(1), device=key.device))
    ordered = key.sort(dim=1).values
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum()
    return repeated.float(), valid.sum().float()


def experience_metrics(rollout, scored, shaped: torch.Tensor, kl: torch.Tensor, exp, max_new_tokens: int,
                       with_critic: bool = True, with_ref: bool = True) -> dict[str, torch.Tensor]:
    """Rollout-side diagnostics of pattern collapse (Zheng et al. 2023), as device tensors (synced once with the
    rest), from the iteration's `rollout.Rollout`, `experience.Scored`, shaped scores (B,), token KL (B, R) and
    `experience.Experience`. The KL to the reference only with one (`with_ref`), the values' only with a critic."""
    mask = rollout.response_mask
    n_tokens = masked_count(mask, group=dist.group())
    n_rows = float(mask.size(0) * dist.world_size())                 # every rank scores the same number of rows
    seq_kl = dist.all_reduce(kl.sum()) / n_rows
    mean_logprob = dist.all_reduce((scored.old_logprobs * mask).sum()) / n_tokens
    # Cut by a length limit: an answer of rollout.max_new_tokens tokens, or (an environment's trajectories) also
    # env.max_turns / env.max_tokens.
    if rollout.turn_index is None:
        clipped = rollout.lengths >= max_new_tokens
    else:
        per_turn = torch.zeros(mask.size(0), int(rollout.turns.max()) + 1, device=mask.device)
        per_turn.scatter_add_(1, rollout.turn_index + 1, mask.float())          # column 0: the observations
        clipped = rollout.truncated | (per_turn[:, 1:] >= max_new_tokens).any(1)
    repeated, ngrams = dist.all_reduce(torch.stack(bigram_repeats(rollout.responses, mask))).unbind()
    out = {
        **masked_stats("score/raw", scored.scores, ~scored.nonfinite),
        **masked_stats("score/shaped", shaped, ~scored.nonfinite),
        "score/nonfinite": dist.all_reduce(scored.nonfinite.sum().float()),
        **({"kl/ref_per_sequence": seq_kl, "kl/ref_per_token": dist.all_reduce(kl.sum()) / n_tokens}
           if with_ref else {}),
        **({} if scored.old_entropy is None else
           {"policy/entropy": dist.all_reduce((scored.old_entropy * mask).sum()) / n_tokens}),
        "policy/perplexity": torch.exp(-mean_logprob),
        "response/length_mean": n_tokens / n_rows,
        "response/length_max": dist.all_reduce(rollout.lengths.max().float(), "max"),
        "response/clipped_frac": dist.all_reduce(clipped.float().sum()) / n_rows,
        "response/no_eos_frac": dist.all_reduce((~rollout.ended).float().sum()) / n_rows,
        "response/repeat_frac": repeated / ngrams.clamp(min=1),
        "response/tokens": n_tokens,
        "response/total_tokens": masked_count(rollout.attention_mask, group=dist.group()),  # prompt + response tokens
        **masked_stats("advantages", exp.advantages, mask),
        **masked_stats("returns", exp.returns, mask),
        "reward/token_mean": dist.all_reduce(exp.rewards.sum()) / n_rows,
    }
    if with_critic:
        out.update({**masked_stats("values", exp.old_values, mask),
                    "values/explained_variance_old": explained_variance(exp.old_values, exp.returns, mask)})
    return out
