"""Masked reductions and whitening, optionally global over the ranks of a process group.

A mask is bool or any numeric dtype; nonzero means valid (it is a selection,
not a weight). Values at invalid positions are never used, so they may hold
anything, NaN included. Statistics are accumulated in float32 (float64 for
float64 input) and returned as tensors: nothing here synchronises with the
host.

With ``group`` given, the sums behind every statistic are all-reduced over
that group, so each rank gets the statistics of the concatenation of all
ranks' valid entries (ranks may hold different numbers of rows or tokens).
``group=None`` means local statistics with no communication, whether or not
torch.distributed is initialised; pass ``torch.distributed.group.WORLD`` for
all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["masked_sum", "masked_count", "masked_mean", "masked_moments", "masked_var", "masked_whiten"]


def _check(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The bool selection; x and mask must be tensors of one shape on one device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"x must have a floating dtype, got {x.dtype}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or a real dtype, got {mask.dtype}")
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}; they must share a device")
    return mask if mask.dtype == torch.bool else mask != 0


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _sum_and_count(x, valid, dim, group):
    """(Σ valid x, number of valid entries), both in the accumulation dtype, one all-reduce."""
    acc = _acc_dtype(x)
    zero = torch.zeros((), dtype=acc, device=x.device)
    total = torch.where(valid, x.to(acc), zero).sum(dim=dim)
    count = valid.sum(dim=dim, dtype=acc)
    both = _all_reduce(torch.stack([total, count]), group)
    return both[0], both[1]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *, group=None) -> torch.Tensor:
    """Σ x over the valid entries (over all of them, or along `dim`), all-reduced over `group`."""
    return _sum_and_count(x, _check(x, mask), dim, group)[0]


def masked_count(mask: torch.Tensor, dim: int | None = None, *, group=None) -> torch.Tensor:
    """Number of valid entries as a float32 tensor, all-reduced over `group`."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    return _all_reduce(valid.sum(dim=dim, dtype=torch.float32), group)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *, group=None) -> torch.Tensor:
    """Mean of x over the valid entries (0 where there are none), global over `group`."""
    total, count = _sum_and_count(x, _check(x, mask), dim, group)
    return total / count.clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True,
                   group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, variance) of x over all valid entries, global over `group`.

    Two passes (mean first, then the centred sum of squares), so a large mean
    does not cancel; two all-reduces with a group. ``unbiased`` divides by
    n − 1 (n the global count), else by n (population variance); the divisor
    is at least 1, so one or no valid entry gives 0.
    """
    valid = _check(x, mask)
    total, count = _sum_and_count(x, valid, None, group)
    mean = total / count.clamp(min=1)
    acc = _acc_dtype(x)
    zero = torch.zeros((), dtype=acc, device=x.device)
    sq = _all_reduce(torch.where(valid, (x.to(acc) - mean).square(), zero).sum(), group)
    return count, mean, sq / (count - 1 if unbiased else count).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, group=None) -> torch.Tensor:
    """Variance of x over all valid entries, global over `group` (see `masked_moments`)."""
    return masked_moments(x, mask, unbiased=unbiased, group=group)[2]


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = True,
                  eps: float = 1e-8, group=None) -> torch.Tensor:
    """(x − μ)/√(σ² + eps) over the valid entries, with μ and σ² global over `group`.

    μ and σ² are the mean and (by default unbiased) variance of all valid
    entries, on every rank of `group` together: whitening each rank's shard
    with a group equals whitening the concatenated batch. With
    ``shift_mean=False`` the mean is added back (scale only), as TRL and
    OpenRLHF do for advantages. Invalid positions get 0. Returns float32
    (float64 for float64 input).
    """
    valid = _check(x, mask)
    _, mean, var = masked_moments(x, valid, unbiased=unbiased, group=group)
    acc = _acc_dtype(x)
    white = (x.to(acc) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(valid, white, torch.zeros((), dtype=acc, device=x.device))
