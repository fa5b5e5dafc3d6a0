"""Distributed helpers. Every cross-rank reduction in the trainer goes through here.

This is the single-process version: the helpers are identities when
torch.distributed is not initialised, and all-reduce over the default group
when it is. Sharding (FSDP2, `fully_shard`) and unshard-for-generation come
with issue 7; the call sites already pass everything global through these
functions (token-mean normalisers, reward moments, whitening, metrics).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but CUDA is not available")
    return device


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (a new tensor; x itself untouched)."""
    if not is_initialized():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.MIN)
    return y


def global_count(mask: torch.Tensor) -> torch.Tensor:
    """Number of true entries of mask over all ranks, as a float32 scalar tensor (no host sync)."""
    return all_reduce_sum(mask.sum().to(torch.float32))


def global_moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, population variance) of x[mask] over all ranks, as float32 tensors.

    One all-reduce of [count, sum, sum of squares]; the variance is computed
    around the global mean in a second pass over local data so that large
    means do not cancel.
    """
    x = x.float()
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    xm = torch.where(m, x, 0.0)
    stats = all_reduce_sum(torch.stack([m.sum().float(), xm.sum()]))
    count = stats[0]
    mean = stats[1] / count.clamp(min=1)
    sq = all_reduce_sum(torch.where(m, (x - mean) ** 2, 0.0).sum())
    return count, mean, sq / count.clamp(min=1)


def gather_for_metrics(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor over ranks (for histograms); identity in one process."""
    if not is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())  # equal sizes: every rank scores the same number of rollouts
    return torch.cat(parts)
