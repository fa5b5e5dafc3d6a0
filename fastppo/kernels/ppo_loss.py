"""ppo_loss: clipped policy surrogate, clipped value loss and their statistics in one pass.

Composite PyTorch runs ~30 elementwise ops and 7 reductions over (B, T),
each reading and writing float32 temporaries (~250 bytes per token), and
autograd keeps several of them for backward. The fused forward reads the seven
inputs once (6·4 + 1 = 25 bytes per token in fp32) and writes 8 floats; the
backward reads them once more and writes dlogprobs and dvalues (8 bytes per
token), recomputing ratio and clip decisions instead of saving them.

GSPO's sequence ratio (ratio_level="sequence") enters as one more (rows,)
input, each row's mean log-ratio, computed by a differentiable torch reduction
(`sequence_log_ratio`): the kernels use exp of it as the ratio, and the
backward's per-token slopes are summed per row, autograd spreading them over
the row's tokens. CISPO (policy_loss="cispo") is a switch of the per-token
math (_math.policy_surrogate).

Forward: each program sums its share of (BLOCK_M, BLOCK_T) tiles into
per-lane fp32 accumulators. A batch of at most 8 tiles (16384 tokens on a
GPU) is one program and one launch; a larger one writes per-program partial
sums that a one-program kernel adds up in a fixed order (two launches, no
atomics, deterministic).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES, check_clip_range, check_dual_clip, check_non_negative, check_normalizer, check_policy_loss_kind,
    check_policy_weight, check_same_device, check_shape, check_tensor,
)
from ._dispatch import empty_output, on_device_of, resolve_backend
from ._layout import MASK_DTYPES, loadable_mask, rows_unit_stride, tile_shape
from ._math import clipped_value_error, policy_surrogate
from . import torch_backend

# Partial sums per program: pg, vf, clipped, value-clipped, kl, ratio, count (+1 pad).
_N_PARTIALS = 8


# ----------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, in_bounds, valid):
    """A float32 tile, loaded under the bounds only (so that loads vectorise), 0 off the token mask whatever
    it holds there (NaN included)."""
    return tl.where(valid, tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _load_rows(ptr, rows, n_rows):
    """A (BLOCK_M,) float32 vector of per-row values (0 past the last row)."""
    return tl.load(ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32)


@triton.jit
def _write_results(out_ptr, norm_ptr, s_pg, s_vf, s_clip, s_vclip, s_kl, s_ratio, s_count, vf_coef, normalizer,
                   NORM_MODE: tl.constexpr):
    """The 8 results from the token sums (s_vf already halved): loss, the 6 means, the normalizer n.

    NORM_MODE: 0 = n is the valid-token count, 1 = `normalizer`, 2 = the
    scalar at norm_ptr. A normalizer ≤ 0 becomes 1.
    """
    if NORM_MODE == 0:
        n = s_count
    elif NORM_MODE == 1:
        n = tl.cast(normalizer, tl.float32)
    else:
        n = tl.load(norm_ptr).to(tl.float32)
    n = tl.where(n > 0.0, n, 1.0)
    tl.store(out_ptr + 0, s_pg / n + tl.cast(vf_coef, tl.float32) * (s_vf / n))
    tl.store(out_ptr + 1, s_pg / n)
    tl.store(out_ptr + 2, s_vf / n)
    tl.store(out_ptr + 3, s_clip / n)
    tl.store(out_ptr + 4, s_vclip / n)
    tl.store(out_ptr + 5, s_kl / n)
    tl.store(out_ptr + 6, s_ratio / n)
    tl.store(out_ptr + 7, n)


@triton.jit
def _ppo_loss_fwd_kernel(
    lp_ptr, old_lp_ptr, adv_ptr, val_ptr, old_val_ptr, ret_ptr, mask_ptr, w_ptr, seq_ptr, norm_ptr, partial_ptr,
    out_ptr, n_rows, n_cols, tiles_per_program,
    stride_lm, stride_om, stride_am, stride_vm, stride_wm, stride_rm, stride_mm, stride_xm,
    clip_eps, clip_eps_high, value_clip, dual_clip, vf_coef, normalizer,
    HAS_VALUE_CLIP: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, NORM_MODE: tl.constexpr,
    SEQ_RATIO: tl.constexpr, CISPO: tl.constexpr,
    ONE_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Sums over this program's tiles of the per-token terms (all 0 off the mask):

      pg = the weighted policy term (_math.policy_surrogate: PPO's clipped surrogate, or CISPO's; w at w_ptr
           when HAS_WEIGHT) at the token's ratio, or with SEQ_RATIO at its row's exp(seq_ptr[row]) (GSPO)
      vf = ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²)
      clipped = the policy term took a clipped branch; vclipped likewise
      kl = (ρ − 1) − log ρ,  ρ,  1
    With ONE_PROGRAM the 8 results (_write_results), else the 7 sums at partial_ptr.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_col_tiles = tl.cdiv(n_cols, BLOCK_T)
    acc_pg = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    acc_vf = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    acc_vclip = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    acc_count = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    for i in range(0, tiles_per_program):
        tile = pid * tiles_per_program + i
        rows = (tile // n_col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile % n_col_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_bounds = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        r2, c2 = rows[:, None], cols[None, :]
        valid = tl.load(mask_ptr + r2 * stride_mm + c2, mask=in_bounds, other=0) != 0
        lp = _load_tile(lp_ptr + r2 * stride_lm + c2, in_bounds, valid)
        log_ratio = lp - _load_tile(old_lp_ptr + r2 * stride_om + c2, in_bounds, valid)
        adv = _load_tile(adv_ptr + r2 * stride_am + c2, in_bounds, valid)
        w = _load_tile(w_ptr + r2 * stride_xm + c2, in_bounds, valid) if HAS_WEIGHT else 1.0
        v = _load_tile(val_ptr + r2 * stride_vm + c2, in_bounds, valid)
        ret = _load_tile(ret_ptr + r2 * stride_rm + c2, in_bounds, valid)
        old_v = _load_tile(old_val_ptr + r2 * stride_wm + c2, in_bounds, valid) if HAS_VALUE_CLIP else 0.0

        ratio = tl.exp(log_ratio)
        if SEQ_RATIO:
            s_ratio = tl.exp(_load_rows(seq_ptr, rows, n_rows))[:, None] + tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        else:
            s_ratio = ratio
        pg, _dpg, clipped = policy_surrogate(s_ratio, lp, adv, w, clip_eps, clip_eps_high, dual_clip,
                                             HAS_DUAL_CLIP, HAS_WEIGHT, CISPO)
        vf, _dvf, vclipped = clipped_value_error(v, ret, old_v, value_clip, HAS_VALUE_CLIP)
        if HAS_VALUE_CLIP:
            acc_vclip += vclipped.to(tl.float32)
        acc_pg += pg
        acc_vf += vf
        acc_clip += (clipped & valid).to(tl.float32)
        acc_kl += (ratio - 1.0) - log_ratio
        acc_ratio += tl.where(valid, s_ratio, 0.0)
        acc_count += valid.to(tl.float32)

    s_pg = tl.sum(tl.sum(acc_pg, axis=1), axis=0)
    s_vf = 0.5 * tl.sum(tl.sum(acc_vf, axis=1), axis=0)
    s_clip = tl.sum(tl.sum(acc_clip, axis=1), axis=0)
    s_vclip = tl.sum(tl.sum(acc_vclip, axis=1), axis=0)
    s_kl = tl.sum(tl.sum(acc_kl, axis=1), axis=0)
    s_ratio = tl.sum(tl.sum(acc_ratio, axis=1), axis=0)
    s_count = tl.sum(tl.sum(acc_count, axis=1), axis=0)
    if ONE_PROGRAM:
        _write_results(out_ptr, norm_ptr, s_pg, s_vf, s_clip, s_vclip, s_kl, s_ratio, s_count, vf_coef, normalizer,
                       NORM_MODE)
    else:
        base = partial_ptr + pid * 8
        tl.store(base + 0, s_pg)
        tl.store(base + 1, s_vf)
        tl.store(base + 2, s_clip)
        tl.store(base + 3, s_vclip)
        tl.store(base + 4, s_kl)
        tl.store(base + 5, s_ratio)
        tl.store(base + 6, s_count)


@triton.jit
def _ppo_loss_reduce_kernel(
    partial_ptr, norm_ptr, out_ptr, n_programs, vf_coef, normalizer,
    NORM_MODE: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: add the (n_programs, 8) partial sums in a fixed order and write the 8 results."""
    p = tl.arange(0, BLOCK_P)
    pm = p < n_programs
    s_pg = tl.sum(tl.load(partial_ptr + p * 8 + 0, mask=pm, other=0.0), axis=0)
    s_vf = tl.sum(tl.load(partial_ptr + p * 8 + 1, mask=pm, other=0.0), axis=0)
    s_clip = tl.sum(tl.load(partial_ptr + p * 8 + 2, mask=pm, other=0.0), axis=0)
    s_vclip = tl.sum(tl.load(partial_ptr + p * 8 + 3, mask=pm, other=0.0), axis=0)
    s_kl = tl.sum(tl.load(partial_ptr + p * 8 + 4, mask=pm, other=0.0), axis=0)
    s_ratio = tl.sum(tl.load(partial_ptr + p * 8 + 5, mask=pm, other=0.0), axis=0)
    s_count = tl.sum(tl.load(partial_ptr + p * 8 + 6, mask=pm, other=0.0), axis=0)
    _write_results(out_ptr, norm_ptr, s_pg, s_vf, s_clip, s_vclip, s_kl, s_ratio, s_count, vf_coef, normalizer,
                   NORM_MODE)


@triton.jit
def _ppo_loss_bwd_kernel(
    lp_ptr, old_lp_ptr, adv_ptr, val_ptr, old_val_ptr, ret_ptr, mask_ptr, w_ptr, seq_ptr, out_ptr,
    g_loss_ptr, g_pg_ptr, g_vf_ptr, dlp_ptr, dval_ptr,
    n_rows, n_cols,
    stride_lm, stride_om, stride_am, stride_vm, stride_wm, stride_rm, stride_mm, stride_xm, stride_dm,
    clip_eps, clip_eps_high, value_clip, dual_clip, vf_coef,
    HAS_VALUE_CLIP: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SEQ_RATIO: tl.constexpr, CISPO: tl.constexpr, HAS_G_LOSS: tl.constexpr, HAS_G_PG: tl.constexpr, HAS_G_VF: tl.constexpr,
    NEEDS_DLP: tl.constexpr, NEEDS_DVAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (row tiles, column tiles). With n the normalizer saved at out_ptr[7]:

      d/d logprobs = (g_loss + g_pg) / n · dpg of _math.policy_surrogate (PPO: w·(−A·ρ) where no clip is
                     active, else 0; CISPO: −w·min(ρ, 1 + ε_high)·A); with SEQ_RATIO and PPO this is the
                     token's share of d/d log s of its row, which the launcher sums per row
      d/d values   = (vf_coef·g_loss + g_vf) / n · (V − R where the unclipped error is larger, else 0)
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_bounds = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    r2, c2 = rows[:, None], cols[None, :]
    n = tl.load(out_ptr + 7)
    g_loss = tl.load(g_loss_ptr).to(tl.float32) if HAS_G_LOSS else 0.0
    valid = tl.load(mask_ptr + r2 * stride_mm + c2, mask=in_bounds, other=0) != 0
    if NEEDS_DLP:
        g_pg = tl.load(g_pg_ptr).to(tl.float32) if HAS_G_PG else 0.0
        scale = (g_loss + g_pg) / n
        lp = _load_tile(lp_ptr + r2 * stride_lm + c2, in_bounds, valid)
        if SEQ_RATIO:
            ratio = tl.exp(_load_rows(seq_ptr, rows, n_rows))[:, None] + tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        else:
            ratio = tl.exp(lp - _load_tile(old_lp_ptr + r2 * stride_om + c2, in_bounds, valid))
        adv = _load_tile(adv_ptr + r2 * stride_am + c2, in_bounds, valid)
        w = _load_tile(w_ptr + r2 * stride_xm + c2, in_bounds, valid) if HAS_WEIGHT else 1.0
        _pg, dpg, _clipped = policy_surrogate(ratio, lp, adv, w, clip_eps, clip_eps_high, dual_clip,
                                              HAS_DUAL_CLIP, HAS_WEIGHT, CISPO)
        dlp = tl.where(valid, dpg * scale, 0.0)
        tl.store(dlp_ptr + r2 * stride_dm + c2, dlp.to(dlp_ptr.dtype.element_ty), mask=in_bounds)
    if NEEDS_DVAL:
        g_vf = tl.load(g_vf_ptr).to(tl.float32) if HAS_G_VF else 0.0
        scale_v = (tl.cast(vf_coef, tl.float32) * g_loss + g_vf) / n
        v = _load_tile(val_ptr + r2 * stride_vm + c2, in_bounds, valid)
        ret = _load_tile(ret_ptr + r2 * stride_rm + c2, in_bounds, valid)
        old_v = _load_tile(old_val_ptr + r2 * stride_wm + c2, in_bounds, valid) if HAS_VALUE_CLIP else 0.0
        _vf, dvf, _vclipped = clipped_value_error(v, ret, old_v, value_clip, HAS_VALUE_CLIP)
        dval = tl.where(valid, dvf * scale_v, 0.0)
        tl.store(dval_ptr + r2 * stride_dm + c2, dval.to(dval_ptr.dtype.element_ty), mask=in_bounds)


# ----------------------------------------------------------------------------
# 2. Launchers: check, allocate, launch
# ----------------------------------------------------------------------------

_TILE = 2048            # tokens per tile on a GPU (8 warps: 8 per thread per input)
_ONE_PROGRAM_TILES = 8  # up to this many tiles: one program, one launch
_MAX_PROGRAMS = 1024


def _norm_mode(normalizer) -> int:
    return 0 if normalizer is None else 2 if isinstance(normalizer, torch.Tensor) else 1


class _Inputs(NamedTuple):
    """The (rows, T) tensors of one call (unit stride along T); policy_weight None when not given."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    policy_weight: torch.Tensor | None = None
    seq_log_ratio: torch.Tensor | None = None     # (rows,) float32: GSPO's mean log-ratio of each row


class _Params(NamedTuple):
    """The scalar parameters of one call (normalizer: a number, or None; a tensor travels as an input)."""

    clip_eps: float
    clip_eps_high: float
    value_clip: float | None
    vf_coef: float
    dual_clip: float | None
    normalizer: float | None
    cispo: bool = False


def _fwd_triton(inputs, normalizer, clip_eps, value_clip, vf_coef, dual_clip, *, clip_eps_high=None,
                cispo: bool = False, tile: int = _TILE, one_program_tiles: int = _ONE_PROGRAM_TILES):
    """The (8,) float32 results; `inputs` an _Inputs or a tuple of its first 7 fields."""
    lp, old_lp, adv, val, old_val, ret, mask, weight, seq = _Inputs(*inputs)
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    n_rows, n_cols = lp.shape
    if n_rows * n_cols == 0:
        return torch_backend.ppo_loss_forward(lp, old_lp, adv, val, old_val, ret, mask, clip_eps, value_clip,
                                              vf_coef, dual_clip, normalizer)
    device = lp.device
    mask = loadable_mask(mask)
    block_m, block_t = tile_shape(n_cols, tile)
    n_tiles = triton.cdiv(n_rows, block_m) * triton.cdiv(n_cols, block_t)
    if n_tiles <= one_program_tiles:
        n_programs, per_program = 1, n_tiles
    else:
        n_programs = min(triton.cdiv(n_tiles, 2), _MAX_PROGRAMS)
        per_program = triton.cdiv(n_tiles, n_programs)
        n_programs = triton.cdiv(n_tiles, per_program)
    out = empty_output(8, torch.float32, device)
    partials = empty_output((n_programs, _N_PARTIALS), torch.float32, device) if n_programs > 1 else out
    mode = _norm_mode(normalizer)
    norm_ptr = normalizer if mode == 2 else out
    norm_value = float(normalizer) if mode == 1 else 0.0
    with on_device_of(lp):
        _ppo_loss_fwd_kernel[(n_programs,)](
            lp, old_lp, adv, val, old_val, ret, mask, weight if weight is not None else lp,
            seq if seq is not None else lp, norm_ptr, partials, out, n_rows, n_cols, per_program,
            lp.stride(0), old_lp.stride(0), adv.stride(0), val.stride(0), old_val.stride(0), ret.stride(0),
            mask.stride(0), weight.stride(0) if weight is not None else 0,
            float(clip_eps), float(clip_eps_high), float(value_clip or 0.0), float(dual_clip or 0.0),
            float(vf_coef), norm_value,
            HAS_VALUE_CLIP=value_clip is not None, HAS_DUAL_CLIP=dual_clip is not None,
            HAS_WEIGHT=weight is not None, NORM_MODE=mode, SEQ_RATIO=seq is not None, CISPO=cispo,
            ONE_PROGRAM=n_programs == 1, BLOCK_M=block_m, BLOCK_T=block_t, num_warps=8,
        )
    if n_programs > 1:
        with on_device_of(lp):
            _ppo_loss_reduce_kernel[(1,)](
                partials, norm_ptr, out, n_programs, float(vf_coef), norm_value,
                NORM_MODE=mode, BLOCK_P=triton.next_power_of_2(n_programs), num_warps=4,
            )
    return out


def _bwd_triton(inputs: _Inputs, out, grad_loss, grad_pg, grad_vf, params: _Params, need_dlp, need_dval, *,
                dlp_dtype=None):
    lp, old_lp, adv, val, old_val, ret, mask, weight, seq = inputs
    n_rows, n_cols = lp.shape
    dlp = empty_output((n_rows, n_cols), dlp_dtype or lp.dtype, lp.device) if need_dlp else None
    dval = empty_output((n_rows, n_cols), val.dtype, val.device) if need_dval else None
    if n_rows * n_cols == 0:
        return dlp, dval
    mask = loadable_mask(mask)
    block_m, block_t = tile_shape(n_cols, _TILE)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_t))
    p = params
    with on_device_of(lp):
        _ppo_loss_bwd_kernel[grid](
            lp, old_lp, adv, val, old_val, ret, mask, weight if weight is not None else lp,
            seq if seq is not None else lp, out, grad_loss if grad_loss is not None else out,
            grad_pg if grad_pg is not None else out, grad_vf if grad_vf is not None else out,
            dlp if need_dlp else dval, dval if need_dval else dlp,
            n_rows, n_cols,
            lp.stride(0), old_lp.stride(0), adv.stride(0), val.stride(0), old_val.stride(0), ret.stride(0),
            mask.stride(0), weight.stride(0) if weight is not None else 0, n_cols,
            p.clip_eps, p.clip_eps_high, float(p.value_clip or 0.0), float(p.dual_clip or 0.0), p.vf_coef,
            HAS_VALUE_CLIP=p.value_clip is not None, HAS_DUAL_CLIP=p.dual_clip is not None,
            HAS_WEIGHT=weight is not None, SEQ_RATIO=seq is not None, CISPO=p.cispo,
            HAS_G_LOSS=grad_loss is not None, HAS_G_PG=grad_pg is not None, HAS_G_VF=grad_vf is not None,
            NEEDS_DLP=need_dlp, NEEDS_DVAL=need_dval, BLOCK_M=block_m, BLOCK_T=block_t, num_warps=8,
        )
    return dlp, dval


# ----------------------------------------------------------------------------
# 3. Autograd
# ----------------------------------------------------------------------------

class _PPOLoss(torch.autograd.Function):
    """Differentiable in lp (index 0), val (3) and, for GSPO, seq (8): the rows' mean log-ratio, which the
    caller computes from lp with torch ops, so that autograd spreads d/d seq over each row's tokens."""

    @staticmethod
    def forward(ctx, lp, old_lp, adv, val, old_val, ret, mask, weight, seq, normalizer, params: _Params, backend):
        inputs = _Inputs(lp, old_lp, adv, val, old_val, ret, mask, weight, seq)
        norm = normalizer if normalizer is not None else params.normalizer
        if backend == "triton":
            out = _fwd_triton(inputs, norm, params.clip_eps, params.value_clip, params.vf_coef, params.dual_clip,
                              clip_eps_high=params.clip_eps_high, cispo=params.cispo)
            ctx.save_for_backward(*inputs, out)                     # the backward recomputes the terms
        else:
            # The CPU path keeps the two per-token derivatives instead (8 bytes per token).
            with_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[3] or ctx.needs_input_grad[8]
            result = torch_backend.ppo_loss_forward(
                *inputs[:7], params.clip_eps, params.value_clip, params.vf_coef, params.dual_clip, norm,
                with_grads=with_grads, clip_eps_high=params.clip_eps_high, weight=weight, seq_log_ratio=seq,
                cispo=params.cispo)
            out, dpg, derr = result if with_grads else (result, None, None)
            ctx.save_for_backward(dpg, derr, out)
            ctx.dtypes = (lp.dtype, val.dtype)
        ctx.params, ctx.backend = params, backend
        ctx.seq_ppo = seq is not None and not params.cispo          # the surrogate's gradient goes through seq
        results = tuple(out[i] for i in range(7))
        ctx.mark_non_differentiable(*results[3:])
        ctx.set_materialize_grads(False)
        return results

    @staticmethod
    def backward(ctx, grad_loss, grad_pg, grad_vf, *_stats):
        need_dpg = ctx.needs_input_grad[8] if ctx.seq_ppo else ctx.needs_input_grad[0]
        need_dval = ctx.needs_input_grad[3]
        nothing = (None,) * 12
        if not (need_dpg or need_dval) or (grad_loss is None and grad_pg is None and grad_vf is None):
            return nothing
        grads = [g.float().contiguous() if g is not None else None for g in (grad_loss, grad_pg, grad_vf)]
        if ctx.backend == "triton":
            *inputs, out = ctx.saved_tensors
            inputs = _Inputs(*inputs)
            dpg, dval = _bwd_triton(inputs, out, *grads, ctx.params, need_dpg, need_dval,
                                    dlp_dtype=torch.float32 if ctx.seq_ppo else inputs.logprobs.dtype)
        else:
            # d loss = (g_loss + g_pg)·d policy_loss + (vf_coef·g_loss + g_vf)·d value_loss, each / n.
            dpg, derr, out = ctx.saved_tensors
            g_loss, g_pg, g_vf = (g if g is not None else torch.zeros((), device=out.device) for g in grads)
            dpg = dpg * ((g_loss + g_pg) / out[7]) if need_dpg else None
            if dpg is not None and not ctx.seq_ppo:
                dpg = dpg.to(ctx.dtypes[0])
            dval = (derr * ((ctx.params.vf_coef * g_loss + g_vf) / out[7])).to(ctx.dtypes[1]) if need_dval else None
        if ctx.seq_ppo:                  # d/d seq[row] = Σ over the row's tokens of d pg / d log s (0 off the mask)
            dseq = dpg.sum(-1) if dpg is not None else None
            return None, None, None, dval, None, None, None, None, dseq, *nothing[9:]
        return dpg, None, None, dval, *nothing[4:]


# ----------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------

class PPOLossOutput(NamedTuple):
    """Results of `ppo_loss`, each a 0-dim float32 tensor on the inputs' device.

    loss, policy_loss and value_loss are differentiable; the statistics are not.
    They are views of one buffer: use them out of place (``loss = out.loss + x``).
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor


_INPUT_NAMES = ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns")


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    value_clip: float | None = 0.2,
    vf_coef: float = 1.0,
    dual_clip: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    backend: str | None = None,
    clip_eps_high: float | None = None,
    policy_weight: torch.Tensor | None = None,
    ratio_level: str = "token",
    policy_loss: str = "ppo",
) -> PPOLossOutput:
    """PPO's clipped losses and their diagnostics in one fused pass (Schulman et al. 2017, eq. 7 and 9).

    With ρ = exp(logprobs − old_logprobs), A the advantages, R the returns and
    token means Σ_valid(·) / normalizer:
        policy_loss = mean w·max(−A·ρ, −A·clip(ρ, 1 − clip_eps, 1 + clip_eps_high)),
            and with dual_clip c, for A < 0: mean w·min(that, −c·A) (Ye et al. 2020);
            w = policy_weight (1 when None). With policy_loss="cispo" (MiniMax-M1, 2025):
            mean −w·sg(min(ρ, 1 + clip_eps_high))·A·logprobs, the weight detached.
            With ratio_level="sequence" (GSPO, Zheng et al. 2025) ρ is, on every token of a
            row, s = exp(mean of logprobs − old_logprobs over the row's valid tokens): the last
            dimension holds one sequence per row, and the gradient reaches every token of the
            row through the mean.
        value_loss  = ½·mean max((V − R)², (clip(V, V_old ± value_clip) − R)²),
            or ½·mean (V − R)² when value_clip is None
        loss        = policy_loss + vf_coef·value_loss
        clipfrac    = mean [the policy term took a clipped branch (ε- or dual clip);
                      cispo: the weight was truncated, ρ > 1 + clip_eps_high]
        value_clipfrac = mean [the clipped value error was the larger]
        approx_kl   = mean (r − 1) − log r of the token ratio r (the k3 estimator of KL(old ‖ new),
                      ≥ 0, as in CleanRL), at either ratio level
        ratio_mean  = mean ρ (the sequence ratio s with ratio_level="sequence")

    Args:
        logprobs: (...) float32, bfloat16 or float16: log π_θ(y_t), differentiable.
        old_logprobs, advantages: same shape, any of those dtypes.
        values: same shape and dtypes: V_ψ(s_t), differentiable.
        old_values, returns: same shape, any of those dtypes.
        mask: same shape; bool, or any integer or floating dtype (nonzero =
            valid; not a weight). Inputs at invalid positions are never read.
        clip_eps: ε ≥ 0.
        value_clip: ε_v ≥ 0, or None for no value clipping.
        vf_coef: ≥ 0.
        dual_clip: None, or c > 1.
        normalizer: the denominator of every token mean: None (the number of
            valid tokens here), a number ≥ 0, or a 1-element tensor on the
            inputs' device (e.g. the minibatch's token count all-reduced over
            ranks, so that micro-batch results add up to minibatch means). A
            normalizer of 0 (e.g. a fully masked micro-batch) is treated as 1:
            the results are then 0, never NaN. Never synchronises with the host.
            Empty inputs (no token at all) count as fully masked: zeros, and
            empty gradients.
        backend: ``None`` (triton on CUDA, torch elsewhere; ``FASTPPO_BACKEND``
            overrides), ``"triton"`` or ``"torch"``.
        clip_eps_high: ε_high ≥ 0, the upper clip 1 + ε_high of the ratio
            (clip-higher, Yu et al. 2025, DAPO); None = clip_eps. clipfrac
            counts the tokens clipped on either side.
        policy_weight: None, or a per-token weight w ≥ 0 of the policy term
            (same shape as logprobs, any float dtype, never differentiated;
            e.g. a truncated importance weight π_old / π_rollout): the
            surrogate of token t is multiplied by w_t before the sum and the
            division by the normalizer, which is unchanged, so w_t = 0 drops
            the token from policy_loss while it still counts in the
            normalizer. The value loss and the statistics (clipfrac,
            approx_kl, ratio_mean) are not weighted. Read only where mask is
            set; there it must be finite and ≥ 0, checked on CPU (a
            ValueError). On a GPU it is not checked (that would cost a host
            sync): a non-finite weight gives a non-finite loss.
        ratio_level: "token" (PPO) or "sequence" (GSPO: one ratio per row).
        policy_loss: "ppo" (the clipped surrogate) or "cispo" (no dual_clip).

    Returns:
        A `PPOLossOutput` of 0-dim float32 tensors. Gradients flow to
        ``logprobs`` and ``values`` only (in their dtypes), computed in one
        pass; those of logprobs are scaled by policy_weight.
    """
    tensors = (logprobs, old_logprobs, advantages, values, old_values, returns)
    for name, x in zip(_INPUT_NAMES, tensors):
        check_tensor(name, x, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask, dtypes=MASK_DTYPES)
    for name, x in zip(_INPUT_NAMES[1:] + ("mask",), tensors[1:] + (mask,)):
        check_same_device(name, x, "logprobs", logprobs)
        check_shape(name, x, logprobs.shape, "the shape of logprobs")
    check_policy_weight(policy_weight, mask, "logprobs", logprobs, "the shape of logprobs")
    clip_eps, clip_eps_high = check_clip_range(clip_eps, clip_eps_high)
    check_non_negative("value_clip", value_clip, allow_none=True)
    check_non_negative("vf_coef", vf_coef)
    dual_clip = check_dual_clip(dual_clip)
    sequence, cispo = check_policy_loss_kind(ratio_level, policy_loss, dual_clip)
    norm = check_normalizer(normalizer, "logprobs", logprobs)
    backend = resolve_backend(backend, logprobs, "logprobs")

    rows = [rows_unit_stride(x) for x in (*tensors, mask)]
    weight = None if policy_weight is None else rows_unit_stride(policy_weight.detach())
    seq = sequence_log_ratio(rows[0], rows[1], rows[6]) if sequence else None
    params = _Params(clip_eps, clip_eps_high, None if value_clip is None else float(value_clip), float(vf_coef),
                     dual_clip, None if isinstance(norm, torch.Tensor) else norm, cispo)
    norm_tensor = norm if isinstance(norm, torch.Tensor) else None
    return PPOLossOutput(*_PPOLoss.apply(*rows, weight, seq, norm_tensor, params, backend))


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(rows,) float32: the mean of logprobs − old_logprobs over each row's valid tokens (0 for a row without
    any), differentiable in logprobs: log of GSPO's sequence ratio. One cheap (rows, T) reduction."""
    valid = mask != 0
    diff = torch.where(valid, logprobs.float() - old_logprobs.float(), 0.0)
    return diff.sum(-1) / valid.sum(-1).clamp(min=1)
