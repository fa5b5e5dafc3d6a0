"""Argument checks shared by the fused ops: every error names the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_tensor(name: str, x, *, dtypes: Sequence[torch.dtype] | None = None, min_dim: int = 0) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).removeprefix('torch.')}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def check_number(name: str, value, *, integer: bool = False, allow_none: bool = False, finite: bool = False):
    """value: a real number (Python or NumPy scalar, not a bool), finite when `finite`; returned as float (int when
    `integer`)."""
    if value is None and allow_none:
        return None
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool) or type(value).__name__ == "bool_":
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what}{' or None' if allow_none else ''}, got {type(value).__name__}")
    if integer:
        return int(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must share a device")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def check_positive(name: str, value: float) -> float:
    """value: a finite number > 0, returned as a Python float (a NumPy scalar would reach the kernels as such)."""
    value = check_number(name, value, finite=True)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_non_negative(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not check_number(name, value, allow_none=allow_none) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_dual_clip(dual_clip) -> float | None:
    """dual_clip: None, or a number c > 1 (the bound −c·A of the surrogate for A < 0)."""
    if dual_clip is None:
        return None
    if not check_number("dual_clip", dual_clip, allow_none=True) > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    return float(dual_clip)


def check_clip_range(clip_eps, clip_eps_high) -> tuple[float, float]:
    """(ε, ε_high) of the ratio's clip range [1 − ε, 1 + ε_high]; clip_eps_high None means ε."""
    check_non_negative("clip_eps", clip_eps)
    check_non_negative("clip_eps_high", clip_eps_high, allow_none=True)
    return float(clip_eps), float(clip_eps if clip_eps_high is None else clip_eps_high)


RATIO_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("ppo", "cispo")


def check_policy_loss_kind(ratio_level, policy_loss, dual_clip) -> tuple[bool, bool]:
    """(sequence, cispo) from ratio_level ("token" | "sequence") and policy_loss ("ppo" | "cispo"); CISPO has no
    dual clip (it bounds PPO's surrogate)."""
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {policy_loss!r}")
    if policy_loss == "cispo" and dual_clip is not None:
        raise ValueError("dual_clip bounds PPO's surrogate; with policy_loss='cispo' pass dual_clip=None")
    return ratio_level == "sequence", policy_loss == "cispo"


def check_normalizer(normalizer, ref_name: str, ref: torch.Tensor) -> torch.Tensor | float | None:
    """normalizer: None, a number ≥ 0 (-> float) or a 1-element real tensor on ref's device (-> 0-dim float32)."""
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 1-element tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must have a real dtype, got {normalizer.dtype}")
        check_same_device("normalizer", normalizer, ref_name, ref)
        return normalizer.detach().reshape(()).to(torch.float32)
    if normalizer is None:
        return None
    check_non_negative("normalizer", normalizer)
    return float(normalizer)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_policy_weight(weight, mask: torch.Tensor, ref_name: str, ref: torch.Tensor, what: str) -> None:
    """policy_weight: None, or a float tensor of mask's shape on ref's device, finite and ≥ 0 where mask is set.

    The values are checked on CPU only, where reading them costs no host sync
    (as for labels); on a GPU a NaN or infinite weight makes the loss
    non-finite, which the trainer's non-finite step guard reports.
    """
    if weight is None:
        return
    check_tensor("policy_weight", weight, dtypes=(*FLOAT_DTYPES, torch.float64))
    check_same_device("policy_weight", weight, ref_name, ref)
    check_shape("policy_weight", weight, mask.shape, what)
    if weight.device.type == "cpu":
        bad = (~torch.isfinite(weight) | (weight < 0)) & (mask != 0)
        if bool(bad.any()):
            raise ValueError(f"policy_weight must be finite and >= 0 where mask is set; found {weight[bad][0].item()}")


def check_lm_head(hidden, weight, vocab_size) -> int:
    """hidden (..., H) and an lm_head weight (V, H) of hidden's float dtype and device; returns the number of
    real vocabulary rows (`check_vocab_size`)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({str(hidden.dtype).removeprefix('torch.')}), "
                        f"got {str(weight.dtype).removeprefix('torch.')}")
    check_same_device("weight", weight, "hidden", hidden)
    size_h = hidden.shape[-1]
    if weight.shape[1] != size_h:
        raise ValueError(f"weight must have shape (V, {size_h}) (H = the last dimension of hidden), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have a non-empty first (vocabulary) dimension")
    return check_vocab_size(vocab_size, weight.shape[0], "the rows of weight")


def check_ignore_index(ignore_index) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_vocab_size(vocab_size, width: int, what: str) -> int:
    """The number of real vocabulary columns: ``vocab_size``, or ``width`` (all columns) when it is None."""
    if vocab_size is None:
        return width
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= width:
        raise ValueError(f"vocab_size must lie in [1, {width}] ({what}), got {vocab_size}")
    return vocab_size


def check_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int | None = None,
                          name: str = "labels", *, where: torch.Tensor | None = None) -> None:
    """Labels must lie in [0, vocab_size), except where they equal ignore_index or where `where` is False.

    On CPU a clear ValueError (the host sync is free there). On a GPU the check
    runs on the device (``torch._assert_async``): no host sync in the hot path;
    a bad label makes a later CUDA call fail with a device-side assert (run on
    CPU, or with CUDA_LAUNCH_BLOCKING=1, to see which argument). The kernels
    never read out of bounds either way: their one indexed load is masked.
    """
    bad = (labels < 0) | (labels >= vocab_size)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if where is not None:
        bad &= where
    allowed = f"[0, {vocab_size})"
    if ignore_index is not None:
        allowed += f" or equal ignore_index={ignore_index}"
    if where is not None:
        allowed += " where mask is set"
    if labels.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{name} must lie in {allowed}")
        return
    if bool(bad.any()):
        value = labels[bad].flatten()[0].item()
        raise ValueError(f"{name} must lie in {allowed}; found {value}")


def as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """View (..., width) as (rows, width) without copying when the strides allow it.

    Only an input whose leading dimensions cannot be merged (e.g. a transposed
    batch) is copied, in its own dtype.
    """
    try:
        return x.view(-1, width)
    except RuntimeError:
        return x.reshape(-1, width)
