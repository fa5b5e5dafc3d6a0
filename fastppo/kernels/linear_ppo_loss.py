"""linear_ppo_loss: the PPO policy loss straight from hidden states, its gradients in the same pass.

The clipped surrogate's derivative with respect to a token's logprob depends
only on that token's ratio, advantage and clip decision, all known as soon as
the logprob is. So the loss can be differentiated chunk by chunk while the
chunk's logits are in memory, and the logits never need to be recomputed:

  composed  linear_token_logprobs + ppo_loss: forward GEMM (2·N·H·V), backward
            recompute GEMM + dhidden GEMM + dW GEMM (6·N·H·V): 8·N·H·V FLOP;
            each (C, V) chunk of logits is written twice (GEMM), read twice
            and overwritten once with dlogits
  fused     per chunk: logits GEMM, one per-row pass for log-sum-exp, entropy,
            logprob and the surrogate, one pass overwriting the logits with
            dlogits, then the dhidden and dW GEMMs: 6·N·H·V FLOP, the minimum
            for forward + backward; each chunk written once by the GEMM, read
            twice, overwritten once (CPU twin: no (C, V) temporary, see
            torch_backend.linear_ppo_chunk_).

The naive path (``F.linear`` → ``log_softmax(.float())`` → gather → PPO
formulas) keeps an (N, V) float32 log-softmax for backward and writes an
(N, V) gradient: 8·N·V bytes resident at the peak (N=8192, V=32000: 2 GB).

Measured with bench/linear_ppo_loss.py (N=8192, H=512, V=32000, float32,
forward + backward, torch backend, 2-core x86 VM): 3.3 s and 152 MB peak
extra memory, against 5.1 s and 214 MB for the composed ops and 7.5 s and
5.2 GB for the naive path. GPU: not measured yet.

Everything happens in forward: dhidden (N, H) in hidden's dtype and dW (V, H)
(accumulated in float32 over chunks, cast once) are kept on the autograd node
and the backward only scales them by the upstream gradient, in place. Peak
extra memory: one chunk's buffers (the budget of linear_token_logprobs, see
``chunk_rows``), the float32 dW accumulator and dhidden, whatever N is.

CISPO (policy_loss="cispo") is a switch of the same per-token math. GSPO's
sequence ratio (ratio_level="sequence") makes a token's gradient depend on its
whole sequence's logprobs: the chunks are then cut at sequence boundaries and
each chunk's logits are reduced, the sequence terms computed, and the logits
turned into dlogits while still in memory (`_forward_sequences`; a sequence
longer than a chunk has its logits computed twice).

On CPU only the valid tokens (mask nonzero) are computed: their rows are
gathered into the chunk buffer, so padding costs no GEMM work. On a GPU every
row is computed and invalid ones are masked: counting the valid tokens would
cost a host sync per call (see ``compacts_rows``). As in
linear_token_logprobs every GEMM of a call has the shape of one chunk (the
last is zero-padded), so a token's logprob, its statistics and its dhidden row
are bitwise the same whatever the other tokens are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._checks import (
    FLOAT_DTYPES, INT_DTYPES, as_rows, check_chunk_size, check_clip_range, check_dual_clip, check_labels_in_range,
    check_lm_head, check_non_negative, check_normalizer, check_policy_loss_kind, check_policy_weight,
    check_positive, check_same_device, check_shape, check_tensor,
)
from ._dispatch import empty_output, on_device_of, resolve_backend
from ._layout import MASK_DTYPES, loadable_mask, valid_of
from ._math import kl_estimate, lse_and_entropy, online_lse_step, policy_surrogate, softmax_grad
from . import torch_backend
from .kl_penalty import ESTIMATORS
from .linear_token_logprobs import chunk_plan
from .lm_head import (
    accumulate_grads, chunk_buffers, chunk_logits, chunk_ranges, fp16_grad_scale, fused_grad_forward, hand_over,
    held_grad_dtype,
)
from .token_logprobs import row_block_size


# ----------------------------------------------------------------------------
# 1. Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _linear_ppo_loss_fwd_kernel(
    logits_ptr, dlogits_ptr, labels_ptr, old_lp_ptr, adv_ptr, ref_lp_ptr, w_ptr, valid_ptr, norm_ptr, tok_ptr,
    n_cols, n_vocab, stride_lm, stride_dm, stride_tok,
    temperature, clip_eps, clip_eps_high, dual_clip, ent_coef, kl_coef,
    HAS_DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, ESTIMATOR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    CISPO: tl.constexpr, WITH_GRAD: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token (a row of the float32 chunk of logits, unit column stride).

    Only the first n_vocab of the n_cols columns are real (the rest: alignment
    padding, taken as −inf after a load masked on n_cols, for wide loads;
    gradient 0). With HAS_VALID, a token whose valid flag
    is 0 (its inputs zeroed by the launcher) gets zero statistics and gradient.

    Pass 1 (as token_logprobs' forward, _math.online_lse_step): lse, the
    label's logprob and the entropy H. Then the token's terms:
      ρ = exp(lp − old), pg and its slope dpg = d pg / d lp: _math.policy_surrogate (PPO's clipped
      surrogate, or CISPO's; weighted by w when HAS_WEIGHT),
      approx_kl = (ρ − 1) − log ρ,  kl = k(lp − ref) for the estimator k (_math.kl_estimate),
    written to the (7, tokens) statistics at tok_ptr (torch_backend.PPO_TOKEN_STATS order).
    Pass 2 (WITH_GRAD): with n the normalizer,
      g_lp = (dpg + kl_coef·k'(lp − ref)) / n,  g_ent = −ent_coef / n,
      dlogits_j = (g_lp·([j = label] − p_j) − g_ent·p_j·(log p_j + H)) / T,
    written in dlogits' dtype (it may alias the logits: each block is read before it is written).
    """
    row = tl.program_id(0).to(tl.int64)
    temp = tl.cast(temperature, tl.float32)
    label = tl.load(labels_ptr + row).to(tl.int64)             # in [0, n_vocab): checked before the launch
    row_ptr = logits_ptr + row * stride_lm
    keep = True
    if HAS_VALID:
        keep = tl.load(valid_ptr + row) != 0

    m = tl.cast(float("-inf"), tl.float32)
    s = tl.cast(0.0, tl.float32)
    t = tl.cast(0.0, tl.float32)
    for block in range(0, tl.cdiv(n_cols, BLOCK_V)):
        offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
        m, s, t = online_lse_step(m, s, t, tl.where(offs < n_vocab, x / temp, float("-inf")))

    label_ok = (label >= 0) & (label < n_vocab)
    x_label = tl.load(row_ptr + label, mask=label_ok, other=0.0).to(tl.float32) / temp
    lse, ent = lse_and_entropy(m, s, t)
    logp = x_label - lse

    log_ratio = logp - tl.load(old_lp_ptr + row).to(tl.float32)
    ratio = tl.exp(log_ratio)
    w = tl.load(w_ptr + row).to(tl.float32) if HAS_WEIGHT else 1.0
    pg, dpg, clipped = policy_surrogate(ratio, logp, tl.load(adv_ptr + row).to(tl.float32), w, clip_eps,
                                        clip_eps_high, dual_clip, HAS_DUAL_CLIP, HAS_WEIGHT, CISPO)
    kl = 0.0
    slope = 0.0
    if HAS_REF:
        kl, slope = kl_estimate(logp - tl.load(ref_lp_ptr + row).to(tl.float32), ESTIMATOR)
    tl.store(tok_ptr + row, tl.where(keep, logp, 0.0))
    tl.store(tok_ptr + stride_tok + row, tl.where(keep, ent, 0.0))
    tl.store(tok_ptr + 2 * stride_tok + row, tl.where(keep, pg, 0.0))
    tl.store(tok_ptr + 3 * stride_tok + row, tl.where(keep, clipped.to(tl.float32), 0.0))
    tl.store(tok_ptr + 4 * stride_tok + row, tl.where(keep, (ratio - 1.0) - log_ratio, 0.0))
    tl.store(tok_ptr + 5 * stride_tok + row, tl.where(keep, ratio, 0.0))
    tl.store(tok_ptr + 6 * stride_tok + row, tl.where(keep, kl, 0.0))

    if WITH_GRAD:
        n = tl.load(norm_ptr).to(tl.float32)
        g_lp = tl.where(keep, (dpg + tl.cast(kl_coef, tl.float32) * slope) / n, 0.0)
        g_ent = tl.where(keep, -tl.cast(ent_coef, tl.float32) / n, 0.0)
        for block in range(0, tl.cdiv(n_cols, BLOCK_V)):
            offs = block * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = offs < n_cols
            x = tl.load(row_ptr + offs, mask=col_mask, other=0.0).to(tl.float32)
            x = tl.where(offs < n_vocab, x / temp, float("-inf"))           # padding: p = 0, gradient 0
            grad = softmax_grad(offs == label, x - lse, ent, g_lp, g_ent, True, True)
            tl.store(dlogits_ptr + row * stride_dm + offs, (grad / temp).to(dlogits_ptr.dtype.element_ty),
                     mask=col_mask)


# ----------------------------------------------------------------------------
# 2. Launcher and the chunked forward (which is also the backward)
# ----------------------------------------------------------------------------

class LinearPPOParams(NamedTuple):
    """The scalar parameters of one `linear_ppo_loss` call, as the chunk functions of both backends read them."""

    clip_eps: float
    clip_eps_high: float
    dual_clip: float | None
    ent_coef: float
    kl_coef: float
    kl_estimator: str
    temperature: float
    cispo: bool = False


def _chunk_triton(logits, dlogits, labels, old_lp, adv, ref_lp, weight, valid, norm, tok, params: LinearPPOParams,
                  vocab_size, with_grad):
    """One chunk of n tokens: logits (n, V) float32, dlogits (n, V) or None, valid (n,) bool or None
    (None: all valid), weight (n,) float32 or None, tok (7, n) float32 out."""
    n_rows, n_cols = logits.shape
    p = params
    block_v = row_block_size(n_cols, 4096)
    out = dlogits if with_grad else logits
    with on_device_of(logits):
        _linear_ppo_loss_fwd_kernel[(n_rows,)](
            logits, out, labels, old_lp, adv, ref_lp if ref_lp is not None else old_lp,
            weight if weight is not None else old_lp, loadable_mask(valid) if valid is not None else labels, norm,
            tok, n_cols, vocab_size, logits.stride(0), out.stride(0), tok.stride(0),
            p.temperature, p.clip_eps, p.clip_eps_high, p.dual_clip if p.dual_clip is not None else 0.0,
            p.ent_coef, p.kl_coef,
            HAS_DUAL_CLIP=p.dual_clip is not None, HAS_REF=ref_lp is not None, ESTIMATOR=p.kl_estimator,
            HAS_WEIGHT=weight is not None, CISPO=p.cispo, WITH_GRAD=with_grad, HAS_VALID=valid is not None,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )


def compacts_rows(device: torch.device) -> bool:
    """Whether the valid tokens are gathered into the chunks (CPU) or every row is computed, masked (GPUs).

    Gathering saves the GEMM work of padding tokens but needs their number on
    the host (``nonzero``: a host sync); on CPU that sync is free and the GEMMs
    are the cost, on a GPU the sync stalls the launch queue twice per
    micro-batch, so there the shapes stay static and padding rows are masked.
    """
    return device.type == "cpu"


def _forward(hidden2d, weight, index, valid, labels, token_inputs, norm, params: LinearPPOParams, vocab_size, backend,
             plan, need_dh, need_dw, grad_scale):
    """Chunked loss, statistics and gradients.

    token_inputs: old_lp, adv, ref_lp, policy_weight (the last two may be None).
    Either index (n,) int64: the valid rows of hidden2d (N, H), with labels
    and token_inputs (n,) compacted and valid None; or index None: every row
    is computed, valid (N,) bool marks the tokens and the per-token inputs (N,)
    are zeroed off it (the hidden rows are zeroed as they are loaded). Returns
    tok (7, n) float32 (0 off the mask), dhidden (N, H) in hidden's dtype (zero
    on invalid rows) or None, and the float32 dW (V, H) accumulator or None.
    grad_scale: `lm_head.fp16_grad_scale` (the dlogits are computed at norm / grad_scale and the GEMM results
    unscaled), or None.
    """
    n_rows, size_h = hidden2d.shape
    vocab, device = weight.shape[0], hidden2d.device
    n_tok = index.numel() if index is not None else n_rows
    with_grad = need_dh or need_dw
    tok = empty_output((len(torch_backend.PPO_TOKEN_STATS), n_tok), torch.float32, device)
    dhidden = None
    if need_dh:                                                         # all rows written when index is None
        dhidden = (torch.zeros if index is not None else empty_output)(
            (n_rows, size_h), dtype=held_grad_dtype(hidden2d.dtype), device=device)
    dw_acc = torch.zeros(vocab, size_h, dtype=torch.float32, device=device) if need_dw else None
    if n_tok == 0:
        return tok, dhidden, dw_acc
    temperature = params.temperature
    grad_norm = norm if grad_scale is None else norm / grad_scale          # read by the gradients only
    w, h_buf, dh_buf, logits, dlogits = chunk_buffers(weight, plan, size_h, vocab, need_dh, with_grad, device)
    for start, n in chunk_ranges(n_tok, plan.chunk):
        rows = slice(start, start + n)
        valid_rows = None
        if index is None:
            valid_rows = valid[rows]
            h_buf[:n].copy_(hidden2d[rows])
            h_buf[:n].masked_fill_(~valid_rows[:, None], 0.0)           # whatever padding holds (NaN too)
        else:
            h_buf[:n].copy_(hidden2d.index_select(0, index[rows]))
        if n < plan.chunk:
            h_buf[n:].zero_()                                           # padded rows: zero logits, no gradient
        token_args = (labels[rows], *(None if x is None else x[rows] for x in token_inputs))
        chunk_logits(logits, h_buf, w, plan, backend, temperature)
        if backend == "triton":
            _chunk_triton(logits[:n], dlogits[:n], *token_args, valid_rows, grad_norm, tok[:, rows], params,
                          vocab_size, with_grad)
        else:
            tok[:, rows] = torch_backend.linear_ppo_chunk_(
                logits[:n], *token_args, grad_norm, params, with_grad, vocab_size, valid_rows)
            if with_grad and dlogits is not logits:
                dlogits[:n] = logits[:n]
        if with_grad:
            accumulate_grads(dlogits, n, h_buf, dh_buf, w, plan, dhidden, dw_acc, rows,
                             None if index is None else index[rows], grad_scale)
    if dw_acc is not None and grad_scale is not None:
        dw_acc.div_(grad_scale)
    return tok, dhidden, dw_acc


def sequence_groups(starts: list[int], n_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """[a, b) ranges of whole sequences, in order, each of at most `chunk` tokens, except a sequence longer than
    that, which is a range of its own. starts: the first token of each sequence (starts[0] = 0)."""
    groups, a = [], 0
    for seq_start, seq_end in zip(starts, starts[1:] + [n_tokens]):
        if seq_end - a > chunk and seq_start > a:
            groups.append((a, seq_start))
            a = seq_start
    if n_tokens > a:
        groups.append((a, n_tokens))
    return groups


def sequence_policy_terms(logprobs, entropy, old_logprobs, advantages, ref_logprobs, policy_weight, seg, n_seg,
                          norm, params: LinearPPOParams):
    """The per-token statistics (7, n) and d loss / d logprob (n,) of n valid tokens at GSPO's sequence ratio.

    seg (n,) int64: each token's sequence in [0, n_seg), every sequence with at least one token. With
    s = exp(mean of lp − old over the sequence) on each of its tokens, pg = `torch_backend.policy_surrogate`
    at ρ = s; PPO's gradient reaches every token of a sequence through the mean:
    d Σ pg / d lp_t = (Σ over t's sequence of d pg / d log s) / (its tokens); CISPO's is the token's own
    (its weight is a constant). Plus the KL term's kl_coef·k'(lp − ref); all divided by norm.
    """
    log_ratio = logprobs - old_logprobs
    counts = torch.zeros(n_seg, dtype=torch.float32, device=seg.device).index_add_(0, seg, torch.ones_like(log_ratio))
    seq_log_ratio = torch.zeros_like(counts).index_add_(0, seg, log_ratio) / counts
    ratio = torch.exp(seq_log_ratio)[seg]
    pg, clipped, dpg = torch_backend.policy_surrogate(ratio, logprobs, advantages, params.clip_eps,
                                                      params.clip_eps_high, params.dual_clip, params.cispo,
                                                      policy_weight)
    if not params.cispo:
        dpg = (torch.zeros_like(counts).index_add_(0, seg, dpg) / counts)[seg]
    approx_kl = (torch.exp(log_ratio) - 1.0) - log_ratio
    if ref_logprobs is not None:
        kl, slope = torch_backend.kl_penalty_forward(logprobs, ref_logprobs, params.kl_estimator, None,
                                                     with_slope=True)
        dpg = dpg + params.kl_coef * slope
    else:
        kl = torch.zeros_like(logprobs)
    return torch.stack([logprobs, entropy, pg, clipped, approx_kl, ratio, kl]), dpg / norm


def _forward_sequences(hidden2d, weight, index, starts, labels, token_inputs, norm, params: LinearPPOParams,
                       vocab_size, backend, plan, need_dh, need_dw, grad_scale):
    """ratio_level="sequence": as `_forward` on the gathered valid tokens (index (n,)), whose sequences begin at
    `starts` (host ints), in chunks cut at sequence boundaries (`sequence_groups`).

    A sequence's ratio needs all of its logprobs before any of its gradients: `lm_head.fused_grad_forward`
    reduces each chunk's logits to (logprob, entropy, log-sum-exp) in one row pass, `sequence_policy_terms`
    gives the group's statistics and d loss / d logprob on the (n,) vectors, and a second row pass turns the
    logits, still in memory, into dlogits (the token-level kernel also reads each row twice). A sequence
    longer than a chunk has its logits computed twice: 8·n·H·V FLOP for its tokens instead of 6.
    """
    n_tok = index.numel()
    tok = torch.zeros((len(torch_backend.PPO_TOKEN_STATS), n_tok), dtype=torch.float32, device=hidden2d.device)
    lengths = torch.tensor([b - a for a, b in zip(starts, starts[1:] + [n_tok])], dtype=torch.long)
    seg_all = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(hidden2d.device)
    old_lp, adv, ref_lp, pweight = token_inputs
    g_ent = torch.full((), -params.ent_coef, device=hidden2d.device) / norm if params.ent_coef else None
    with_grad = need_dh or need_dw

    def coefficients(group, logprobs, entropy):
        seg = seg_all[group] - seg_all[group.start]
        stats, g_lp = sequence_policy_terms(
            logprobs, entropy, old_lp[group], adv[group], None if ref_lp is None else ref_lp[group],
            None if pweight is None else pweight[group], seg, int(seg[-1]) + 1, norm, params)
        tok[:, group] = stats
        return g_lp, g_ent

    groups = sequence_groups(starts, n_tok, plan.chunk)
    lp_ent, dhidden, dw_acc = fused_grad_forward(hidden2d, weight, index, labels, plan, backend, params.temperature,
                                                 vocab_size, groups, coefficients, need_dh, need_dw, grad_scale)
    if not with_grad:                                   # the statistics alone: no coefficients were asked for
        for a, b in groups:
            coefficients(slice(a, b), lp_ent[0, a:b], lp_ent[1, a:b])
    return tok, dhidden, dw_acc


# ----------------------------------------------------------------------------
# 3. Autograd
# ----------------------------------------------------------------------------

def sequence_starts(seq_ids: torch.Tensor) -> list[int]:
    """The first position of each run of equal ids in seq_ids (n,) (read on the host); a ValueError when an id
    comes back after another (the tokens of a sequence must be contiguous)."""
    ids = seq_ids.cpu()
    if ids.numel() == 0:
        return [0]
    change = torch.ones(ids.numel(), dtype=torch.bool)
    change[1:] = ids[1:] != ids[:-1]
    starts = change.nonzero().squeeze(1)
    if ids[starts].unique().numel() != starts.numel():
        raise ValueError("sequence_ids: the valid tokens of each sequence must be contiguous (in row-major order); "
                         "an id appears in two separate runs")
    return starts.tolist()


class _LinearPPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels1d, old1d, adv1d, ref1d, pweight1d, valid1d, seq1d, norm, params,
                vocab_size, backend, chunk_size, need_dh, need_dw):
        size_h = hidden.shape[-1]
        hidden2d = as_rows(hidden, size_h)
        device = hidden.device
        # A ValueError on CPU; on a GPU a device-side assert (no host sync).
        check_labels_in_range(labels1d, vocab_size, where=valid1d)
        starts = None
        if seq1d is not None or compacts_rows(device):
            index = valid1d.nonzero().squeeze(1)                        # a host sync: free on CPU
            valid = None
            labels_t = labels1d.index_select(0, index).long()
            token_inputs = [x.index_select(0, index).float() if x is not None else None
                            for x in (old1d, adv1d, ref1d, pweight1d)]
            count = float(index.numel())
            if seq1d is not None:                                      # GSPO: sequence boundaries on the host
                starts = sequence_starts(seq1d.index_select(0, index))
        else:
            index, valid = None, valid1d.contiguous()
            labels_t = torch.where(valid, labels1d, 0).long()
            token_inputs = [torch.where(valid, x.float(), 0.0) if x is not None else None
                            for x in (old1d, adv1d, ref1d, pweight1d)]     # NaN off the mask is harmless
            count = valid.sum(dtype=torch.float32)                      # stays on the device
        if norm is None:
            norm = torch.full((), count, device=device) if index is not None else count
        norm = torch.where(norm > 0, norm, 1.0)                         # 0 (nothing valid) counts as 1
        plan = chunk_plan(hidden2d, weight, backend, chunk_size)
        # fp16 dlogits: coefficients of a token mean are ~1/norm; scaled to ~1 before the half cast.
        scale = fp16_grad_scale(plan, hidden.dtype, 1.0 / torch.as_tensor(norm, device=device))
        if starts is not None:
            tok, dhidden, dw_acc = _forward_sequences(hidden2d, weight, index, starts, labels_t, token_inputs, norm,
                                                      params, vocab_size, backend, plan, need_dh, need_dw, scale)
        else:
            tok, dhidden, dw_acc = _forward(hidden2d, weight, index, valid, labels_t, token_inputs, norm, params,
                                            vocab_size, backend, plan, need_dh, need_dw, scale)

        sums = tok[1:].sum(dim=1)                                       # entropy, pg, clipped, approx_kl, ratio, kl
        means = sums / norm
        entropy, pg, clipfrac, approx_kl, ratio_mean, kl = means.unbind()
        loss = pg - params.ent_coef * entropy + params.kl_coef * kl
        out = torch.stack([loss, pg, entropy, kl, clipfrac, approx_kl, ratio_mean, norm])   # one buffer, 8 floats
        if index is None:
            logprobs = tok[0].clone()                                   # 0 off the mask
        else:
            logprobs = torch.zeros(hidden2d.shape[0], dtype=torch.float32, device=device)
            logprobs.index_copy_(0, index, tok[0])

        # The gradients are final up to the upstream scalar: kept on the node, no inputs saved.
        dweight = None
        if need_dw:
            dweight = dw_acc if held_grad_dtype(weight.dtype) == torch.float32 else dw_acc.to(weight.dtype)
        ctx.grads = (dhidden.view(hidden.shape) if need_dh else None, dweight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        results = tuple(out[i] for i in range(7))
        ctx.mark_non_differentiable(*results[1:], logprobs)
        ctx.set_materialize_grads(False)
        return (*results, logprobs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_non_differentiable):
        nothing = (None,) * 14
        if grad_loss is None:
            return (None, None) + nothing
        if ctx.grads is None:
            raise RuntimeError(
                "linear_ppo_loss: backward through the same result twice; its gradients are computed in "
                "forward and handed over (scaled in place) by the first backward. Call linear_ppo_loss again.")
        dhidden, dweight = ctx.grads
        ctx.grads = None                                                # the memory goes with the .grad
        g = grad_loss.float()
        return (hand_over(dhidden, g, ctx.dtypes[0]), hand_over(dweight, g, ctx.dtypes[1])) + nothing


# ----------------------------------------------------------------------------
# 4. Public function
# ----------------------------------------------------------------------------

class LinearPPOLossOutput(NamedTuple):
    """Results of `linear_ppo_loss`: 0-dim float32 tensors, then the per-token logprobs.

    Only ``loss`` is differentiable (in hidden and weight); the others are
    statistics. The scalars are views of one buffer: use them out of place.
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    logprobs: torch.Tensor


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    ent_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    normalizer: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
    clip_eps_high: float | None = None,
    policy_weight: torch.Tensor | None = None,
    ratio_level: str = "token",
    policy_loss: str = "ppo",
    sequence_ids: torch.Tensor | None = None,
) -> LinearPPOLossOutput:
    """PPO's clipped policy loss (+ entropy bonus, + KL to a reference) from the lm_head's input, in one pass.

    The same numbers as ``linear_token_logprobs(hidden, weight, labels,
    temperature=T, return_entropy=True)`` followed by the policy part of
    ``ppo_loss`` and the two extra terms, with every gradient computed during
    the forward (no logits are ever stored or recomputed). With lp the
    logprobs of the labels under softmax(hidden @ weightᵀ / T), ρ = exp(lp −
    old_logprobs), A the advantages, H the entropy of the softmax and token
    means Σ_valid(·) / normalizer:

        policy_loss = mean w·max(−A·ρ, −A·clip(ρ, 1 − clip_eps, 1 + clip_eps_high)),
            and with dual_clip c, for A < 0: mean w·min(that, −c·A);
            w = policy_weight (1 when None); or CISPO's mean −w·sg(min(ρ, 1 + clip_eps_high))·A·lp
            (policy_loss="cispo"); ρ the token's ratio, or GSPO's sequence ratio
            (ratio_level="sequence"), as in ``ppo_loss``
        entropy     = mean H
        kl          = mean k(lp − ref_logprobs), k the ``kl_estimator`` (as
            ``kl_penalty``: k1 = d, k2 = ½d², k3 = e^(−d) + d − 1, abs = |d|);
            0 when ref_logprobs is None
        loss        = policy_loss − ent_coef·entropy + kl_coef·kl
        clipfrac    = mean [a clipped branch (ε or dual) was taken; cispo: ρ > 1 + clip_eps_high]
        approx_kl   = mean (r − 1) − log r of the token ratio r,  ratio_mean = mean ρ

    The KL term is the per-token estimate on the sampled tokens, differentiated
    through lp (the KL-in-the-loss of GRPO-style trainers; k3's gradient
    1 − e^(−d) vanishes at lp = ref and pulls lp toward ref on both sides). It
    is an alternative to PPO-max's KL penalty in the reward (Zheng et al. 2023), not
    an addition the trainer makes.

    Args:
        hidden: (..., H) float32, bfloat16 or float16; any strides.
        weight: (V, H), same dtype and device (the lm_head; may be tied to the embedding).
        labels: (...) integer: the sampled tokens. Read only where ``mask`` is
            set, where they must lie in [0, vocab_size) (checked: on CPU a
            ValueError, on a GPU a device-side assert, with no host sync).
        old_logprobs, advantages: (...) float32, bfloat16 or float16.
        mask: (...) bool or any integer / floating dtype; nonzero = a valid
            token. Invalid tokens get logprob 0 and no gradient, and their
            inputs are never used (NaN there is harmless). On CPU they are not
            computed at all (no GEMM rows); on a GPU every row is computed and
            the invalid ones masked, which keeps the shapes static (no host
            sync to count the valid tokens).
        temperature: > 0; logits are divided by it (use the sampling temperature).
        clip_eps: ε ≥ 0.  dual_clip: None or c > 1.
        ent_coef: ≥ 0, weight of the entropy bonus.
        ref_logprobs: (...) float, the reference model's logprobs; needed when kl_coef > 0.
        kl_coef: ≥ 0.  kl_estimator: "k1", "k2", "k3" or "abs".
        normalizer: denominator of every token mean: None (the number of valid
            tokens here), a number ≥ 0 or a 1-element tensor (e.g. the
            minibatch's token count, so that micro-batch losses add up to the
            minibatch's). 0 counts as 1.
        vocab_size: weight rows ≥ vocab_size are alignment padding (an
            embedding resized to a multiple of 64), excluded from the softmax:
            probability 0, zero gradient (their dW rows are 0). ``None`` = all rows.
        backend: ``None`` (triton on CUDA, torch elsewhere; ``FASTPPO_BACKEND``
            overrides), ``"triton"`` or ``"torch"``: the per-row kernel; the
            matmuls are torch.mm either way.
        chunk_size: rows (valid tokens) per chunk; ``None`` takes the memory
            budget of ``linear_token_logprobs`` (``FASTPPO_LINEAR_CHUNK_MB``).
        clip_eps_high, policy_weight: as in ``ppo_loss``: the upper clip
            1 + clip_eps_high of the ratio (None = clip_eps), and a per-token
            weight w ≥ 0 of the policy term only (shape of labels, any float
            dtype, never differentiated; the normalizer, entropy, kl and the
            statistics are not weighted; checked finite and ≥ 0 on CPU only).
        ratio_level, policy_loss: as in ``ppo_loss``: "token" or "sequence"
            (GSPO), "ppo" or "cispo" (no dual_clip with cispo).
        sequence_ids: with ratio_level="sequence", (...) integer of the
            shape of labels: the sequence of each token, read where mask is
            set, each sequence's valid tokens contiguous in row-major order
            (a packed layout: e.g. the padded row of each token). None: each
            row of the last leading dimension is one sequence (all tokens
            for 1-D labels). The sequence path reads the boundaries on the
            host (a host sync per call on a GPU, and the valid tokens are
            gathered as on CPU), cuts the chunks at sequence boundaries and
            keeps the one-pass gradients; a sequence longer than a chunk
            has its logits computed twice (8·n·H·V FLOP for its tokens).

    Returns:
        A `LinearPPOLossOutput`: ``loss, policy_loss, entropy, kl, clipfrac,
        approx_kl, ratio_mean`` as 0-dim float32 tensors (no host sync) and
        ``logprobs`` (...) float32, detached, 0 off the mask. Only ``loss`` is
        differentiable, in ``hidden`` and ``weight`` (old_logprobs,
        advantages, ref_logprobs and policy_weight are constants). Gradients come back in
        the inputs' dtypes, dW summed over chunks in float32 and cast once.

    The gradients are computed in forward whenever hidden or weight requires
    grad (with grad mode on), and kept until the backward, which scales them by
    the upstream gradient in place and hands them over: one backward per call
    (a second one raises). Extra memory from forward to backward: dhidden
    (N, H) and dW (V, H) in the inputs' dtypes (float32 for fp16 inputs, so
    that the upstream gradient, e.g. a loss scale, is applied before the fp16
    rounding: `lm_head.held_grad_dtype`). Under ``torch.no_grad()`` only
    the loss and statistics are computed.
    """
    vocab = check_lm_head(hidden, weight, vocab_size)
    check_tensor("labels", labels, dtypes=INT_DTYPES)
    lead = hidden.shape[:-1]
    sequence, cispo = check_policy_loss_kind(ratio_level, policy_loss, dual_clip)
    if sequence_ids is not None:
        if not sequence:
            raise ValueError("sequence_ids is read only with ratio_level='sequence'")
        check_tensor("sequence_ids", sequence_ids, dtypes=INT_DTYPES)
        check_same_device("sequence_ids", sequence_ids, "hidden", hidden)
        check_shape("sequence_ids", sequence_ids, lead, "the leading dimensions of hidden")
    elif sequence:
        rows = torch.arange(lead[:-1].numel() if len(lead) > 1 else 1, device=hidden.device)
        sequence_ids = rows[:, None].expand(-1, lead[-1] if len(lead) else 1).reshape(lead)
    named = [("labels", labels), ("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)]
    if ref_logprobs is not None:
        named.append(("ref_logprobs", ref_logprobs))
    for name, x in named[1:]:
        check_tensor(name, x, dtypes=MASK_DTYPES if name == "mask" else FLOAT_DTYPES)
    for name, x in named:
        check_same_device(name, x, "hidden", hidden)
        check_shape(name, x, lead, "the leading dimensions of hidden")
    check_policy_weight(policy_weight, mask, "hidden", hidden, "the leading dimensions of hidden")
    temperature = check_positive("temperature", temperature)
    clip_eps, clip_eps_high = check_clip_range(clip_eps, clip_eps_high)
    dual_clip = check_dual_clip(dual_clip)
    check_non_negative("ent_coef", ent_coef)
    check_non_negative("kl_coef", kl_coef)
    if kl_estimator not in ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef > 0")
    norm = check_normalizer(normalizer, "hidden", hidden)
    if norm is not None and not isinstance(norm, torch.Tensor):
        norm = torch.full((), norm, device=hidden.device)
    check_chunk_size(chunk_size)
    backend = resolve_backend(backend, hidden, "hidden")

    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    params = LinearPPOParams(clip_eps, clip_eps_high, dual_clip, float(ent_coef), float(kl_coef), kl_estimator,
                             float(temperature), cispo)
    flat = [x.reshape(-1) if x is not None else None
            for x in (labels, old_logprobs, advantages, ref_logprobs, policy_weight)]
    if policy_weight is not None:
        flat[-1] = flat[-1].detach()
    *results, logprobs = _LinearPPOLoss.apply(
        hidden, weight, *flat, valid_of(mask).reshape(-1), None if sequence_ids is None else sequence_ids.reshape(-1),
        norm, params, vocab, backend, chunk_size, need_dh, need_dw)
    return LinearPPOLossOutput(*results, logprobs.view(lead))
