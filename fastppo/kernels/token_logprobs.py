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

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES, INT_DTYPES, as_rows, check_ignore_index, check_labels_in_range, check_positive, check_same_device,
    check_shape, check_tensor, check_vocab_size,
)
from ._dispatch import empty_output, on_device_of, resolve_backend, triton_interpreter_enabled
from ._math import lse_and_entropy, online_lse_step, softmax_grad
from . import torch_backend


# ----------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
    n_cols, n_valid, stride_lm, stride_lv, stride_label,
    temperature, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program per row: an online log-sum-exp over vocab blocks in fp32.

    Columns in [n_valid, n_cols) are alignment padding: excluded from the
    softmax. They are loaded with the rest (a mask on the padded width n_cols,
    a multiple of 16 in practice, keeps the loads 128-bit wide; one on an odd
    n_valid would not) and replaced by −inf.

    Running state (_math.online_lse_step), all relative to the running max m:
      s = Σ exp(x − m),  t = Σ exp(x − m)·(x − m)
    so that lse = m + log s and entropy = log s − t / s without cancellation
    at large logits. m starts at −inf (not 0: all-negative rows must work).
    """
    row = tl.program_id(0).to(tl.int64)
    temp = tl.cast(temperature, tl.float32)
    label = tl.load(labels_ptr + row * stride_label).to(tl.int64)
    is_ignored = label == ignore_index
    row_ptr = logits_ptr + row * stride_lm

    # Nothing about is_ignored is left to do after the loop: a flag live across it costs a predicate that
    # ptxas (triton 3.6, sm_90, unaligned V) spills to local memory. An ignored row reads no block, so it
    # ends with s = 1, t = 0 and x_label = 0: lse = log 1 = 0 and H = 0 exactly, and its logprob 0 − 0.
    label_ok = (label >= 0) & (label < n_valid) & (not is_ignored)
    x_label = tl.load(row_ptr + label * stride_lv, mask=label_ok, other=0.0).to(tl.float32) / temp
    m = tl.cast(float("-inf"), tl.float32)
    s = tl.where(is_ignored, 1.0, 0.0)
    t = tl.cast(0.0, tl.float32)
    n_blocks = tl.where(is_ignored, 0, tl.cdiv(n_cols, BLOCK_V))
    for block in range(0, n_blocks):
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs * stride_lv, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        m, s, t = online_lse_step(m, s, t, tl.where(offs < n_valid, x / temp, float("-inf")))

    lse, entropy = lse_and_entropy(m, s, t)
    tl.store(logprobs_ptr + row, x_label - lse)
    tl.store(entropy_ptr + row, entropy)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, entropy_ptr, dlogprobs_ptr, dentropy_ptr, dlogits_ptr,
    n_cols, n_valid, stride_lm, stride_lv, stride_label, stride_dm,
    temperature, ignore_index,
    BLOCK_V: tl.constexpr, HAS_DLOGPROBS: tl.constexpr, HAS_DENTROPY: tl.constexpr,
):
    """Grid (rows, vocab blocks): recompute p from the saved lse, write dlogits.

    Columns in [n_valid, n_cols) are alignment padding: taken as −inf (after a
    load masked on n_cols, for wide loads), so p = 0 there and their gradient
    is written as exactly 0.

    With x = logits / T:  d logprob/dx_j = [j = label] − p_j,
    d entropy/dx_j = −p_j (log p_j + H) (_math.softmax_grad); both divided by T.
    """
    row = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1).to(tl.int64)
    temp = tl.cast(temperature, tl.float32)
    offs = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs < n_cols
    label = tl.load(labels_ptr + row * stride_label).to(tl.int64)
    is_ignored = label == ignore_index

    x = tl.load(logits_ptr + row * stride_lm + offs * stride_lv, mask=col_mask, other=float("-inf"))
    x = tl.where(offs < n_valid, x.to(tl.float32), float("-inf"))
    logp = x / temp - tl.load(lse_ptr + row)
    dlogp = tl.load(dlogprobs_ptr + row) if HAS_DLOGPROBS else 0.0
    dent = tl.load(dentropy_ptr + row) if HAS_DENTROPY else 0.0
    ent = tl.load(entropy_ptr + row) if HAS_DENTROPY else 0.0
    grad = softmax_grad(offs == label, logp, ent, dlogp, dent, HAS_DLOGPROBS, HAS_DENTROPY)
    grad = tl.where(is_ignored, 0.0, grad / temp)
    tl.store(dlogits_ptr + row * stride_dm + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------
# 2. Launchers: check, allocate, launch
# ----------------------------------------------------------------------------

def _block_v(n_cols: int, cap: int) -> int:
    # The interpreter costs ~1 ms per program per loop trip whatever the
    # block size, so it gets the largest blocks; GPUs get register-sized ones.
    if triton_interpreter_enabled():
        cap = 1 << 16
    return min(triton.next_power_of_2(n_cols), cap)


def _fwd_triton(logits2d, labels1d, temperature, ignore_index, vocab_size):
    # Only the first vocab_size columns enter the softmax; the row stride is the padded one.
    n_rows, n_cols = logits2d.shape
    out = empty_output((3, n_rows), torch.float32, logits2d.device)
    if n_rows == 0:
        return out[0], out[1], out[2]
    block_v = _block_v(n_cols, 4096)
    with on_device_of(logits2d):
        _token_logprobs_fwd_kernel[(n_rows,)](
            logits2d, labels1d, out[0], out[1], out[2],
            n_cols, vocab_size, logits2d.stride(0), logits2d.stride(1), labels1d.stride(0),
            float(temperature), int(ignore_index),
            BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
    return out[0], out[1], out[2]


def _bwd_triton(logits2d, labels1d, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                vocab_size, out=None):
    # `out` (rows, V) with unit column stride, any float dtype, may alias logits2d
    # (each program reads its block before writing it): used by linear_token_logprobs.
    # Columns from vocab_size on get exactly 0.
    n_rows, n_cols = logits2d.shape
    dlogits = out if out is not None else empty_output((n_rows, n_cols), logits2d.dtype, logits2d.device)
    if n_rows == 0 or n_cols == 0:
        return dlogits
    block_v = _block_v(n_cols, 4096)
    grid = (n_rows, triton.cdiv(n_cols, block_v))
    with on_device_of(logits2d):
        _token_logprobs_bwd_kernel[grid](
            logits2d, labels1d, lse, entropy,
            grad_logprobs if grad_logprobs is not None else lse,
            grad_entropy if grad_entropy is not None else lse,
            dlogits,
            n_cols, vocab_size, logits2d.stride(0), logits2d.stride(1), labels1d.stride(0), dlogits.stride(0),
            float(temperature), int(ignore_index),
            BLOCK_V=block_v, HAS_DLOGPROBS=grad_logprobs is not None, HAS_DENTROPY=grad_entropy is not None,
            num_warps=8 if block_v >= 2048 else 4,
        )
    return dlogits


# ----------------------------------------------------------------------------
# 3. Autograd
# ----------------------------------------------------------------------------

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, temperature, ignore_index, vocab_size, backend):
        fwd = _fwd_triton if backend == "triton" else torch_backend.token_logprobs_forward
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
        bwd = _bwd_triton if ctx.backend == "triton" else torch_backend.token_logprobs_backward
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
    check_positive("temperature", temperature)
    check_ignore_index(ignore_index)
    width = logits.shape[-1]
    if width == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    vocab = check_vocab_size(vocab_size, width, "the last dimension of logits")
    backend = resolve_backend(backend, logits)
    check_labels_in_range(labels, vocab, ignore_index)

    logits2d = as_rows(logits, width)
    labels1d = labels.reshape(-1)
    logprobs, entropy, _ = _TokenLogprobs.apply(logits2d, labels1d, float(temperature), ignore_index, vocab, backend)
    return as_result(logprobs, entropy, logits.shape[:-1], return_entropy)
