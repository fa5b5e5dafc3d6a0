"""gae: generalised advantage estimation over each row's valid tokens, one launch for the batch.

Every public trainer runs GAE as a Python loop over reversed(range(T)), 5–13
small kernels per step: T·(5..13) launches, each reading and writing a (B,)
column. The fused kernel reads rewards, values and the mask once (plus one
shifted re-read of values and mask that hits the cache) and writes advantages
and returns once: about 4 + 4 + 1 + 8 = 17 bytes per token in fp32, in one
launch. Each program owns one row and walks it from the end in blocks of
BLOCK_T tokens, each block loaded in reverse (lane j holds token T−1−j of the
row's tail), so the backward recursion is a forward associative scan of affine
maps x ↦ a·x + b, in fp32. Compiled Triton has had open bugs in reverse scans
(the scan's reverse flag) with such non-commutative combine functions; the forward
scan is the well-trodden path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from ._dispatch import empty_output, on_device_of, resolve_backend, triton_interpreter_enabled
from ._layout import MASK_DTYPES, loadable_mask, rows_unit_stride
from . import torch_backend


# ----------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _gae_scan_combine(a_acc, b_acc, a_cur, b_cur):
    """Compose the steps of x_j = a_j·x_(j−1) + b_j: (a_acc, b_acc) already covers the earlier lanes.

    A device function for the forward tl.associative_scan in _gae_fwd_kernel,
    compiled inside it (it is not a kernel of its own). Lane j holds token
    T−1−j of the block, so earlier lanes are later tokens.
    """
    return a_acc * a_cur, b_acc * a_cur + b_cur


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    n_cols, stride_rm, stride_vm, stride_mm, stride_om, gamma, lam,
    BLOCK_T: tl.constexpr,
):
    """One program per row, blocks from the last to the first, each read in reverse.

    Lane j of block i holds token t = T − 1 − i·BLOCK_T − j, so the backward
    (suffix) recursions of GAE are forward scans over the lanes: a plain
    forward tl.associative_scan, no reverse scan. Two scans per block, each
    carried across blocks by one scalar:
      1. next_value_t = V of the first valid token after t (0 after the last):
         x_t = (1 − m_(t+1))·x_(t+1) + m_(t+1)·V_(t+1), read through a load
         shifted by one token (lane j − 1's token); lane 0 takes the carry.
      2. A_t = δ_t + γλ·A_(next valid) on valid tokens, A_t = A_(t+1) across
         holes: x_t = a_t·x_(t+1) + b_t with (a, b) = (γλ, δ_t) or (1, 0).
    Invalid tokens read as 0 (whatever they hold, NaN included) and get 0.
    Loads and stores walk addresses downwards, so they are not vectorised:
    the op moves ~17 bytes per token and is bound by its one launch.
    """
    row = tl.program_id(0).to(tl.int64)
    g = tl.cast(gamma, tl.float32)
    gl = g * tl.cast(lam, tl.float32)
    r_row = rewards_ptr + row * stride_rm
    v_row = values_ptr + row * stride_vm
    m_row = mask_ptr + row * stride_mm
    o_row = row * stride_om
    lanes = tl.arange(0, BLOCK_T)
    is_first_lane = lanes == 0
    is_last_lane = lanes == BLOCK_T - 1
    next_value = tl.cast(0.0, tl.float32)      # V of the first valid token at or after the block's end
    next_adv = tl.cast(0.0, tl.float32)        # A of that token (0 past the episode)
    n_blocks = tl.cdiv(n_cols, BLOCK_T)
    for i in range(0, n_blocks):
        t = (n_cols - 1 - i * BLOCK_T) - lanes  # descending: lane 0 is the block's last token
        in_row = t >= 0
        valid = tl.load(m_row + t, mask=in_row, other=0) != 0
        v = tl.where(valid, tl.load(v_row + t, mask=in_row, other=0.0).to(tl.float32), 0.0)
        r = tl.where(valid, tl.load(r_row + t, mask=in_row, other=0.0).to(tl.float32), 0.0)
        # 1. value of the next valid token (token t + 1 is lane j − 1, or the carry for lane 0)
        shifted = in_row & (lanes > 0)
        valid_1 = tl.load(m_row + t + 1, mask=shifted, other=0) != 0
        v_1 = tl.where(valid_1, tl.load(v_row + t + 1, mask=shifted, other=0.0).to(tl.float32), 0.0)
        a = tl.where(valid_1 | is_first_lane, 0.0, 1.0)
        b = tl.where(is_first_lane, next_value, v_1)
        _, v_next = tl.associative_scan((a, b), 0, _gae_scan_combine)
        # 2. advantages, carried in from the block to the right
        delta = r + g * v_next - v
        a = tl.where(valid, gl, 1.0)
        b = tl.where(valid, delta, 0.0)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _gae_scan_combine)
        adv = b_cum + a_cum * next_adv
        tl.store(adv_ptr + o_row + t, tl.where(valid, adv, 0.0), mask=in_row)
        tl.store(ret_ptr + o_row + t, tl.where(valid, adv + v, 0.0), mask=in_row)
        # carries for the block to the left: the state at this block's first token (the last lane;
        # only the row's first block can have lanes past t = 0, and nothing follows it)
        next_adv = tl.sum(tl.where(is_last_lane, adv, 0.0), axis=0)
        next_value = tl.sum(tl.where(is_last_lane, tl.where(valid, v, v_next), 0.0), axis=0)


# ----------------------------------------------------------------------------
# 2. Launchers: check, allocate, launch
# ----------------------------------------------------------------------------

def _block_t(n_cols: int) -> int:
    # The interpreter runs a scan's combine function once per element in Python
    # (~0.2 ms each), so padding lanes cost more than loop trips there: 64-token
    # blocks (T=257, B=5: 0.65 s against 0.94 s for one 512-token block).
    cap = 64 if triton_interpreter_enabled() else 2048
    return min(triton.next_power_of_2(max(n_cols, 1)), cap)


def _gae_triton(rewards2d, values2d, mask2d, gamma, lam, *, block_t: int | None = None):
    """rewards, values, mask (N, T) with unit stride along T -> (advantages, returns) (N, T) float32."""
    n_rows, n_cols = rewards2d.shape
    out = empty_output((2, n_rows, n_cols), torch.float32, rewards2d.device)
    if n_rows * n_cols == 0:
        return out[0], out[1]
    block_t = block_t or _block_t(n_cols)
    mask2d = loadable_mask(mask2d)
    with on_device_of(rewards2d):
        _gae_fwd_kernel[(n_rows,)](
            rewards2d, values2d, mask2d, out[0], out[1],
            n_cols, rewards2d.stride(0), values2d.stride(0), mask2d.stride(0), out.stride(1),
            float(gamma), float(lam),
            BLOCK_T=block_t, num_warps=8 if block_t >= 2048 else 4,
        )
    return out[0], out[1]


# ----------------------------------------------------------------------------
# 3. Autograd: none. Advantages and returns are targets; the op records no
#    graph and its outputs do not require grad.
# ----------------------------------------------------------------------------

# ----------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------

def _check_discount(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


class AdvantagesAndReturns(NamedTuple):
    advantages: torch.Tensor
    returns: torch.Tensor


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95,
        backend: str | None = None) -> AdvantagesAndReturns:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's valid tokens.

    Each row's valid tokens (mask nonzero), taken in order, are one episode;
    holes and left or right padding are allowed. With t and t' consecutive
    valid tokens of a row:
        δ_t = r_t + γ·V_t' − V_t   (V after the last valid token is 0)
        A_t = δ_t + γλ·A_t'        (A after the last valid token is 0)
        R_t = A_t + V_t
    Invalid positions get 0 in both outputs and their inputs are never read,
    so they may hold anything (even NaN).

    Args:
        rewards: (..., T) float32, bfloat16 or float16: per-token rewards.
        values: same shape, any of those dtypes: V(s_t) from the critic.
        mask: same shape; bool, or any integer or floating dtype (nonzero = valid).
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1].
        backend: ``None`` (triton on CUDA, torch elsewhere; ``FASTPPO_BACKEND``
            overrides), ``"triton"`` or ``"torch"``.

    Returns:
        ``(advantages, returns)`` as a named tuple, both (..., T) float32
        (empty when the inputs are). Not differentiable.
        On CUDA the whole batch is one kernel launch with fp32 arithmetic.
    """
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("values", values, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask, dtypes=MASK_DTYPES)
    check_same_device("values", values, "rewards", rewards)
    check_same_device("mask", mask, "rewards", rewards)
    check_shape("values", values, rewards.shape, "the shape of rewards")
    check_shape("mask", mask, rewards.shape, "the shape of rewards")
    numbers = all(isinstance(v, (int, float)) for v in (gamma, lam))
    gamma, lam = (_cached_discounts if numbers else _discounts)(gamma, lam)
    backend = resolve_backend(backend, rewards, "rewards")
    if rewards.numel() == 0:                   # no token: empty outputs, on either backend
        out = torch.zeros((2, *rewards.shape), dtype=torch.float32, device=rewards.device)
        return AdvantagesAndReturns(out[0], out[1])

    r2d, v2d, m2d = rows_unit_stride(rewards), rows_unit_stride(values), rows_unit_stride(mask)
    if backend == "triton":                    # a launch: never part of a graph
        adv, ret = _gae_triton(r2d, v2d, m2d, gamma, lam)
    elif torch.is_grad_enabled() and (rewards.requires_grad or values.requires_grad):
        with torch.no_grad():                  # targets: no graph through the torch ops
            adv, ret = torch_backend.gae(r2d, v2d, m2d, gamma, lam)
    else:
        adv, ret = torch_backend.gae(r2d, v2d, m2d, gamma, lam)
    return AdvantagesAndReturns(adv.view(rewards.shape), ret.view(rewards.shape))


def _discounts(gamma, lam) -> tuple[float, float]:
    return _check_discount("gamma", gamma), _check_discount("lam", lam)


# A trainer passes the same pair every call: then the checks cost one dictionary lookup (typed: True is not 1).
_cached_discounts = functools.lru_cache(maxsize=64, typed=True)(_discounts)
