"""token_logprobs: per-token log-probabilities and entropy straight from logits.

Naive PyTorch (``log_softmax(logits.float()).gather`` plus entropy from the
softmax) reads the bf16 logits, writes and re-reads a float32 (N, V) copy and
its log-softmax, and keeps one for backward: about 2 + 4·3 = 14 bytes of
traffic per logit forward and an (N, V) float32 tensor resident (N=8192,
V=151936: 5 GB). The fused forward reads each logit once (2 bytes in bf16) and
writes three floats per row; the backward reads the logits once more and writes
dlogits once in the input dtype (4 bytes per logit), recomputing the softmax
from the saved log-sum-exp.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES, INT_DTYPES, as_rows, check_ignore_index, check_labels_in_range, check_positive, check_same_device,
    check_shape, check_tensor, check_vocab_size,
)
from ._dispatch import empty_output, on_device_of, resolve_backend, triton_interpreter_enabled
from ._math import LN2, LOG2E, fast_exp2, lse2_and_entropy, online_lse2_step
from . import torch_backend


# ----------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
    n_cols, n_valid, stride_lm, stride_lv, stride_label,
    scale, ignore_index,
    BLOCK_V: tl.constexpr, FTZ: tl.constexpr,
):
    """One program per row: an online log-sum-exp over vocab blocks in fp32, in base 2.

    scale = log2(e) / T: the temperature and the change of base are one
    multiply, fused with the subtraction of the reference point
    (_math.online_lse2_step: per-lane sums, one reduction per block, the max).
    The blocks wholly inside [0, n_valid) are loaded without a mask; the last,
    partial block alone is masked. Columns in [n_valid, n_cols) are alignment
    padding, excluded from the softmax: that block is loaded masked on the
    padded width n_cols (a multiple of 16 in practice, so its loads stay
    128-bit wide) and the padding replaced by −inf.
    """
    row = tl.program_id(0).to(tl.int64)
    k = tl.cast(scale, tl.float32)
    label = tl.load(labels_ptr + row * stride_label).to(tl.int64)
    is_ignored = label == ignore_index
    row_ptr = logits_ptr + row * stride_lm

    # An ignored row reads no block: row_end = 0 carries that through the loop as an integer (a flag live across
    # it would cost a predicate that ptxas has spilled), and the row ends with lse = 0, H = 0, logprob 0 − 0.
    label_ok = (label >= 0) & (label < n_valid) & (not is_ignored)
    x_label = tl.load(row_ptr + label * stride_lv, mask=label_ok, other=0.0).to(tl.float32)
    row_end = tl.where(is_ignored, 0, n_valid)
    n_full = row_end // BLOCK_V
    r = tl.cast(float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    for block in range(0, n_full):
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs * stride_lv).to(tl.float32)
        r, s, t = online_lse2_step(r, s, t, x, k, FTZ)
    if n_full * BLOCK_V < row_end:
        offs = n_full * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs * stride_lv, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        r, s, t = online_lse2_step(r, s, t, tl.where(offs < n_valid, x, float("-inf")), k, FTZ)

    r_ref, log2_s, entropy = lse2_and_entropy(r, s, t, row_end == 0)
    tl.store(logprobs_ptr + row, ((x_label * k - r_ref) - log2_s) * LN2)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, (r_ref + log2_s) * LN2)


@triton.jit
def logprob_grad_terms(ignored, inv_temp, lse, g_lp, g_ent, entropy):
    """The row scalars of `logprob_grad_block` (scalars or per-row vectors): lse2 = lse·log2 e, c = g_lp / T,
    a = −(g_lp + g_ent·H) / T, b = −g_ent·ln 2 / T; an ignored row's c, a and b are 0. Its logits must reach
    `logprob_grad_block` as −inf (p = 0): its saved lse is 0 (the forward reads none of the row), so its own
    logits would give p = 2^(x·k), which overflows above x ≈ 88, and p·0 is NaN (as for NaN or inf logits)."""
    keep = tl.where(ignored, 0.0, inv_temp)
    g_lp = g_lp * keep
    g_ent = g_ent * keep
    return lse * LOG2E, g_lp, -(g_lp + g_ent * entropy), -g_ent * LN2


@triton.jit
def logprob_grad_block(x, offs, label, lse2, k, c_label, a, b, FTZ: tl.constexpr):
    """dlogits of one block: c_label·[j = label] + p_j·(a + b·d_j), d_j = log2 p_j = x_j·k − lse2."""
    d = tl.maximum(x * k - lse2, -1000.0)              # −inf → −1000: p = 0 and p·(a + b·d) = 0, not NaN
    p = fast_exp2(d, FTZ)
    return p * (a + b * d) + tl.where(offs == label, c_label, 0.0)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, entropy_ptr, dlogprobs_ptr, dentropy_ptr, dlogits_ptr,
    n_cols, n_valid, stride_lm, stride_lv, stride_label, stride_dm, blocks_per_program,
    scale, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, HAS_DLOGPROBS: tl.constexpr, HAS_DENTROPY: tl.constexpr, FTZ: tl.constexpr,
):
    """Grid (rows, splits): each program recomputes p from the saved lse over `blocks_per_program` vocab
    blocks of its row and writes dlogits.

    With x = logits / T, p_j = 2^(d_j), d_j = x_j·log2(e) − lse·log2(e):
      d logprob/dx_j = [j = label] − p_j,  d entropy/dx_j = −p_j (ln p_j + H),
    so the gradient, times 1/T, is c·[j = label] + p_j·(a + b·d_j) with the row
    scalars c = g_lp / T, a = −(g_lp + g_ent·H) / T, b = −g_ent·ln 2 / T (all 0 for
    an ignored row: `logprob_grad_terms`): per element an FFMA, a max, a MUFU, two FFMAs and the label
    select. Blocks wholly inside [0, n_valid) go unmasked; the blocks from the
    last partial one to n_cols are masked, with the padding columns
    [n_valid, n_cols) taken as −inf (p = 0, gradient exactly 0). An ignored row
    reads nothing: all its blocks are masked, every x −inf, its gradient 0.
    """
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * blocks_per_program
    k = tl.cast(scale, tl.float32)
    label = tl.load(labels_ptr + row * stride_label).to(tl.int64)
    ignored = label == ignore_index
    cols_end = tl.where(ignored, 0, n_cols)             # (0 keeps the bounds' divisibility: vector loads)
    valid_end = tl.where(ignored, 0, n_valid)
    lse2, g_lp, a, b = logprob_grad_terms(ignored, tl.cast(inv_temp, tl.float32),
                                          tl.load(lse_ptr + row),
                                          tl.load(dlogprobs_ptr + row) if HAS_DLOGPROBS else 0.0,
                                          tl.load(dentropy_ptr + row) if HAS_DENTROPY else 0.0,
                                          tl.load(entropy_ptr + row) if HAS_DENTROPY else 0.0)
    x_row = logits_ptr + row * stride_lm
    d_row = dlogits_ptr + row * stride_dm
    out_ty = dlogits_ptr.dtype.element_ty

    last = tl.minimum(first + blocks_per_program, tl.cdiv(n_cols, BLOCK_V))
    full_end = tl.minimum(last, valid_end // BLOCK_V)
    for block in range(first, full_end):
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs * stride_lv).to(tl.float32)
        grad = logprob_grad_block(x, offs, label, lse2, k, g_lp, a, b, FTZ)
        tl.store(d_row + offs, grad.to(out_ty))
    for block in range(tl.maximum(first, full_end), last):
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs * stride_lv, mask=offs < cols_end, other=float("-inf")).to(tl.float32)
        x = tl.where(offs < valid_end, x, float("-inf"))
        grad = logprob_grad_block(x, offs, label, lse2, k, g_lp, a, b, FTZ)
        tl.store(d_row + offs, grad.to(out_ty), mask=offs < n_cols)


# ----------------------------------------------------------------------------
# 2. Launchers: check, allocate, launch
# ----------------------------------------------------------------------------

def row_block_size(n_cols: int, cap: int) -> int:
    """Columns per block of a row kernel (also the linear ops' row passes)."""
    # The interpreter costs ~1 ms per program per loop trip whatever the
    # block size, so it gets the largest blocks; GPUs get register-sized ones.
    if triton_interpreter_enabled():
        cap = 1 << 16
    return min(triton.next_power_of_2(n_cols), cap)


# GPU launch shapes of the row kernels: 4096 columns in 8 warps, 16 per thread: two 128-bit loads of bf16 per
# thread and trip, and the per-trip cost (the block max's shuffles and barrier) spread over 4096 elements.
_ROW_BLOCK, _ROW_WARPS = 4096, 8
# The backward splits rows into programs of at least this many blocks when there are few rows (decode-sized N),
# and gives whole rows to programs when there are enough of them to fill a GPU.
_BWD_PROGRAMS = 1024


def _row_launch(n_cols: int):
    """(BLOCK_V, num_warps, FTZ) of the row kernels: FTZ (the one-instruction exp2) only when compiled."""
    block_v = row_block_size(n_cols, _ROW_BLOCK)
    return block_v, _ROW_WARPS if block_v >= 2048 else 4, not triton_interpreter_enabled()


def logprob_rows_forward(logits2d, labels1d, temperature, ignore_index, vocab_size):
    """The Triton forward over (rows, V) logits: (3, rows) float32 of logprob, entropy and natural-log lse."""
    # Only the first vocab_size columns enter the softmax; the row stride is the padded one.
    n_rows, n_cols = logits2d.shape
    out = empty_output((3, n_rows), torch.float32, logits2d.device)
    if n_rows == 0:
        return out[0], out[1], out[2]
    block_v, warps, ftz = _row_launch(n_cols)
    with on_device_of(logits2d):
        _token_logprobs_fwd_kernel[(n_rows,)](
            logits2d, labels1d, out[0], out[1], out[2],
            n_cols, vocab_size, logits2d.stride(0), logits2d.stride(1), labels1d.stride(0),
            math.log2(math.e) / temperature, int(ignore_index),
            BLOCK_V=block_v, FTZ=ftz, num_warps=warps,
        )
    return out[0], out[1], out[2]


def logprob_rows_backward(logits2d, labels1d, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                          vocab_size, out=None):
    """The Triton backward: dlogits from the forward's lse and entropy and the incoming gradients."""
    # `out` (rows, V) with unit column stride, any float dtype, may alias logits2d
    # (each program reads each of its blocks before writing it): used by linear_token_logprobs.
    # Columns from vocab_size on get exactly 0.
    n_rows, n_cols = logits2d.shape
    dlogits = out if out is not None else empty_output((n_rows, n_cols), logits2d.dtype, logits2d.device)
    if n_rows == 0 or n_cols == 0:
        return dlogits
    block_v, warps, ftz = _row_launch(n_cols)
    n_blocks = triton.cdiv(n_cols, block_v)
    per_program = triton.cdiv(n_blocks, min(n_blocks, triton.cdiv(_BWD_PROGRAMS, n_rows)))
    grid = (n_rows, triton.cdiv(n_blocks, per_program))
    with on_device_of(logits2d):
        _token_logprobs_bwd_kernel[grid](
            logits2d, labels1d, lse, entropy,
            grad_logprobs if grad_logprobs is not None else lse,
            grad_entropy if grad_entropy is not None else lse,
            dlogits,
            n_cols, vocab_size, logits2d.stride(0), logits2d.stride(1), labels1d.stride(0), dlogits.stride(0),
            per_program, math.log2(math.e) / temperature, 1.0 / temperature, int(ignore_index),
            BLOCK_V=block_v, HAS_DLOGPROBS=grad_logprobs is not None, HAS_DENTROPY=grad_entropy is not None,
            FTZ=ftz, num_warps=warps,
        )
    return dlogits


# ----------------------------------------------------------------------------
# 3. Autograd
# ----------------------------------------------------------------------------

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, temperature, ignore_index, vocab_size, backend):
        fwd = logprob_rows_forward if backend == "triton" else torch_backend.token_logprobs_forward
        logprobs, entropy, lse = fwd(logits2d, labels1d, temperature, ignore_index, vocab_size)
        ctx.save_for_backward(logits2d, labels1d, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.vocab_size, ctx.backend = temperature, ignore_index, vocab_size, backend
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None
        logits2d, labels1d, lse, entropy = ctx.saved_tensors
        # Upstream grads can be expanded views (e.g. from .sum()); (N,) floats are cheap to copy.
        if grad_logprobs is not None:
            grad_logprobs = grad_logprobs.float().contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        bwd = logprob_rows_backward if ctx.backend == "triton" else torch_backend.token_logprobs_backward
        dlogits = bwd(logits2d, labels1d, lse, entropy, grad_logprobs, grad_entropy, ctx.temperature, ctx.ignore_index,
                      ctx.vocab_size)
        return dlogits, None, None, None, None, None


# ----------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------

class LogprobsAndEntropy(NamedTuple):
    logprobs: torch.Tensor
    entropy: torch.Tensor


def as_result(logprobs: torch.Tensor, entropy: torch.Tensor, lead, return_entropy: bool):
    """The (N,) results viewed as `lead`: logprobs, or LogprobsAndEntropy when return_entropy."""
    logprobs = logprobs.view(lead)
    return LogprobsAndEntropy(logprobs, entropy.view(lead)) if return_entropy else logprobs


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    backend: str | None = None,
):
    """Log-probability of each label under softmax(logits / temperature), and optionally its entropy.

    Args:
        logits: (..., V) float32, bfloat16 or float16; any strides.
        labels: (...) integer, values in [0, vocab_size) or ``ignore_index``.
        temperature: > 0; logits are divided by it (use the sampling temperature).
        return_entropy: also return the entropy of softmax(logits / temperature).
        ignore_index: label value whose positions give 0 and no gradient.
        vocab_size: columns ≥ vocab_size are alignment padding (an embedding
            resized to a multiple of 64), excluded from the softmax: they get
            probability 0 and zero gradient. ``None`` = all V columns.
        backend: ``None`` (triton on CUDA, torch elsewhere; ``FASTPPO_BACKEND``
            overrides), ``"triton"`` or ``"torch"``.

    Returns:
        logprobs (...) float32, or ``(logprobs, entropy)`` as a named tuple
        when ``return_entropy``. Both are differentiable in ``logits``; the
        gradient has the dtype of ``logits``. No (..., V) float32 copy is ever
        made.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("labels", labels, dtypes=INT_DTYPES)
    check_same_device("labels", labels, "logits", logits)
    check_shape("labels", labels, logits.shape[:-1], "the leading dimensions of logits")
    temperature = check_positive("temperature", temperature)
    check_ignore_index(ignore_index)
    width = logits.shape[-1]
    if width == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    vocab = check_vocab_size(vocab_size, width, "the last dimension of logits")
    backend = resolve_backend(backend, logits, "logits")
    check_labels_in_range(labels, vocab, ignore_index)

    logits2d = as_rows(logits, width)
    labels1d = labels.reshape(-1)
    logprobs, entropy, _ = _TokenLogprobs.apply(logits2d, labels1d, float(temperature), ignore_index, vocab, backend)
    return as_result(logprobs, entropy, logits.shape[:-1], return_entropy)
