"""linear_token_logprobs: lm_head matmul + token logprobs, the (N, V) logits never stored.

Naive PyTorch (``F.linear`` → ``log_softmax(.float())`` → gather, + entropy)
writes the (N, V) logits in the input dtype, a float32 (N, V) log-softmax and
softmax, keeps the log-softmax for backward, and in backward writes a float32
(N, V) gradient and its input-dtype copy: three to four (N, V) float32-sized
tensors resident at the peak (N=16384, V=151936: 10 GB each).

Here the N rows are processed in chunks of C rows. Forward, per chunk: the
chunk's logits (C, V) are computed in float32 by one GEMM, then reduced to
three floats per row (logprob, entropy, log-sum-exp) by token_logprobs' forward
kernel (triton backend) or by torch_backend.linear_logits_chunk_forward_ (torch
backend: the same math in place, one (C, V) temporary), and the buffer is
reused for the next chunk. Backward, per chunk: the logits are recomputed (one
extra GEMM, 8·N·H·V FLOP in all instead of 6) and turned into dlogits in place
from the saved log-sum-exp (token_logprobs' backward kernel, or
torch_backend.linear_logits_chunk_backward_), then dhidden[chunk] = dlogits @ W
(written in float32: K = V terms, rounded once) and dW += dlogitsᵀ @
hidden[chunk], dW accumulated in float32 across chunks and cast once at the
end. Peak extra memory: one chunk's buffers (the budget, see
``chunk_budget_bytes``) plus a float32 (V, H) dW accumulator, whatever N is
(the full formula: ``chunk_rows``).

Batch invariance: every GEMM of a call has the same shape (C, H) x (H, V), the
last chunk is zero-padded to C rows, and the hidden rows are copied into one
contiguous buffer first, so that a row's result does not depend on the number
of rows, on their values, or on where the row sits (BLAS picks its kernel and
blocking from the shape; a tiled GEMM computes every output element of a shape
with the same reduction order). C depends only on (V, H, dtype, device,
backend, budget), never on N. The price: at most C − 1 padded rows of GEMM per
call.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._checks import (
    FLOAT_DTYPES, INT_DTYPES, as_rows, check_chunk_size, check_ignore_index, check_labels_in_range, check_lm_head,
    check_normalizer, check_positive, check_same_device, check_shape, check_tensor,
)
from ._dispatch import empty_output, on_device_of, resolve_backend, triton_interpreter_enabled
from ._math import LN2, exp2_terms, merge_lse2
from . import torch_backend
from .lm_head import (
    ChunkPlan, accumulate_grads, chunk_ranges, fp16_grad_scale, fused_grad_forward, hand_over, held_grad_dtype,
    load_rows, logits_into, weight_operand,
)
from .token_logprobs import (
    as_result, logprob_grad_block, logprob_grad_terms, logprob_rows_backward, logprob_rows_forward,
)


# ----------------------------------------------------------------------------
# 1. Kernels: the row statistics and the dlogits in the GEMM's epilogue
# ----------------------------------------------------------------------------
# The chunked path (section 2) runs token_logprobs' row kernels on one float32
# chunk of logits at a time, written by a GEMM and read back: 8 bytes of
# traffic per logit, in the forward and again in the backward's recompute. The
# fused kernels compute (BLOCK_M, BLOCK_N) tiles of logits with tl.dot and use
# each while it is still in registers, so no logit reaches memory: the forward
# folds it into per-row running statistics, the backward turns it into dlogits
# (written in the GEMM operands' dtype for the two cuBLAS GEMMs of dhidden and
# dW). They serve the triton backend when FASTPPO_LINEAR_FUSED=1
# (`fused_enabled`), until a GPU has measured them against the chunked path
# (bench/linear_logprobs.py).

@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, size_h, n_cols, stride_hm, stride_hk, stride_wv, stride_wk,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 logits h[rows]·w[cols]ᵀ, a tl.dot over H in steps of BLOCK_K (IEEE: float32
    operands, exact products, not TF32; half operands' products are exact either way); rows outside row_ok and
    columns from n_cols on read as 0."""
    kk = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, size_h, BLOCK_K):
        ks = k0 + kk
        a = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_ok[:, None] & (ks[None, :] < size_h), other=0.0)
        b = tl.load(w_cols + ks[:, None] * stride_wk, mask=(cols[None, :] < n_cols) & (ks[:, None] < size_h),
                    other=0.0)
        if IEEE:        # (the interpreter's tl.dot takes no 16-bit operands: it gets them in float32)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, labels_ptr, part_ptr,
    n_rows, size_h, n_cols, n_valid, stride_hm, stride_hk, stride_wv, stride_wk, stride_label, stride_f,
    tiles_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, FTZ: tl.constexpr,
):
    """Grid (row blocks, splits of the weight rows): per row, the base-2 running statistics of y = logit·scale
    (scale = log2(e) / T) over the split's tiles of BLOCK_N columns (`_logits_tile`). Writes the fields r, s, t
    of `_math.online_lse2_step`, reduced per row (the reference moves every tile: a BLOCK_M vector), and the
    label's y (0 outside the split) as fields 0-3 at part_ptr + field·stride_f + row·splits + split. Columns in
    [n_valid, n_cols) are padding: -inf."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows.to(tl.int64) * stride_label, mask=row_ok, other=-1).to(tl.int64)
    k = tl.cast(scale, tl.float32)
    r = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    y_label = tl.zeros([BLOCK_M], tl.float32)
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(n_cols, BLOCK_N))):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, size_h, n_cols, stride_hm, stride_hk, stride_wv,
                           stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        x = tl.where(cols[None, :] < n_valid, acc, float("-inf"))
        y_label += tl.sum(tl.where(cols[None, :] == labels[:, None], x * k, 0.0), axis=1)
        r_new = tl.maximum(r, tl.max(x, axis=1) * k)
        shift = tl.where(r == float("-inf"), 0.0, r - tl.where(r_new == float("-inf"), 0.0, r_new))
        alpha = tl.exp2(shift)                                       # (r = -inf: s = t = 0 so far)
        t = alpha * (t + shift * s)
        s = alpha * s
        d, e = exp2_terms(x, k, r_new[:, None], FTZ)
        s += tl.sum(e, axis=1)
        t += tl.sum(e * d, axis=1)
        r = r_new
    out = part_ptr + rows.to(tl.int64) * tl.num_programs(1) + split
    tl.store(out, r, mask=row_ok)
    tl.store(out + stride_f, s, mask=row_ok)
    tl.store(out + 2 * stride_f, t, mask=row_ok)
    tl.store(out + 3 * stride_f, y_label, mask=row_ok)


@triton.jit
def _linear_logprobs_merge_kernel(
    part_ptr, labels_ptr, out_ptr, n_rows, n_splits, stride_f, stride_label, stride_o, ignore_index,
    BLOCK_M: tl.constexpr, SPLITS: tl.constexpr,
):
    """Per row, the splits' statistics merged (`_math.merge_lse2`): logprob, entropy and natural-log lse at
    out_ptr + field·stride_o + row; an ignored row gets 0, 0, 0 (as token_logprobs)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    offs = rows.to(tl.int64)[:, None] * n_splits + tl.arange(0, SPLITS)[None, :]
    valid = row_ok[:, None] & (tl.arange(0, SPLITS)[None, :] < n_splits)
    r = tl.load(part_ptr + offs, mask=valid, other=float("-inf"))
    s = tl.load(part_ptr + stride_f + offs, mask=valid, other=0.0)
    t = tl.load(part_ptr + 2 * stride_f + offs, mask=valid, other=0.0)
    y_label = tl.sum(tl.load(part_ptr + 3 * stride_f + offs, mask=valid, other=0.0), axis=1)
    r_ref, log2_s, entropy = merge_lse2(r, s, t, 1)
    keep = tl.load(labels_ptr + rows.to(tl.int64) * stride_label, mask=row_ok, other=ignore_index) != ignore_index
    tl.store(out_ptr + rows, tl.where(keep, (y_label - r_ref - log2_s) * LN2, 0.0), mask=row_ok)
    tl.store(out_ptr + stride_o + rows, tl.where(keep, entropy, 0.0), mask=row_ok)
    tl.store(out_ptr + 2 * stride_o + rows, tl.where(keep, (r_ref + log2_s) * LN2, 0.0), mask=row_ok)


@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, labels_ptr, lse_ptr, entropy_ptr, dlogprobs_ptr, dentropy_ptr, dlogits_ptr,
    n_rows, size_h, n_cols, n_valid, stride_hm, stride_hk, stride_wv, stride_wk, stride_label, stride_dm,
    scale, inv_temp, ignore_index,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DLOGPROBS: tl.constexpr,
    HAS_DENTROPY: tl.constexpr, IEEE: tl.constexpr, FTZ: tl.constexpr,
):
    """Grid (row blocks, column tiles; row blocks vary fastest, so that the programs in flight share a tile of
    the weight): the dlogits of a (BLOCK_M, BLOCK_N) tile, its logits recomputed by `_logits_tile` and turned
    into gradients in registers (token_logprobs' backward formula, from the saved lse), stored in dlogits'
    dtype at dlogits_ptr + row·stride_dm + column. Columns in [n_valid, n_cols) are padding, an ignored row's
    logits are taken as −inf (gradient 0 either way: `logprob_grad_terms`)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    labels = tl.load(labels_ptr + rows64 * stride_label, mask=row_ok, other=ignore_index).to(tl.int64)
    lse2, c, a, b = logprob_grad_terms(
        labels == ignore_index, tl.cast(inv_temp, tl.float32),
        tl.load(lse_ptr + rows, mask=row_ok, other=0.0),
        tl.load(dlogprobs_ptr + rows, mask=row_ok, other=0.0) if HAS_DLOGPROBS else 0.0,
        tl.load(dentropy_ptr + rows, mask=row_ok, other=0.0) if HAS_DENTROPY else 0.0,
        tl.load(entropy_ptr + rows, mask=row_ok, other=0.0) if HAS_DENTROPY else 0.0)
    acc = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, size_h, n_cols, stride_hm, stride_hk, stride_wv,
                       stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
    x = tl.where((cols[None, :] < n_valid) & (labels != ignore_index)[:, None], acc, float("-inf"))
    grad = logprob_grad_block(x, cols[None, :], labels[:, None], lse2[:, None], tl.cast(scale, tl.float32),
                              c[:, None], a[:, None], b[:, None], FTZ)
    tl.store(dlogits_ptr + rows64[:, None] * stride_dm + cols[None, :], grad.to(dlogits_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < n_cols))


# ----------------------------------------------------------------------------
# 2. Chunk planning and the chunked forward / backward
# ----------------------------------------------------------------------------

# Extra memory one call may use for its per-chunk buffers. On CPU a fixed
# 128 MiB: C = 512 at V = 32000 with the torch backend (8 bytes per logit):
# forward + backward at N=2048, H=512 took 2.9 s there against 3.2 s at C = 256
# and 4.2 s at C = 128 (2-core x86 VM, float32), the naive path 3.3 s.
# On a GPU a fraction of the device's memory, clamped (see gpu_chunk_budget_bytes).
# Override with the environment variable FASTPPO_LINEAR_CHUNK_MB (read per call).
DEFAULT_CHUNK_BUDGET_BYTES = {"cpu": 128 << 20}
# Why the GPU budget must grow with V·H: the dW update dW += dlogitsᵀ @ h reads
# and writes the float32 (V, H) accumulator (8·V·H bytes) for 2·C·V·H FLOP,
# C/4 FLOP per byte; it is compute-bound only above the chip's ridge point
# (H100: ~990 TFLOP/s / ~3.35 TB/s ≈ 300 FLOP/byte, H200: ~790 / ~4.3 ≈ 185),
# so C must reach ~1200 rows, better 2048 or more. A fixed 1 GiB gave C = 656 at
# V = 256000, H = 8192 (memory-bound dW, and 656 = 5·128 + 16: a 14% tail of
# GEMM tiles). 1/16 of the device gives C = 3072 on an 80 GB GPU and the cap,
# 4096, on a 141 GB one; the floor keeps small GPUs at the old 1 GiB, the
# ceiling bounds the waste of the zero-padded last chunk.
GPU_CHUNK_BUDGET_FRACTION = 1 / 16
GPU_CHUNK_BUDGET_BOUNDS = (1 << 30, 16 << 30)
MAX_CHUNK_ROWS = 4096
# GEMM tiles are 64 or 128 rows on current GPUs: a chunk of a multiple of 128 rows wastes no tile.
CHUNK_ROW_QUANTUM = 128


def gpu_chunk_budget_bytes(total_memory: int) -> int:
    """The chunk budget on a GPU of `total_memory` bytes: GPU_CHUNK_BUDGET_FRACTION of it, within the bounds."""
    low, high = GPU_CHUNK_BUDGET_BOUNDS
    return int(min(high, max(low, total_memory * GPU_CHUNK_BUDGET_FRACTION)))


def chunk_budget_bytes(device: torch.device) -> int:
    """The per-call chunk budget: FASTPPO_LINEAR_CHUNK_MB if set, else the default for the device."""
    env = os.environ.get("FASTPPO_LINEAR_CHUNK_MB", "").strip()
    if env:
        try:
            mb = float(env)
        except ValueError:
            mb = -1.0
        if not mb > 0:
            raise ValueError(f"FASTPPO_LINEAR_CHUNK_MB must be a positive number of MB, got {env!r}")
        return int(mb * (1 << 20))
    if device.type == "cpu":
        return DEFAULT_CHUNK_BUDGET_BYTES["cpu"]
    if device.type == "cuda":
        return gpu_chunk_budget_bytes(torch.cuda.get_device_properties(device).total_memory)
    return GPU_CHUNK_BUDGET_BOUNDS[0]


_FP32_OUT_GEMM: dict[tuple[str, torch.dtype], bool] = {}


def _has_fp32_out_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm / torch.addmm take `dtype` operands and write float32 (``out_dtype``).

    cuBLAS does (and accumulates in float32 either way); CPU builds have no
    kernel for it. Probed once per (device type, dtype) on tiny matrices.
    """
    if dtype == torch.float32:
        return False
    key = (device.type, dtype)
    if key not in _FP32_OUT_GEMM:
        ok = False
        if device.type == "cuda":
            try:
                # Small integers (exact in any dtype); no random draws, so the caller's RNG stream is untouched.
                a = (torch.arange(32 * 16, device=device).reshape(32, 16) % 7 - 3).to(dtype)
                b = (torch.arange(16 * 8, device=device).reshape(16, 8) % 5 - 2).to(dtype)
                want = a.double() @ b.double()
                out = torch.empty(32, 8, device=device)
                torch.mm(a, b, torch.float32, out=out)
                acc = torch.ones(32, 8, device=device)
                torch.addmm(acc, a, b, torch.float32, out=acc)
                ok = bool(torch.allclose(out.double(), want, atol=1e-2)) and bool(
                    torch.allclose(acc.double(), want + 1, atol=1e-2))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _FP32_OUT_GEMM[key] = ok
    return _FP32_OUT_GEMM[key]


def bytes_per_chunk_row(vocab: int, hidden_size: int, dtype: torch.dtype, backend: str, fp32_out: bool) -> int:
    """Bytes of chunk buffers per chunk row, V the (padded) number of weight rows.

    The float32 logits (4·V), the dlogits in the input dtype when the GEMM
    writes float32 from half operands (2·V; otherwise dlogits overwrite the
    logits), the torch backend's one float32 temporary (4·V, see
    torch_backend.linear_logits_chunk_forward_), and two (H,) rows of GEMM operands
    and results (the hidden rows, the float32 dhidden rows): 8·H.
    """
    per_row = 4 * vocab + 8 * hidden_size
    if fp32_out:
        per_row += torch.empty((), dtype=dtype).element_size() * vocab
    if backend == "torch":
        per_row += 4 * vocab
    return per_row


def rows_within(budget_bytes: int, per_row: int) -> int:
    """Chunk rows that fit the budget: at most MAX_CHUNK_ROWS, rounded down to a multiple of
    CHUNK_ROW_QUANTUM when at least that many fit, else of 16, never 0."""
    rows = min(MAX_CHUNK_ROWS, budget_bytes // per_row)
    for quantum in (CHUNK_ROW_QUANTUM, 16):
        if rows >= quantum:
            return rows - rows % quantum
    return max(1, rows)


def chunk_rows(vocab: int, hidden_size: int, dtype: torch.dtype, device: torch.device, backend: str,
               budget_bytes: int | None = None) -> int:
    """Rows per chunk for (V, H, dtype, device, backend) within the budget; never depends on N.

    C does not depend on the number of rows N, so that a row's result does not
    either (see the module docstring): a call with N < C pays C rows of GEMM.

    Peak extra memory of one forward + backward (e = bytes per element of the
    input dtype, N rows), reached at the end of the backward; `peak_extra_bytes`
    computes it:
      C · bytes_per_chunk_row(...)    the chunk buffers (≤ the budget)
      + 4·V·H                         the float32 dW accumulator (weight needs a gradient)
      + e·V·H                         dW in the weight's dtype, cast from it at the end (e < 4)
      + e·N·H                         dhidden (hidden needs a gradient)
      + 4·V·H                         a float32 copy of the weight where half operands are
                                      upcast (no float32-output GEMM: CPU)
    linear_ppo_loss holds the same from its forward (where it computes the
    gradients) to its backward. Under FSDP the all-gathered (V, H) weight,
    e·V·H, is live during the call as well (``gathered_weight``).
    """
    if budget_bytes is None:
        budget_bytes = chunk_budget_bytes(device)
    fp32_out = _has_fp32_out_gemm(device, dtype)
    return rows_within(budget_bytes, bytes_per_chunk_row(vocab, hidden_size, dtype, backend, fp32_out))


def peak_extra_bytes(n_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype, backend: str, *, chunk: int,
                     fp32_out: bool, need_dhidden: bool = True, need_dweight: bool = True,
                     gathered_weight: bool = False) -> int:
    """Peak extra memory of one forward + backward, by the formula in `chunk_rows`."""
    e = torch.empty((), dtype=dtype).element_size()
    weights = vocab * hidden_size
    total = chunk * bytes_per_chunk_row(vocab, hidden_size, dtype, backend, fp32_out)
    if need_dweight:
        total += 4 * weights + (e * weights if e < 4 else 0)
    if need_dhidden:
        total += e * n_rows * hidden_size
    if e < 4 and not fp32_out:
        total += 4 * weights
    if gathered_weight:
        total += e * weights
    return total


def chunk_plan(hidden2d: torch.Tensor, weight: torch.Tensor, backend: str, chunk_size: int | None) -> ChunkPlan:
    """The `ChunkPlan` of one call of either linear op: chunk rows (chunk_size, else `chunk_rows`) and operands."""
    fp32_out = _has_fp32_out_gemm(hidden2d.device, hidden2d.dtype)
    chunk = chunk_size if chunk_size is not None else chunk_rows(
        weight.shape[0], weight.shape[1], hidden2d.dtype, hidden2d.device, backend)
    operand = hidden2d.dtype if fp32_out else torch.float32
    return ChunkPlan(chunk, operand, fp32_out)


def _forward(hidden2d, weight, labels1d, temperature, ignore_index, vocab_size, backend, plan):
    """-> logprobs, entropy, lse, each (N,) float32."""
    n_rows, vocab, device = hidden2d.shape[0], weight.shape[0], hidden2d.device
    out = torch.zeros(3, n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return out[0], out[1], out[2]
    fwd = logprob_rows_forward if backend == "triton" else torch_backend.linear_logits_chunk_forward_
    w = weight_operand(weight, plan)
    h_buf = torch.empty(plan.chunk, hidden2d.shape[1], dtype=plan.operand_dtype, device=device)
    logits = empty_output((plan.chunk, vocab), torch.float32, device)
    for start, n in chunk_ranges(n_rows, plan.chunk):
        logits_into(logits, load_rows(h_buf, hidden2d, start, n), w, plan)
        stats = fwd(logits[:n], labels1d[start:start + n], temperature, ignore_index, vocab_size)
        for dst, src in zip(out, stats):
            dst[start:start + n] = src
    return out[0], out[1], out[2]


# The fused kernels' tiles on a GPU (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), by operand dtype: half operands
# on the tensor cores; float32 exact (IEEE), smaller. The largest that compile without spills on sm_80 and
# sm_90 (BLOCK_K = 64 spills the forward on sm_80: the tile's epilogue holds its 128 x 128 float32 logits and
# their exponentials); not yet tuned on a GPU. The interpreter's cost is per program and loop trip, and
# tl.dot needs 16 or more: small tiles. Splits of the weight rows per row block: by V only (at most
# _FUSED_SPLITS), so that a row's result never depends on N.
_FUSED_TILES = {torch.bfloat16: (128, 128, 32, 8, 4), torch.float16: (128, 128, 32, 8, 4),
                torch.float32: (64, 64, 16, 4, 2)}
_FUSED_TILES_INTERPRETED = (16, 32, 16, 4, 1)
_FUSED_SPLITS = 8
_MERGE_ROWS = 128


def fused_enabled() -> bool:
    """Whether the triton backend runs the fused GEMM-epilogue kernels (FASTPPO_LINEAR_FUSED=1, read by each
    forward; its backward follows it): the forward's row statistics and the backward's dlogits from tiles of
    logits in registers, rather than from a chunk of float32 logits written to memory and read back."""
    value = os.environ.get("FASTPPO_LINEAR_FUSED", "0").strip().lower()
    if value not in ("0", "1", "false", "true", ""):
        raise ValueError(f"FASTPPO_LINEAR_FUSED must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def _fused_tiles(dtype: torch.dtype) -> tuple:
    return _FUSED_TILES_INTERPRETED if triton_interpreter_enabled() else _FUSED_TILES[dtype]


def _fused_forward(hidden2d, weight, labels1d, temperature, ignore_index, vocab_size):
    """The triton forward without logits in memory: -> logprobs, entropy, lse, each (N,) float32."""
    n_rows, size_h = hidden2d.shape
    n_cols, device = weight.shape[0], hidden2d.device
    out = torch.zeros(3, n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return out[0], out[1], out[2]
    interpreted = triton_interpreter_enabled()
    bm, bn, bk, warps, stages = _fused_tiles(hidden2d.dtype)
    n_tiles = triton.cdiv(n_cols, bn)
    per_split = triton.cdiv(n_tiles, min(n_tiles, _FUSED_SPLITS))
    n_splits = triton.cdiv(n_tiles, per_split)
    part = empty_output((4, n_rows, n_splits), torch.float32, device)
    with on_device_of(hidden2d):
        _linear_logprobs_fwd_kernel[(triton.cdiv(n_rows, bm), n_splits)](
            hidden2d, weight, labels1d, part, n_rows, size_h, n_cols, vocab_size, hidden2d.stride(0),
            hidden2d.stride(1), weight.stride(0), weight.stride(1), labels1d.stride(0), part.stride(0), per_split,
            math.log2(math.e) / temperature,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=interpreted or hidden2d.dtype == torch.float32,
            FTZ=not interpreted, num_warps=warps, num_stages=stages,
        )
        _linear_logprobs_merge_kernel[(triton.cdiv(n_rows, _MERGE_ROWS),)](
            part, labels1d, out, n_rows, n_splits, part.stride(0), labels1d.stride(0), out.stride(0),
            int(ignore_index), BLOCK_M=_MERGE_ROWS, SPLITS=triton.next_power_of_2(n_splits),
        )
    return out[0], out[1], out[2]


def _fused_dlogits(out, h, w, labels1d, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                   vocab_size):
    """dlogits of h's rows into out (rows, V) in out's dtype, from tiles of logits in registers
    (`_linear_logprobs_bwd_kernel`): no logits in memory."""
    n_rows, size_h = h.shape
    n_cols = w.shape[0]
    interpreted = triton_interpreter_enabled()
    bm, bn, bk, warps, stages = _fused_tiles(h.dtype)
    with on_device_of(h):
        _linear_logprobs_bwd_kernel[(triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))](
            h, w, labels1d, lse, entropy,
            grad_logprobs if grad_logprobs is not None else lse,
            grad_entropy if grad_entropy is not None else lse,
            out, n_rows, size_h, n_cols, vocab_size, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
            labels1d.stride(0), out.stride(0), math.log2(math.e) / temperature, 1.0 / temperature, int(ignore_index),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_DLOGPROBS=grad_logprobs is not None,
            HAS_DENTROPY=grad_entropy is not None, IEEE=interpreted or h.dtype == torch.float32, FTZ=not interpreted,
            num_warps=warps, num_stages=stages,
        )


def _backward(hidden2d, weight, labels1d, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
              vocab_size, backend, plan, need_dhidden, need_dweight, fused):
    """-> dhidden (N, H) in hidden's dtype or None, dweight (V, H) in weight's dtype or None. fused: the dlogits
    from `_fused_dlogits` (triton backend)."""
    n_rows, size_h = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    dhidden = empty_output((n_rows, size_h), hidden2d.dtype, device) if need_dhidden else None
    dw_acc = torch.zeros(vocab, size_h, dtype=torch.float32, device=device) if need_dweight else None
    if n_rows > 0:
        w = weight_operand(weight, plan)
        h_buf = torch.empty(plan.chunk, size_h, dtype=plan.operand_dtype, device=device)
        dh_buf = torch.empty(plan.chunk, size_h, dtype=torch.float32, device=device) if need_dhidden else None
        # The fused kernel writes dlogits alone; else dlogits overwrite the float32 logits in place unless the
        # GEMMs take half operands.
        logits = None if fused else empty_output((plan.chunk, vocab), torch.float32, device)
        dlogits = logits if logits is not None and plan.operand_dtype == torch.float32 else empty_output(
            (plan.chunk, vocab), plan.operand_dtype, device)
        # fp16 dlogits: the upstream gradients scaled by a power of two so that the largest is ~1 (lm_head).
        largest = torch.zeros((), device=device)
        for g in (grad_logprobs, grad_entropy):
            if g is not None:
                largest = torch.maximum(largest, g.abs().amax())
        scale = fp16_grad_scale(plan, hidden2d.dtype, largest)
        if scale is not None:
            grad_logprobs = None if grad_logprobs is None else grad_logprobs * scale
            grad_entropy = None if grad_entropy is None else grad_entropy * scale
        for start, n in chunk_ranges(n_rows, plan.chunk):
            rows = slice(start, start + n)
            h = load_rows(h_buf, hidden2d, start, n)
            # Ignored rows get no gradient whatever they hold (NaN too): their dlogits are 0, and dW's 0·h must
            # not meet a NaN.
            h[:n].masked_fill_((labels1d[rows] == ignore_index)[:, None], 0.0)
            args = (labels1d[rows], lse[rows], entropy[rows],
                    None if grad_logprobs is None else grad_logprobs[rows],
                    None if grad_entropy is None else grad_entropy[rows], temperature, ignore_index, vocab_size)
            if fused:                                                          # recompute in registers
                _fused_dlogits(dlogits[:n], h[:n], w, *args)
            elif backend == "triton":
                logprob_rows_backward(logits_into(logits, h, w, plan)[:n], *args, out=dlogits[:n])  # recompute
            else:
                torch_backend.linear_logits_chunk_backward_(logits_into(logits, h, w, plan)[:n], *args)  # in place
                if dlogits is not logits:
                    dlogits[:n] = logits[:n]
            accumulate_grads(dlogits, n, h, dh_buf, w, plan, dhidden, dw_acc, rows, unscale=scale)
        if dw_acc is not None and scale is not None:
            dw_acc.div_(scale)
    dweight = None
    if need_dweight:
        dweight = dw_acc if weight.dtype == torch.float32 else dw_acc.to(weight.dtype)
    return dhidden, dweight


# ----------------------------------------------------------------------------
# 3. Autograd
# ----------------------------------------------------------------------------

class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, labels1d, temperature, ignore_index, vocab_size, backend, chunk_size):
        plan = chunk_plan(hidden2d, weight, backend, chunk_size)
        ctx.fused = backend == "triton" and fused_enabled()          # the backward follows its forward's switch
        if ctx.fused:
            logprobs, entropy, lse = _fused_forward(hidden2d, weight, labels1d, temperature, ignore_index, vocab_size)
        else:
            logprobs, entropy, lse = _forward(hidden2d, weight, labels1d, temperature, ignore_index, vocab_size,
                                              backend, plan)
        # Only (N,) statistics are saved besides the inputs; the logits are recomputed in backward.
        ctx.save_for_backward(hidden2d, weight, labels1d, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.vocab_size = temperature, ignore_index, vocab_size
        ctx.backend, ctx.plan = backend, plan
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        need_dhidden, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logprobs is None and grad_entropy is None) or not (need_dhidden or need_dweight):
            return (None,) * 8
        hidden2d, weight, labels1d, lse, entropy = ctx.saved_tensors
        # Upstream grads can be expanded views (e.g. from .sum()); (N,) floats are cheap to copy.
        if grad_logprobs is not None:
            grad_logprobs = grad_logprobs.float().contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float().contiguous()
        dhidden, dweight = _backward(
            hidden2d, weight, labels1d, lse, entropy, grad_logprobs, grad_entropy, ctx.temperature,
            ctx.ignore_index, ctx.vocab_size, ctx.backend, ctx.plan, need_dhidden, need_dweight, ctx.fused)
        return (dhidden, dweight) + (None,) * 6


# ----------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------

def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
):
    """Log-probability of each label under softmax(hidden @ weightᵀ / temperature), without the logits.

    The fused form of ``token_logprobs(F.linear(hidden, weight), labels, ...)``
    for an lm_head: the (..., V) logits are never materialised, in forward or
    backward. Rows are processed in chunks of ``chunk_size`` rows, each chunk's
    logits computed in float32 and reduced to per-row statistics at once;
    backward recomputes them chunk by chunk.

    Args:
        hidden: (..., H) float32, bfloat16 or float16; any strides.
        weight: (V, H), same dtype and device as ``hidden`` (e.g. the lm_head
            weight, which may be tied to the input embedding).
        labels: (...) integer, values in [0, vocab_size) or ``ignore_index``.
        temperature: > 0; the logits are divided by it (use the sampling temperature).
        return_entropy: also return the entropy of softmax(logits / temperature).
        ignore_index: label value whose positions give 0 and no gradient.
        vocab_size: weight rows (logit columns) ≥ vocab_size are alignment
            padding (an embedding resized to a multiple of 64), excluded from
            the softmax: probability 0 and zero gradient (their dW rows are 0).
            The GEMMs still run on the whole padded weight. ``None`` = all V rows.
        backend: ``None`` (triton on CUDA, torch elsewhere; ``FASTPPO_BACKEND``
            overrides), ``"triton"`` or ``"torch"``. Selects the per-row
            kernels; the matmuls are torch.mm (cuBLAS / CPU BLAS) either way.
        chunk_size: rows per chunk. ``None`` chooses it from a memory budget:
            ``FASTPPO_LINEAR_CHUNK_MB`` if set, else 1/16 of the GPU's memory
            (within 1–16 GiB, ``gpu_chunk_budget_bytes``) and 128 MiB on CPU;
            see ``chunk_rows``, which also gives the peak extra memory: about
            that budget plus a float32 (V, H) dW accumulator in backward,
            independent of the number of rows.

    Returns:
        logprobs (...) float32, or ``(logprobs, entropy)`` as a named tuple
        when ``return_entropy``. Both are differentiable in ``hidden`` and
        ``weight``; the gradients come back in their dtypes (dW summed over
        chunks in float32, cast once).

    A row's result is bitwise the same whatever the other rows of the call
    are, and however many there are, for a given chunk size (the default one
    does not depend on N): see the module docstring.
    """
    vocab = check_lm_head(hidden, weight, vocab_size)
    check_tensor("labels", labels, dtypes=INT_DTYPES)
    check_same_device("labels", labels, "hidden", hidden)
    check_shape("labels", labels, hidden.shape[:-1], "the leading dimensions of hidden")
    temperature = check_positive("temperature", temperature)
    check_ignore_index(ignore_index)
    check_chunk_size(chunk_size)
    backend = resolve_backend(backend, hidden, "hidden")
    check_labels_in_range(labels, vocab, ignore_index)

    hidden2d = as_rows(hidden, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    logprobs, entropy, _ = _LinearTokenLogprobs.apply(
        hidden2d, weight, labels1d, float(temperature), ignore_index, vocab, backend, chunk_size)
    return as_result(logprobs, entropy, hidden.shape[:-1], return_entropy)


# ----------------------------------------------------------------------------
# 5. The loss form: the gradients in the forward, no logits recomputed
# ----------------------------------------------------------------------------

class LogprobLossOutput(NamedTuple):
    """Results of `linear_logprob_loss`: ``loss`` (0-dim float32, differentiable in hidden and weight) and the
    per-token ``logprobs`` (float32, detached, 0 at ignored labels)."""

    loss: torch.Tensor
    logprobs: torch.Tensor


class _LinearLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels1d, weight1d, norm, temperature, ignore_index, vocab_size, backend,
                chunk_size, need_dh, need_dw):
        hidden2d = as_rows(hidden, hidden.shape[-1])
        device = hidden.device
        valid = labels1d != ignore_index
        if backend == "torch" or device.type == "cpu":                   # only the scored tokens' rows (a sync)
            index = valid.nonzero().squeeze(1)
            labels_t = labels1d.index_select(0, index).long()
            w_t = None if weight1d is None else weight1d.index_select(0, index).float()
            count = torch.full((), float(index.numel()), device=device)
        else:                                                           # every row; the kernels skip label -100
            index = None
            labels_t = torch.where(valid, labels1d, -100).long()
            w_t = torch.where(valid, 1.0 if weight1d is None else weight1d.float(), 0.0)
            count = valid.sum(dtype=torch.float32)
        norm = count if norm is None else norm
        norm = torch.where(norm > 0, norm, 1.0)                         # 0 (nothing scored) counts as 1
        plan = chunk_plan(hidden2d, weight, backend, chunk_size)
        largest = (torch.ones((), device=device) if w_t is None or w_t.numel() == 0 else w_t.abs().amax()) / norm
        scale = fp16_grad_scale(plan, hidden.dtype, largest)

        def coefficients(group, _logprobs, _entropy):                   # d loss / d logprob = −w / n
            g = -(w_t[group] if w_t is not None else torch.ones(group.stop - group.start, device=device))
            return g / norm, None

        n_tok = labels_t.numel()
        groups = [(start, start + n) for start, n in chunk_ranges(n_tok, plan.chunk)]
        lp_ent, dhidden, dw_acc = fused_grad_forward(hidden2d, weight, index, labels_t, plan, backend, temperature,
                                                     vocab_size, groups, coefficients, need_dh, need_dw, scale)
        lp = lp_ent[0]
        loss = -(lp if w_t is None else lp * w_t).sum() / norm
        if index is None:
            logprobs = lp
        else:
            logprobs = torch.zeros(hidden2d.shape[0], dtype=torch.float32, device=device)
            logprobs.index_copy_(0, index, lp)
        dweight = None
        if need_dw:
            dweight = dw_acc if held_grad_dtype(weight.dtype) == torch.float32 else dw_acc.to(weight.dtype)
        ctx.grads = (dhidden.view(hidden.shape) if need_dh else None, dweight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logprobs)
        ctx.set_materialize_grads(False)
        return loss, logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_logprobs):
        nothing = (None,) * 10
        if grad_loss is None:
            return (None, None) + nothing
        if ctx.grads is None:
            raise RuntimeError(
                "linear_logprob_loss: backward through the same result twice; its gradients are computed in "
                "forward and handed over (scaled in place) by the first backward. Call linear_logprob_loss again.")
        dhidden, dweight = ctx.grads
        ctx.grads = None
        g = grad_loss.float()
        return (hand_over(dhidden, g, ctx.dtypes[0]), hand_over(dweight, g, ctx.dtypes[1])) + nothing


def linear_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_weight: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> LogprobLossOutput:
    """The loss form of `linear_token_logprobs`: loss = −Σ_t w_t·log p(label_t) / normalizer, over the tokens
    whose label is not ignore_index, p = softmax(hidden @ weightᵀ / temperature), with its gradients computed
    in the same pass (as `linear_ppo_loss`): the language-model loss of SFT, of the reward model's LM term and
    of PPO's ptx term.

    ``linear_token_logprobs`` + a weighted sum is the same loss but recomputes each chunk's logits in its
    backward (8·N·H·V FLOP); here the per-token coefficient −w_t / normalizer is known in the forward, so each
    chunk's logits are computed once and turned into dlogits while in memory (6·N·H·V FLOP, see
    `lm_head.fused_grad_forward`). dhidden and dW are kept from the forward to the backward, which scales them
    by the upstream gradient in place: one backward per call. Under ``torch.no_grad()`` (or without inputs
    that require grad) only the loss is computed.

    Args:
        hidden, weight, labels, temperature, ignore_index, vocab_size, backend, chunk_size: as in
            `linear_token_logprobs`. On CPU (and with the torch backend) only the scored tokens' rows are
            computed; on a GPU with the Triton kernels every row (no host sync), the ignored ones masked.
        loss_weight: None (w = 1), or a float tensor of labels' shape on hidden's device, never differentiated
            (e.g. a per-sequence aggregation weight). Read only where labels are not ignore_index.
        normalizer: the denominator: None (the number of scored tokens here), a number ≥ 0 or a 1-element
            tensor (e.g. the count over all ranks, so that micro-batch losses add up). 0 counts as 1.

    Returns:
        `LogprobLossOutput` (loss 0-dim float32; logprobs of labels' shape, float32, detached). Gradients come
        back in the inputs' dtypes, dW summed over chunks in float32 and cast once; with fp16 inputs and half
        GEMMs the dlogits are scaled before the half cast (`lm_head.fp16_grad_scale`).
    """
    vocab = check_lm_head(hidden, weight, vocab_size)
    check_tensor("labels", labels, dtypes=INT_DTYPES)
    check_same_device("labels", labels, "hidden", hidden)
    check_shape("labels", labels, hidden.shape[:-1], "the leading dimensions of hidden")
    if loss_weight is not None:
        check_tensor("loss_weight", loss_weight, dtypes=(*FLOAT_DTYPES, torch.float64))
        check_same_device("loss_weight", loss_weight, "hidden", hidden)
        check_shape("loss_weight", loss_weight, labels.shape, "the shape of labels")
    temperature = check_positive("temperature", temperature)
    check_ignore_index(ignore_index)
    check_chunk_size(chunk_size)
    norm = check_normalizer(normalizer, "hidden", hidden)
    if norm is not None and not isinstance(norm, torch.Tensor):
        norm = torch.full((), norm, device=hidden.device)
    backend = resolve_backend(backend, hidden, "hidden")
    check_labels_in_range(labels, vocab, ignore_index)
    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    loss, logprobs = _LinearLogprobLoss.apply(
        hidden, weight, labels.reshape(-1), None if loss_weight is None else loss_weight.detach().reshape(-1), norm,
        float(temperature), ignore_index, vocab, backend, chunk_size, need_dh, need_dw)
    return LogprobLossOutput(loss, logprobs.view(labels.shape))
