"""The chunked lm_head GEMMs shared by linear_token_logprobs and linear_ppo_loss.

Both ops run the N token rows through the (V, H) lm_head in chunks of C rows:
one GEMM writes a chunk's float32 logits (C, V), a row pass reduces them, and
(for gradients) the logits are turned into dlogits in place, followed by the
two backward GEMMs dhidden[chunk] = dlogits @ W and dW += dlogitsᵀ @ h. This
module holds those pieces, and `fused_grad_forward`: the chunk loop of the
loss forms, which compute every gradient in the forward (6·N·H·V FLOP; the
logits of a chunk are computed once and never stored beyond it) for a loss
whose per-token coefficients d loss / d logprob are known once a group of
tokens' logprobs are (a group is a chunk, or GSPO's whole sequences).

fp16: dlogits of a token mean over n ≈ 10⁴ tokens are ≈ p / n ≈ 10⁻⁹, below
fp16's smallest subnormal (6·10⁻⁸), where the half GEMMs take fp16 dlogits (a
float32-output GEMM, CUDA). The loss forms and the backward of
linear_token_logprobs then scale the per-token coefficients by a power of two
(`fp16_grad_scale`: exact) so that the largest is about 2^8 before the cast,
and unscale the float32 GEMM results: dlogits keep fp16's full relative precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._dispatch import empty_output
from . import torch_backend
from .token_logprobs import logprob_rows_backward, logprob_rows_forward


@dataclass(frozen=True)
class ChunkPlan:
    """How one call runs: chunk rows C and the GEMM operand dtype.

    fp32_out: half-precision operands, float32 GEMM output (cuBLAS ``out_dtype``):
        the logits are exact float32 sums of exact bf16 products. dlogits are
        rounded to the input dtype for the two backward GEMMs, as in any
        bf16 lm_head backward (fp16: scaled first, see `fp16_grad_scale`).
    Otherwise operands are float32: float32 inputs as they are, and half inputs
    where no mixed GEMM exists (CPU) upcast (the weight once per forward and
    once per backward: an extra V·H·4 bytes, outside the chunk budget).
    """

    chunk: int
    operand_dtype: torch.dtype
    fp32_out: bool


def chunk_ranges(n_rows: int, chunk: int):
    """(start, rows) of each chunk; chunk boundaries are fixed at multiples of C from row 0."""
    for start in range(0, n_rows, chunk):
        yield start, min(chunk, n_rows - start)


def load_rows(h_buf: torch.Tensor, hidden2d: torch.Tensor, start: int, n: int,
              index: torch.Tensor | None = None) -> torch.Tensor:
    """Copy hidden rows [start, start + n) (or rows index[start:start + n]) into the (C, H) operand buffer, zeros
    below."""
    if index is None:
        h_buf[:n].copy_(hidden2d[start:start + n])
    else:
        h_buf[:n].copy_(hidden2d.index_select(0, index[start:start + n]))
    if n < h_buf.shape[0]:
        h_buf[n:].zero_()
    return h_buf


def weight_operand(weight: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    return weight if weight.dtype == plan.operand_dtype else weight.to(plan.operand_dtype)


def logits_into(logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """logits (C, V) float32 = h (C, H) @ w (V, H)ᵀ, float32 accumulation."""
    if plan.fp32_out:
        return torch.mm(h, w.t(), torch.float32, out=logits)
    return torch.mm(h, w.t(), out=logits)


def dhidden_into(dh32: torch.Tensor, dlogits: torch.Tensor, w: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """dh32 (C, H) float32 = dlogits (C, V) @ w (V, H).

    The reduction runs over K = V (~150k) terms: written in float32 and rounded
    to the input dtype once by the caller. A half-precision output would let
    cuBLAS reduce split-K partial sums in that precision.
    """
    if plan.fp32_out:
        return torch.mm(dlogits, w, torch.float32, out=dh32)
    return torch.mm(dlogits, w, out=dh32)


def chunk_logits(logits, h_buf, w, plan: ChunkPlan, backend: str, temperature: float) -> None:
    """The chunk's float32 logits (C, V): as they are for the Triton kernels (which divide by T), divided by T
    for the torch backend (folded into the GEMM where that is free)."""
    if backend == "triton" or plan.fp32_out or temperature == 1.0:
        logits_into(logits, h_buf, w, plan)
        if backend != "triton" and temperature != 1.0:
            logits.div_(temperature)
    else:
        torch.addmm(logits, h_buf, w.t(), beta=0.0, alpha=1.0 / temperature, out=logits)


def accumulate_grads(dlogits, n, h_buf, dh_buf, w, plan: ChunkPlan, dhidden, dw_acc, rows, index_rows=None,
                     unscale=None) -> None:
    """dhidden rows (dlogits @ W at `rows`, or at hidden rows index_rows when the tokens are gathered) and
    dW += dlogitsᵀ @ h for one chunk of n tokens (the chunk's padding rows zeroed first: no gradient).
    unscale: the 0-dim float32 scale of the dlogits (`fp16_grad_scale`), divided out of dhidden here (dW's
    accumulator is unscaled once by the caller), or None."""
    if n < plan.chunk:
        dlogits[n:].zero_()
    if dhidden is not None:
        dhidden_into(dh_buf, dlogits, w, plan)                          # (C, V) @ (V, H), float32
        if unscale is not None:
            dh_buf.div_(unscale)
        if index_rows is None:
            dhidden[rows] = dh_buf[:n]                                  # rounded once
        else:
            dhidden.index_copy_(0, index_rows, dh_buf[:n].to(dhidden.dtype))
    if dw_acc is not None:
        if plan.fp32_out:
            torch.addmm(dw_acc, dlogits.t(), h_buf, torch.float32, out=dw_acc)
        else:
            torch.addmm(dw_acc, dlogits.t(), h_buf, out=dw_acc)          # (V, C) @ (C, H), float32


def fp16_grad_scale(plan: ChunkPlan, hidden_dtype: torch.dtype, largest: torch.Tensor) -> torch.Tensor | None:
    """The power of two s (0-dim float32, on the device: no host sync) by which dlogits are multiplied before
    they are rounded to fp16, or None when they are not rounded to fp16 (float32 or bf16 dlogits: fp32's range).

    largest: a 0-dim bound of the per-token coefficients |d loss / d logprob| and |d loss / d entropy| (e.g.
    1 / n for a token mean). s = 2^(FP16_GRAD_TARGET − round(log2 largest)) brings it to ~2^8: a dlogit
    g·([j = label] − p_j)/T is then at most ~2^8·(1 + H)/T (H ≤ log V the entropy term's factor) in magnitude,
    far below fp16's 65504 for T ≥ 0.1 (V ≈ 1.5·10⁵), and p_j down to ~2^−24 / 2^8 ≈ 2·10⁻¹⁰ stays a
    normal fp16 number (full relative precision). Exact: multiplying and dividing by a power of two changes no
    digit of a normal number. 1 when largest is 0 or not finite.
    """
    if not (plan.fp32_out and hidden_dtype == torch.float16):
        return None
    largest = largest.float()
    ok = torch.isfinite(largest) & (largest > 0)
    exponent = torch.round(torch.log2(torch.where(ok, largest, torch.ones_like(largest))))
    return torch.exp2(FP16_GRAD_TARGET - torch.where(ok, exponent, FP16_GRAD_TARGET))


# log2 of the magnitude `fp16_grad_scale` gives the largest per-token coefficient.
FP16_GRAD_TARGET = 8.0


def held_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss form keeps a gradient in from its forward to its backward: the input's, except float32
    for fp16, so that the upstream gradient (e.g. a GradScaler's 2^16) is applied before the fp16 rounding: dW
    of a token mean over 10^4 tokens is ~1e-8 per entry, below fp16's smallest subnormal."""
    return torch.float32 if dtype == torch.float16 else dtype


def hand_over(grad: torch.Tensor | None, upstream: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A loss form's kept gradient times the upstream one (in place), in the input's `dtype`."""
    if grad is None:
        return None
    grad.mul_(upstream)
    return grad if grad.dtype == dtype else grad.to(dtype)


# The per-token coefficients of a loss form, from a group of tokens' logprobs and entropies:
# (group slice, logprobs (n,), entropy (n,)) -> (g_lp (n,), g_ent: 0-dim or (n,) or None), both d loss / d ·.
Coefficients = Callable[[slice, torch.Tensor, torch.Tensor], tuple]


def chunk_buffers(weight: torch.Tensor, plan: ChunkPlan, size_h: int, vocab: int, need_dh: bool, with_grad: bool,
                  device: torch.device):
    """A chunk loop's operands and buffers: (weight operand, hidden rows, float32 dhidden rows, float32 logits,
    dlogits). The dlogits overwrite the float32 logits in place unless the GEMMs take half operands."""
    h_buf = torch.empty(plan.chunk, size_h, dtype=plan.operand_dtype, device=device)
    dh_buf = torch.empty(plan.chunk, size_h, dtype=torch.float32, device=device) if need_dh else None
    logits = empty_output((plan.chunk, vocab), torch.float32, device)
    dlogits = logits if plan.operand_dtype == torch.float32 or not with_grad else empty_output(
        (plan.chunk, vocab), plan.operand_dtype, device)
    return weight_operand(weight, plan), h_buf, dh_buf, logits, dlogits


def fused_grad_forward(hidden2d, weight, index, labels, plan: ChunkPlan, backend: str, temperature: float,
                       vocab_size: int, groups: list[tuple[int, int]], coefficients: Coefficients, need_dh: bool,
                       need_dw: bool, grad_scale: torch.Tensor | None = None):
    """The loss forms' chunk loop: logprobs, entropies and (with need_dh / need_dw) the gradients of a loss
    Σ_t g_lp_t·logprob_t + g_ent_t·entropy_t, all in the forward.

    hidden2d (N, H); index (n,) int64: the rows of the n tokens (their labels (n,) int64 in [0, vocab_size)),
    or None: all N rows, those labelled −100 ignored (Triton backend only: its kernels skip them).
    groups: [a, b) token ranges in order covering [0, n); a group's coefficients are computed from all of
    its logprobs at once (`coefficients`), after which its logits become dlogits. A group
    of at most C tokens is one chunk (its logits computed once: 6·n·H·V FLOP); a longer one has its logits
    computed twice (statistics, then gradients). grad_scale: `fp16_grad_scale`, or None.
    Returns lp_ent (2, n) float32, dhidden (N, H) in `held_grad_dtype` (0 on rows not in index) or None, and the
    float32 dW (V, H) accumulator (unscaled) or None.
    """
    n_rows, size_h = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    n_tok = n_rows if index is None else index.numel()
    with_grad = need_dh or need_dw
    lp_ent = torch.zeros(2, n_tok, dtype=torch.float32, device=device)
    dhidden = None
    if need_dh:
        dhidden = (empty_output if index is None else torch.zeros)((n_rows, size_h),
                                                                   dtype=held_grad_dtype(hidden2d.dtype),
                                                                   device=device)
    dw_acc = torch.zeros(vocab, size_h, dtype=torch.float32, device=device) if need_dw else None
    if n_tok == 0:
        return lp_ent, dhidden, dw_acc
    w, h_buf, dh_buf, logits, dlogits = chunk_buffers(weight, plan, size_h, vocab, need_dh, with_grad, device)
    aux = torch.empty(2, n_tok, dtype=torch.float32, device=device)    # triton: lse; torch: s, t

    def logits_of(start, n):
        load_rows(h_buf, hidden2d, start, n, index)
        if index is None:                               # ignored rows (label −100): whatever they hold, NaN too
            h_buf[:n].masked_fill_((labels[start:start + n] < 0)[:, None], 0.0)
        chunk_logits(logits, h_buf, w, plan, backend, temperature)

    def stats_of(start, n):
        rows = slice(start, start + n)
        if backend == "triton":
            lp_ent[0, rows], lp_ent[1, rows], aux[0, rows] = logprob_rows_forward(logits[:n], labels[rows], temperature,
                                                                         -100, vocab_size)
        else:
            lp_ent[0, rows], lp_ent[1, rows], aux[0, rows], aux[1, rows] = torch_backend.linear_ppo_chunk_stats_(
                logits[:n], labels[rows], vocab_size)

    for a, b in groups:
        for start, n in chunk_ranges(b - a, plan.chunk):
            logits_of(a + start, n)
            stats_of(a + start, n)
        if not with_grad:
            continue
        group = slice(a, b)
        g_lp, g_ent = coefficients(group, lp_ent[0, group], lp_ent[1, group])
        if grad_scale is not None:
            g_lp = g_lp * grad_scale
            g_ent = None if g_ent is None else g_ent * grad_scale
        for start, n in chunk_ranges(b - a, plan.chunk):
            rows = slice(a + start, a + start + n)
            g_lp_rows = g_lp[start:start + n]
            g_ent_rows = None if g_ent is None else (g_ent[start:start + n] if g_ent.dim() else g_ent.expand(n))
            if b - a > plan.chunk:                                      # a group longer than a chunk
                logits_of(a + start, n)
                if backend != "triton":
                    torch_backend.linear_ppo_chunk_stats_(logits[:n], labels[rows], vocab_size)   # shifts them
            if backend == "triton":
                logprob_rows_backward(logits[:n], labels[rows], aux[0, rows], lp_ent[1, rows], g_lp_rows,
                            None if g_ent_rows is None else g_ent_rows.contiguous(), temperature, -100, vocab_size,
                            out=dlogits[:n])
            else:
                torch_backend.linear_ppo_chunk_grad_(
                    logits[:n], labels[rows], aux[0, rows], aux[1, rows], g_lp_rows,
                    torch.zeros((), device=device) if g_ent_rows is None else g_ent_rows, temperature, vocab_size,
                    g_ent_rows is not None)
                if dlogits is not logits:
                    dlogits[:n] = logits[:n]
            accumulate_grads(dlogits, n, h_buf, dh_buf, w, plan, dhidden, dw_acc, rows,
                             None if index is None else index[rows], grad_scale)
    if dw_acc is not None and grad_scale is not None:
        dw_acc.div_(grad_scale)
    return lp_ent, dhidden, dw_acc
