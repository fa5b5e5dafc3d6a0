"""Argument checks shared by the fused ops: every error names the argument."""

from __future__ import annotations

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


def check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must share a device")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_non_negative(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number{' or None' if allow_none else ''}, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


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
