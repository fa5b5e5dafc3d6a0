"""Layout helpers shared by the (B, T) RL ops: kl_penalty, gae, ppo_loss.

Their kernels take each input as a (rows, T) matrix with its own row stride
and a unit stride along T, so slices such as ``logprobs[:, -T:]`` are read in
place; only inputs whose last dimension is itself strided are copied.
"""

from __future__ import annotations

import math

import torch

from ._checks import FLOAT_DTYPES, INT_DTYPES, as_rows
from ._dispatch import triton_interpreter_enabled

# A mask may be bool or any integer or floating dtype; nonzero means valid.
MASK_DTYPES = (torch.bool, *INT_DTYPES, *FLOAT_DTYPES, torch.float64)


def rows_unit_stride(x: torch.Tensor) -> torch.Tensor:
    """View x (..., T) as (rows, T) with stride 1 along T, copying (in x's dtype) only when it must."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.shape[-1] == 0:                       # view(-1, 0) cannot infer the number of rows
        return x.reshape(math.prod(x.shape[:-1]), 0)
    x2 = as_rows(x, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def loadable_mask(mask2d: torch.Tensor) -> torch.Tensor:
    """A bool mask is handed to Triton as the same bytes viewed as uint8 (no copy)."""
    return mask2d.view(torch.uint8) if mask2d.dtype == torch.bool else mask2d


def valid_of(mask: torch.Tensor) -> torch.Tensor:
    """The bool tensor "mask is nonzero" (the mask itself when it is already bool)."""
    return mask if mask.dtype == torch.bool else mask != 0


def tile_shape(n_cols: int, elements: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_T) of a power-of-two tile of `elements` entries, as wide along T as T allows.

    The interpreter costs ~1 ms per program per loop trip whatever the tile
    size, so under it a tile holds 65536 entries.
    """
    if triton_interpreter_enabled():
        elements = 1 << 16
    block_t = min(1 << max(0, n_cols - 1).bit_length(), elements)
    return max(1, elements // block_t), block_t
