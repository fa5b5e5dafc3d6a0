"""kl_penalty: per-token KL estimate between the policy and the reference model.

With d = logprobs − ref_logprobs (PPO-max §5.3.2; Schulman's estimators):
  k1 = d,  k2 = ½·d²,  k3 = exp(−d) + d − 1 (= exp(ref − lp) − (ref − lp) − 1),  abs = |d|
optionally clamped to [−clamp, clamp].

Composite PyTorch (``lp.float() - ref.float()`` then 2–4 more elementwise ops
and a clamp) reads and writes a float32 (B, T) temporary per op: about 8 bytes
per op per token. The fused forward reads both inputs once and writes the
float32 result (4 + 4 + 4 bytes per token in fp32); the backward recomputes d
and writes both gradients in one pass.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from ._dispatch import empty_output, on_device_of, resolve_backend
from ._layout import rows_unit_stride, tile_shape
from ._math import kl_estimate
from . import torch_backend

ESTIMATORS = ("k1", "k2", "k3", "abs")


# ----------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _kl_penalty_fwd_kernel(
    lp_ptr, ref_ptr, out_ptr,
    n_rows, n_cols, stride_lm, stride_rm, stride_om,
    clamp,
    ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (row tiles, column tiles): one (BLOCK_M, BLOCK_T) tile of the estimate, in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    lp = tl.load(lp_ptr + rows[:, None] * stride_lm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    kl, _slope = kl_estimate(lp - ref, ESTIMATOR)
    if HAS_CLAMP:
        c = tl.cast(clamp, tl.float32)
        kl = tl.minimum(tl.maximum(kl, -c), c)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], kl, mask=mask)


@triton.jit
def _kl_penalty_bwd_kernel(
    lp_ptr, ref_ptr, grad_ptr, dlp_ptr, dref_ptr,
    n_rows, n_cols, stride_lm, stride_rm, stride_gm, stride_gt, stride_dm,
    clamp,
    ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_DLP: tl.constexpr, HAS_DREF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dk/d lp = k'(d) and dk/d ref = −k'(d), zero where the clamp is active.

    k' from _math.kl_estimate: k1' = 1, k2' = d, k3' = 1 − exp(−d), abs' = sign(d). The upstream gradient
    may be an expanded view (stride 0), hence its own strides.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    lp = tl.load(lp_ptr + rows[:, None] * stride_lm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gt, mask=mask, other=0.0).to(tl.float32)
    kl, slope = kl_estimate(lp - ref, ESTIMATOR)
    if HAS_CLAMP:
        # The gradient passes where -clamp <= kl <= clamp, as for torch.clamp.
        c = tl.cast(clamp, tl.float32)
        slope = tl.where((kl >= -c) & (kl <= c), slope, 0.0)
    dd = g * slope
    offs = rows[:, None] * stride_dm + cols[None, :]
    if HAS_DLP:
        tl.store(dlp_ptr + offs, dd.to(dlp_ptr.dtype.element_ty), mask=mask)
    if HAS_DREF:
        tl.store(dref_ptr + offs, (-dd).to(dref_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# 2. Launchers: check, allocate, launch
# ----------------------------------------------------------------------------

def _grid(n_rows: int, n_cols: int):
    block_m, block_t = tile_shape(n_cols, 2048)
    return (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_t)), block_m, block_t


def _fwd_triton(lp2d, ref2d, estimator, clamp):
    n_rows, n_cols = lp2d.shape
    out = empty_output((n_rows, n_cols), torch.float32, lp2d.device)
    if out.numel() == 0:
        return out
    grid, block_m, block_t = _grid(n_rows, n_cols)
    with on_device_of(lp2d):
        _kl_penalty_fwd_kernel[grid](
            lp2d, ref2d, out, n_rows, n_cols, lp2d.stride(0), ref2d.stride(0), out.stride(0),
            float(clamp) if clamp is not None else 0.0,
            ESTIMATOR=estimator, HAS_CLAMP=clamp is not None, BLOCK_M=block_m, BLOCK_T=block_t, num_warps=4,
        )
    return out


def _bwd_triton(lp2d, ref2d, grad2d, estimator, clamp, need_dlp, need_dref):
    n_rows, n_cols = lp2d.shape
    dlp = empty_output((n_rows, n_cols), lp2d.dtype, lp2d.device) if need_dlp else None
    dref = empty_output((n_rows, n_cols), ref2d.dtype, ref2d.device) if need_dref else None
    if n_rows * n_cols == 0:
        return dlp, dref
    grid, block_m, block_t = _grid(n_rows, n_cols)
    with on_device_of(lp2d):
        _kl_penalty_bwd_kernel[grid](
            lp2d, ref2d, grad2d, dlp if need_dlp else dref, dref if need_dref else dlp,
            n_rows, n_cols, lp2d.stride(0), ref2d.stride(0), grad2d.stride(0), grad2d.stride(1), n_cols,
            float(clamp) if clamp is not None else 0.0,
            ESTIMATOR=estimator, HAS_CLAMP=clamp is not None, HAS_DLP=need_dlp, HAS_DREF=need_dref,
            BLOCK_M=block_m, BLOCK_T=block_t, num_warps=4,
        )
    return dlp, dref


# ----------------------------------------------------------------------------
# 3. Autograd
# ----------------------------------------------------------------------------

class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp2d, ref2d, estimator, clamp, backend):
        ctx.estimator, ctx.clamp, ctx.backend = estimator, clamp, backend
        if backend == "triton":
            out = _fwd_triton(lp2d, ref2d, estimator, clamp)
            ctx.save_for_backward(lp2d, ref2d)                      # the backward recomputes d
        else:
            # The CPU path keeps dk/dd instead: one (B, T) float32, as autograd would.
            out, slope = torch_backend.kl_penalty_forward(lp2d, ref2d, estimator, clamp,
                                                      with_slope=any(ctx.needs_input_grad[:2]))
            ctx.save_for_backward(slope)
            ctx.dtypes = (lp2d.dtype, ref2d.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        need_dlp, need_dref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dlp or need_dref):
            return None, None, None, None, None
        if ctx.backend == "triton":
            lp2d, ref2d = ctx.saved_tensors
            dlp, dref = _bwd_triton(lp2d, ref2d, grad, ctx.estimator, ctx.clamp, need_dlp, need_dref)
        else:
            (slope,) = ctx.saved_tensors
            dd = grad.float() * slope
            dlp = dd.to(ctx.dtypes[0]) if need_dlp else None
            dref = (-dd).to(ctx.dtypes[1]) if need_dref else None
        return dlp, dref, None, None, None


# ----------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------

def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k1",
    clamp: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from the log-probabilities of the sampled tokens.

    With d = logprobs − ref_logprobs:
      ``"k1"``: d (unbiased, can be negative; PPO-max's default),
      ``"k2"``: ½·d²,
      ``"k3"``: exp(−d) + d − 1 (unbiased and ≥ 0; evaluated in fp32 as written,
      so its absolute error is ~1e-7: large relative error only where the
      estimate itself is below ~1e-5),
      ``"abs"``: |d|.

    Args:
        logprobs: (...) float32, bfloat16 or float16: log π(y_t) of the policy.
        ref_logprobs: same shape, any of those dtypes: log π_ref(y_t).
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``.
        clamp: ``None`` or a number > 0; the estimate is clamped to
            [−clamp, clamp] (zero gradient where the clamp is active).
        backend: ``None`` (triton on CUDA, torch elsewhere; ``FASTPPO_BACKEND``
            overrides), ``"triton"`` or ``"torch"``.

    Returns:
        (...) float32, differentiable in both inputs (the gradients have the
        inputs' dtypes); empty inputs give an empty estimate. Masking is the
        caller's: positions with finite inputs give finite estimates.
    """
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES)
    check_tensor("ref_logprobs", ref_logprobs, dtypes=FLOAT_DTYPES)
    check_same_device("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    check_shape("ref_logprobs", ref_logprobs, logprobs.shape, "the shape of logprobs")
    hashable = isinstance(estimator, str) and (clamp is None or isinstance(clamp, (int, float)))
    estimator, clamp = (_cached_settings if hashable else _settings)(estimator, clamp)
    backend = resolve_backend(backend, logprobs, "logprobs")
    lp2d, ref2d = rows_unit_stride(logprobs), rows_unit_stride(ref_logprobs)
    if torch.is_grad_enabled() and (logprobs.requires_grad or ref_logprobs.requires_grad):
        out = _KLPenalty.apply(lp2d, ref2d, estimator, clamp, backend)
    elif backend == "triton":          # no graph to record: the launch alone, without the autograd Function
        out = _fwd_triton(lp2d, ref2d, estimator, clamp)
    else:
        out, _ = torch_backend.kl_penalty_forward(lp2d, ref2d, estimator, clamp)
    return out.view(logprobs.shape)


def _settings(estimator, clamp) -> tuple[str, float | None]:
    """(estimator, clamp) checked, as the kernel takes them."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    estimator = ESTIMATORS[ESTIMATORS.index(estimator)]  # a plain str for the kernel's constexpr (not a str Enum)
    if clamp is not None:
        if not isinstance(clamp, (int, float)) or isinstance(clamp, bool):
            raise TypeError(f"clamp must be a number or None, got {type(clamp).__name__}")
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0 (or None for no clamp), got {clamp}")
        clamp = float(clamp)
    return estimator, clamp


# A trainer passes the same pair every call: then the checks cost one dictionary lookup (typed: True is not 1).
_cached_settings = functools.lru_cache(maxsize=64, typed=True)(_settings)
