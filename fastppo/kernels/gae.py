"""gae: generalised advantage estimation over each row's valid tokens, one launch for the batch.

Every public trainer runs GAE as a Python loop over reversed(range(T)), 5–13
small kernels per step: T·(5..13) launches, each reading and writing a (B,)
column. The fused kernel reads rewards, values and the mask once (below λ = ½
also the next token's mask and value, from the cache) and writes advantages
and returns once: 4 + 4 + 1 + 8 = 17 bytes per token in fp32, in one
launch. Each program owns BLOCK_M rows and walks them from the end in blocks of
BLOCK_T tokens, each block loaded in reverse (lane j holds token T−1−j of the
row's tail), so the backward recursion is a forward associative scan of affine
maps x ↦ a·x + b, in fp32: one scan per block for λ ≥ 1/2 (the λ-return form,
see the kernel), two below. Compiled Triton has had open bugs in reverse scans
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
def _gae_max_combine(x, y):
    """The larger of two lane numbers: the forward max-scan in _gae_fwd_kernel (compiled inside it)."""
    return tl.maximum(x, y)


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    n_rows, n_cols, stride_rm, stride_vm, stride_mm, stride_om, gamma, lam,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, ONE_SCAN: tl.constexpr,
):
    """BLOCK_M rows per program, each walked from its end in blocks of BLOCK_T tokens read in reverse.

    Lane j of block i holds token t = T − 1 − i·BLOCK_T − j, so the backward
    (suffix) recursions of GAE are forward scans over the lanes: a plain
    forward tl.associative_scan along axis 1, no reverse scan, each carried
    across blocks by one value per row. With t' the next valid token after t:

    ONE_SCAN (λ ≥ 1/2): the λ-return form. Z_t = λ·A_t + V_t obeys one recursion,
        Z_t = λ·(r_t + γ·V_t' − V_t + γλ·A_t') + V_t = λ·r_t + (1 − λ)·V_t + γλ·Z_t'
    (Z after the last valid token is 0): one scan of x ↦ a·x + b with (a, b) =
    (γλ, λ·r_t + (1 − λ)·V_t) on valid tokens and (1, 0) across holes, then
    A_t = (Z_t − V_t)·(1/λ), which scales the scan's rounding by 1/λ ≤ 2.
    Otherwise two scans: next_value_t = V_t' (a max-scan finds the lane of the nearest valid token to the
    right, whose V is then loaded; lane 0 takes the carry), then A_t = δ_t + γλ·A_t' with (a, b) = (γλ, δ_t)
    or (1, 0).

    Invalid tokens read as 0 (whatever they hold, NaN included) and get 0.
    Loads and stores walk addresses downwards, so they are not vectorised.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    g = tl.cast(gamma, tl.float32)
    lam32 = tl.cast(lam, tl.float32)
    gl = g * lam32
    if ONE_SCAN:
        inv_lam = 1.0 / lam32
    r_row = (rewards_ptr + rows * stride_rm)[:, None]
    v_row = (values_ptr + rows * stride_vm)[:, None]
    m_row = (mask_ptr + rows * stride_mm)[:, None]
    o_row = (rows * stride_om)[:, None]
    lanes = tl.arange(0, BLOCK_T)[None, :]
    is_last_lane = lanes == BLOCK_T - 1
    carry = tl.zeros((BLOCK_M,), tl.float32)        # Z (or A) of the first valid token at or after the block's end
    next_value = tl.zeros((BLOCK_M,), tl.float32)   # two scans: V of that token
    n_blocks = tl.cdiv(n_cols, BLOCK_T)
    for i in range(0, n_blocks):
        t = (n_cols - 1 - i * BLOCK_T) - lanes      # descending: lane 0 is the block's last token
        in_row = row_ok[:, None] & (t >= 0)
        valid = tl.load(m_row + t, mask=in_row, other=0) != 0
        v = tl.where(valid, tl.load(v_row + t, mask=in_row, other=0.0).to(tl.float32), 0.0)
        r = tl.where(valid, tl.load(r_row + t, mask=in_row, other=0.0).to(tl.float32), 0.0)
        a = tl.where(valid, gl, 1.0)
        if ONE_SCAN:
            b = tl.where(valid, lam32 * r + (1.0 - lam32) * v, 0.0)
            a_cum, b_cum = tl.associative_scan((a, b), 1, _gae_scan_combine)
            z = b_cum + a_cum * carry[:, None]
            adv = (z - v) * inv_lam
            carry = tl.sum(tl.where(is_last_lane, z, 0.0), axis=1)
        else:
            # 1. value of the next valid token (token t + 1 is lane j − 1, or the carry for lane 0)
            #    = V at the last lane before j whose token is valid: a max-scan of those lanes' numbers,
            #    then one (cached) load of V there
            valid_1 = tl.load(m_row + t + 1, mask=in_row & (lanes > 0), other=0) != 0
            last = tl.associative_scan(tl.where(valid_1, lanes - 1, -1), 1, _gae_max_combine)
            found = last >= 0
            v_next = tl.load(v_row + t + (lanes - last), mask=in_row & found, other=0.0).to(tl.float32)
            v_next = tl.where(found, v_next, next_value[:, None])
            # 2. advantages, carried in from the block to the right
            b = tl.where(valid, r + g * v_next - v, 0.0)
            a_cum, b_cum = tl.associative_scan((a, b), 1, _gae_scan_combine)
            adv = b_cum + a_cum * carry[:, None]
            # carries for the block to the left: the state at this block's first token (the last lane; only
            # the row's first block can have lanes past t = 0, and nothing follows it)
            carry = tl.sum(tl.where(is_last_lane, adv, 0.0), axis=1)
            next_value = tl.sum(tl.where(is_last_lane, tl.where(valid, v, v_next), 0.0), axis=1)
        tl.store(adv_ptr + o_row + t, tl.where(valid, adv, 0.0), mask=in_row)
        tl.store(ret_ptr + o_row + t, tl.where(valid, adv + v, 0.0), mask=in_row)


# ----------------------------------------------------------------------------
# 2. Launchers: check, allocate, launch
# ----------------------------------------------------------------------------

ONE_SCAN_MIN_LAM = 0.5
"""From this λ up the kernel scans once (the λ-return form), its rounding scaled by at most 1/λ = 2."""


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_T): a row's tokens in blocks of up to 1024, shorter rows stacked up to 512 elements a
    program (4 warps: 4 to 8 tokens a thread, so the scan's in-thread part carries most of it; sm_90 SASS,
    one scan: ~92 instructions per bf16 token at 1024 against ~116 at 2048 with 8 warps, bench/sass_counts.py)."""
    # The interpreter runs a scan's combine function once per element in Python
    # (~0.2 ms each), so padding lanes cost more than loop trips there: 64-element
    # programs (T=257, B=5: 0.65 s against 0.94 s for one 512-token block).
    per_program = 64 if triton_interpreter_enabled() else 1024
    block_t = min(triton.next_power_of_2(max(n_cols, 1)), per_program)
    if block_t < per_program:          # several rows: 512 elements (at 1024, ptxas spills [8, 128] on sm_80)
        per_program //= 2
    block_m = min(triton.next_power_of_2(max(n_rows, 1)), max(1, per_program // block_t))
    return block_m, block_t


def _gae_triton(rewards2d, values2d, mask2d, gamma, lam, *, block_t: int | None = None, block_m: int | None = None):
    """rewards, values, mask (N, T) with unit stride along T -> (advantages, returns) (N, T) float32."""
    n_rows, n_cols = rewards2d.shape
    out = empty_output((2, n_rows, n_cols), torch.float32, rewards2d.device)
    if n_rows * n_cols == 0:
        return out[0], out[1]
    auto_m, auto_t = _blocks(n_rows, n_cols)
    block_t = block_t or auto_t
    block_m = block_m or (auto_m if block_t == auto_t else 1)
    mask2d = loadable_mask(mask2d)
    with on_device_of(rewards2d):
        _gae_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            rewards2d, values2d, mask2d, out[0], out[1],
            n_rows, n_cols, rewards2d.stride(0), values2d.stride(0), mask2d.stride(0), out.stride(1),
            float(gamma), float(lam),
            BLOCK_M=block_m, BLOCK_T=block_t, ONE_SCAN=lam >= ONE_SCAN_MIN_LAM,
            num_warps=8 if block_m * block_t >= 2048 else 4,     # 8: forced blocks of 2048 and more
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
