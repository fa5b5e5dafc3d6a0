"""The fast PyTorch backend of the fused ops (``backend="torch"``, the default off CUDA).

The same results as the Triton kernels, tuned for CPU: chunked over rows so
that the extra memory stays bounded whatever the number of rows, in place
where it saves temporaries. It is not the readable statement of the math: the
float64 oracles the tests compare both backends against are.
"""

from __future__ import annotations

import math

import torch

# Extra memory the chunked CPU paths may use for float32 temporaries.
TORCH_CHUNK_BYTES = 64 << 20


def rows_per_chunk(width: int, temporaries: int, budget_bytes: int = TORCH_CHUNK_BYTES) -> int:
    """Rows of a (rows, width) float32 chunk such that `temporaries` copies fit the budget."""
    return max(1, budget_bytes // max(1, width * 4 * temporaries))


# ----------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------

def token_logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) any float dtype, labels (N,) int -> logprobs, entropy, lse, each (N,) float32.

    Only the first vocab_size columns enter the softmax (the rest is alignment
    padding). Ignored rows give 0 for all three. Extra memory: about three
    (chunk, vocab_size) float32 temporaries, never a full (N, V) copy.
    """
    n_rows, vocab = logits.shape[0], vocab_size
    out = torch.zeros(3, n_rows, dtype=torch.float32, device=logits.device)
    logprobs, entropy, lse = out[0], out[1], out[2]
    step = rows_per_chunk(vocab, temporaries=3)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        valid = labels[rows] != ignore_index
        x = logits[rows, :vocab].float() / temperature              # (C, V) float32
        chunk_lse = torch.logsumexp(x, dim=-1)                      # (C,)
        label_logit = x.gather(-1, torch.where(valid, labels[rows], 0).long()[:, None]).squeeze(-1)
        x.sub_(chunk_lse[:, None])                                  # x is now log p
        p = x.exp()
        # p·log p is 0 where p is 0 (including logits of -inf).
        chunk_entropy = -(p * x.masked_fill_(p == 0, 0.0)).sum(-1)
        logprobs[rows] = torch.where(valid, label_logit - chunk_lse, 0.0)
        entropy[rows] = torch.where(valid, chunk_entropy, 0.0)
        lse[rows] = torch.where(valid, chunk_lse, 0.0)
    return logprobs, entropy, lse


def token_logprobs_backward(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, temperature: float, ignore_index: int,
    vocab_size: int,
) -> torch.Tensor:
    """Gradient of sum(grad_logprobs·logprobs + grad_entropy·entropy) w.r.t. logits (N, V).

    With x = logits / T and p = softmax(x):
      d logprob / d x_j = [j = label] − p_j
      d entropy / d x_j = −p_j (log p_j + H)
    and the chain rule through the temperature divides by T. Returned in the
    dtype of logits; ignored rows and the padding columns (from vocab_size on) get 0.
    """
    n_rows, vocab = logits.shape[0], vocab_size
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    grad[:, vocab:] = 0
    step = rows_per_chunk(vocab, temporaries=3)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        valid = labels[rows] != ignore_index
        logp = logits[rows, :vocab].float() / temperature
        logp.sub_(lse[rows, None])                                  # (C, V) log p
        p = logp.exp()
        g = torch.zeros_like(p)
        if grad_entropy is not None:
            g.addcmul_(p, logp.masked_fill_(p == 0, 0.0).add_(entropy[rows, None]), value=-1.0)
            g.mul_(grad_entropy[rows, None])
        if grad_logprobs is not None:
            g.addcmul_(p, grad_logprobs[rows, None], value=-1.0)
            safe = torch.where(valid, labels[rows], 0).long()[:, None]
            g.scatter_add_(-1, safe, grad_logprobs[rows, None].float())
        g.div_(temperature)
        g.masked_fill_(~valid[:, None], 0.0)
        grad[rows, :vocab] = g
    return grad


# ----------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------

def kl_penalty_forward(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: float | None,
                       with_slope: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Elementwise KL estimate in float32 from d = logprobs − ref_logprobs (any matching shapes).

    With ``with_slope`` also returns dk/dd (= dk/d logprobs = −dk/d ref_logprobs),
    0 where the clamp is active, for the backward to save: on CPU that is
    cheaper than recomputing the estimate (the Triton backward recomputes).
    """
    d = logprobs.float() - ref_logprobs.float()
    slope = None
    if estimator == "k1":
        kl = d
        slope = torch.ones_like(d) if with_slope else None
    elif estimator == "k2":
        kl = 0.5 * d.square()
        slope = d if with_slope else None
    elif estimator == "k3":
        # As the kernel: exp, not expm1 (4x slower on CPU); absolute error ~1e-7 near d = 0,
        # and rounding must not make it negative.
        e = torch.exp(-d)                                           # exp(ref − lp)
        kl = (e + d).sub_(1.0).clamp_(min=0.0)
        slope = e.neg_().add_(1.0) if with_slope else None          # 1 − exp(−d)
    else:
        kl = d.abs()
        slope = d.sign() if with_slope else None
    if clamp is not None:
        if with_slope:                                              # torch.clamp passes the gradient at the bounds
            slope = torch.where((kl.abs() if estimator == "k1" else kl) <= clamp, slope, 0.0)   # (slope may be inf)
        kl = kl.clamp_(-clamp, clamp)
    return kl, slope


# ----------------------------------------------------------------------------
# gae
# ----------------------------------------------------------------------------

# The chunked discounted sum below scales by (γλ)^−k; chunks are cut so that
# (γλ)^−k ≤ e^30 (about 1e13), far from float32 overflow for any sane reward.
GAE_EXP_RANGE = 30.0
# Rows per chunk such that the ~8 float32 (rows, T) temporaries stay near 4 MB
# (cache-sized): at B=512, T=2048 on one CPU thread 8.3 ms against 23 ms for
# whole-batch temporaries (15 against 43 ms with holes in the mask).
GAE_CHUNK_BYTES = 4 << 20


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE per row over its valid tokens: (N, T) inputs -> (advantages, returns), (N, T) float32, 0 off the mask.

    Each row's valid tokens, in order, are one episode; the value after its
    last token is 0. Vectorised over rows and over T (no Python loop over
    either, except over row chunks and long-T chunks); see `_gae_rows`.
    """
    n_rows, n_cols = rewards.shape
    step = rows_per_chunk(n_cols, temporaries=8, budget_bytes=GAE_CHUNK_BYTES)
    if step >= n_rows:
        return _gae_rows(rewards, values, mask, gamma, lam)
    out = torch.empty((2, n_rows, n_cols), dtype=torch.float32, device=rewards.device)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        out[0, rows], out[1, rows] = _gae_rows(rewards[rows], values[rows], mask[rows], gamma, lam)
    return out[0], out[1]


def mask_as_float(mask: torch.Tensor) -> torch.Tensor:
    """float32 0/1 of "mask is nonzero".

    The CPU paths below compute with this instead of a bool tensor: in this
    torch build, ops reading bool tensors (where, masked_fill, comparisons)
    run ~30x slower than float arithmetic (torch.where 410 µs against 12 µs for
    a multiply at 64 x 2048), while a uint8 view converts in 20 µs.
    """
    valid = mask if mask.dtype == torch.bool else mask != 0
    return valid.view(torch.uint8).float()


def zero_off_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where keep (float 0/1) is 1, else 0, whatever x holds off the mask (NaN, inf included).

    On CPU a multiply when x is all finite (checked through its sum: one host
    sync), torch.where otherwise; elsewhere always torch.where (no sync).
    """
    if x.device.type == "cpu" and bool(torch.isfinite(x.sum())):
        return x * keep
    return torch.where(keep > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _gae_rows(rewards, values, mask, gamma, lam):
    """GAE without the loop over T.

    In reversed time (column j = T − 1 − t) the backward recursion
    A_t = δ_t + γλ·A_(next valid) becomes a forward one whose solution is
        A'_j = Σ_{i ≤ j} (γλ)^{n(i, j)} δ'_i,   n(i, j) = valid tokens in (i, j],
    that is a cumulative sum of δ'_i·(γλ)^{−k_i} rescaled by (γλ)^{k_j}, with
    k a running count of valid tokens. Chunks along T keep (γλ)^{−k} ≤ e^30;
    each chunk starts from the last sum of the previous one. The cumulative
    sum's rounding error is that of the Python loop (≈ eps / (1 − γλ)
    relative), because the weights are exact to one rounding: float64 powers
    rounded once to float32.
    """
    n_rows, n_cols = rewards.shape
    device = rewards.device
    keep = mask_as_float(mask).flip(1)                                                # reversed time from here on
    values_r = zero_off_mask(values.flip(1).float(), keep)                             # V', 0 off the mask
    rewards_r = zero_off_mask(rewards.flip(1).float(), keep)
    # Without holes (every row's valid tokens adjacent: left or right padding) the
    # next valid token is the neighbour and n(i, j) = j − i; with holes, both come
    # from the valid-token counts. The check costs a host sync, so only on CPU.
    contiguous = False
    if device.type == "cpu":
        starts = (keep[:, 1:] - keep[:, :-1]).clamp_(min=0).sum(1) + keep[:, 0]    # runs of valid tokens per row
        contiguous = bool(starts.max() <= 1) if n_rows else True
    # V of the next valid token in time = of the previous valid column in reversed time.
    if contiguous:
        next_values = torch.nn.functional.pad(values_r[:, :-1], (1, 0))
    else:
        col = torch.arange(1, n_cols + 1, dtype=torch.float32, device=device)
        last = (keep * col).int().cummax(1).values                      # 1 + last valid column <= j (0: none)
        prev = torch.nn.functional.pad(last[:, :-1], (1, 0))                          # 1 + last valid column < j
        next_values = torch.nn.functional.pad(values_r, (1, 0)).gather(1, prev.long())   # column 0 holds the 0
    delta = (rewards_r - values_r).add_(next_values, alpha=gamma).mul_(keep)          # δ' (N, T), 0 off the mask

    gl = gamma * lam
    if gl == 0:
        adv = delta
    else:
        adv = torch.empty_like(delta)
        log_gl = math.log(gl)
        step = n_cols if gl >= 1 else max(1, min(n_cols, int(GAE_EXP_RANGE / -log_gl)))
        if contiguous:                      # one decay vector for all rows: (γλ)^k, k = 1..step
            down64 = torch.exp(torch.arange(1, step + 1, dtype=torch.float64, device=device) * log_gl)
            up_all, down_all = down64.reciprocal().float(), down64.float()
        else:
            count = keep.cumsum(1)                                                     # exact below 2^24
        carry = None
        for j0 in range(0, n_cols, step):
            j1 = min(n_cols, j0 + step)
            if contiguous:
                up, down = up_all[:j1 - j0], down_all[:j1 - j0]
            else:
                k = count[:, j0:j1] - count[:, j0 - 1:j0] if j0 else count[:, :j1]     # valid tokens in [j0, j]
                down64 = torch.exp(k.double() * log_gl)
                up, down = down64.reciprocal().float(), down64.float()
            s = torch.cumsum(delta[:, j0:j1] * up, dim=1)
            if carry is not None:
                s += carry
            s *= down
            adv[:, j0:j1] = s
            carry = s[:, -1:]
    adv = adv * keep
    return adv.flip(1), (adv + values_r).flip(1)


# ----------------------------------------------------------------------------
# ppo_loss
# ----------------------------------------------------------------------------

# Rows per chunk: the ~12 float32 (rows, T) temporaries stay near 8 MB (forward at
# B=512, T=2048 on one CPU thread: 18.5 ms against 32 ms for whole-batch temporaries).
PPO_CHUNK_BYTES = 8 << 20


def clipped_surrogate(ratio, advantages, clip_eps: float, clip_eps_high: float, dual_clip: float | None,
                      weight=None):
    """The clipped policy surrogate per token, float32 tensors of one shape -> pg, clipped, dpg.

      pg  = w·max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high)), for A < 0 also min(·, −c·A) (dual clip)
      clipped = 1.0 where a clipped branch is strictly the larger (its gradient is 0), else 0.0
      dpg = d pg / d log ρ = −A·ρ·w unless clipped, else 0
    w is `weight` (None: 1). Float 0/1 rather than bool: see `mask_as_float`.
    """
    pg1 = torch.mul(advantages, ratio).neg_()
    pg = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high).mul_(advantages).neg_()        # pg2 for now
    pg = torch.maximum(pg1, pg, out=pg)
    clipped = torch.sign(pg - pg1)                                                     # pg2 > pg1 (pg ≥ pg1)
    if dual_clip is not None:
        bound = advantages * -dual_clip
        dual = (advantages < 0) & (bound < pg)
        pg = torch.where(dual, bound, pg)
        clipped = torch.maximum(clipped, mask_as_float(dual))
    dpg = pg1.masked_fill_(clipped > 0, 0.0)                # (not a product: pg1 is ±inf where the ratio is)
    if weight is not None:
        pg, dpg = pg.mul_(weight), dpg.mul_(weight)
    return pg, clipped, dpg


def policy_surrogate(ratio, logprobs, advantages, clip_eps: float, clip_eps_high: float, dual_clip: float | None,
                     cispo: bool, weight=None):
    """The policy loss per token -> pg, clipped, dpg: PPO's `clipped_surrogate` at the ratio ρ (a token's or its
    sequence's), or CISPO's (MiniMax-M1, 2025) pg = −w·min(ρ, 1 + ε_high)·A·logprobs, its weight detached:
    dpg = −w·min(ρ, 1 + ε_high)·A = d pg / d logprobs, clipped = 1.0 where ρ > 1 + ε_high (as
    _math.policy_surrogate). PPO's dpg is d pg / d log ρ."""
    if not cispo:
        return clipped_surrogate(ratio, advantages, clip_eps, clip_eps_high, dual_clip, weight)
    dpg = ratio.clamp(max=1.0 + clip_eps_high).mul_(advantages).neg_()
    if weight is not None:
        dpg = dpg.mul_(weight)
    return dpg * logprobs, mask_as_float(ratio > 1.0 + clip_eps_high), dpg


def ppo_loss_terms(logprobs, old_logprobs, advantages, values, old_values, returns, keep,
                   clip_eps: float, value_clip: float | None, dual_clip: float | None, *,
                   clip_eps_high: float | None = None, weight=None, seq_log_ratio=None, cispo: bool = False):
    """Per-token PPO terms in float32; the inputs are read as 0 where keep (float 0/1) is 0.

    Returns (pg, vf2, pg_clipped, vf_clipped, kl, ratio, dpg, derr), all 0 off the mask:
      pg, pg_clipped, dpg: `policy_surrogate` (ε_high = clip_eps_high, or clip_eps when None;
          weighted by `weight` when given) at the token's ratio, or with seq_log_ratio (rows,) at
          exp(seq_log_ratio) of its row (GSPO: dpg is then d pg / d seq_log_ratio)
      vf2 = max((V − R)², (clip(V, V_old ± ε_v) − R)²)   (twice the value loss term)
      vf_clipped: 1.0 where the clipped branch is strictly the larger (zero gradient)
      kl  = (ρ − 1) − log ρ;  ratio = ρ on the mask
      derr = d(vf2 / 2) / d values = V − R unless clipped
    """
    log_ratio = zero_off_mask(logprobs.float() - old_logprobs.float(), keep)           # 0, so ρ = 1, off the mask
    adv = zero_off_mask(advantages.float(), keep)
    ratio = torch.exp(log_ratio)
    w = None if weight is None else zero_off_mask(weight.float(), keep)
    surrogate_ratio = ratio if seq_log_ratio is None else torch.exp(seq_log_ratio.float())[:, None].expand_as(ratio)
    pg, pg_clipped, dpg = policy_surrogate(
        surrogate_ratio, zero_off_mask(logprobs.float(), keep) if cispo else None, adv, clip_eps,
        clip_eps if clip_eps_high is None else clip_eps_high, dual_clip, cispo, w)
    kl = (ratio - 1.0).sub_(log_ratio)                                                 # of the token's ratio
    if seq_log_ratio is not None:
        pg_clipped = pg_clipped * keep
        ratio = surrogate_ratio.contiguous()
    err = zero_off_mask(values.float() - returns.float(), keep)
    vf = err.square()
    vf_clipped = None
    if value_clip is not None:
        dv = zero_off_mask(values.float() - old_values.float(), keep)
        vf_c = dv.clamp(-value_clip, value_clip).sub_(dv).add_(err).square_()   # (clip(V, V_old ± ε_v) − R)²
        vf_c = torch.maximum(vf, vf_c, out=vf_c)
        vf_clipped = torch.sign(vf_c - vf)
        vf = vf_c
        err = err.mul_(1.0 - vf_clipped)
    return pg, vf, pg_clipped, vf_clipped, kl, ratio.mul_(keep), dpg, err


def ppo_loss_forward(logprobs, old_logprobs, advantages, values, old_values, returns, mask,
                     clip_eps: float, value_clip: float | None, vf_coef: float, dual_clip: float | None,
                     normalizer, *, with_grads: bool = False, clip_eps_high: float | None = None, weight=None,
                     seq_log_ratio=None, cispo: bool = False):
    """(N, T) inputs -> (8,) float32: loss, policy_loss, value_loss, clipfrac, value_clipfrac, approx_kl,
    ratio_mean, and the normalizer used [, then the (N, T) per-token derivatives of n·policy_loss
    w.r.t. logprobs and of n·value_loss w.r.t. values, when ``with_grads``].
    ``weight`` (N, T) any float dtype, or None: the per-token weight of the
    policy term (clip_eps_high, weight, seq_log_ratio and cispo: see `ppo_loss_terms`).

    Token means divide by `normalizer` (None: the number of valid tokens; a
    number or a 1-element tensor otherwise); a normalizer ≤ 0 is replaced by 1
    so that a fully masked micro-batch gives 0, not NaN.
    approx_kl is the token mean of (ρ − 1) − log ρ (the "k3" estimator of
    KL(old ‖ new), ≥ 0), as in CleanRL's PPO.
    The CPU backward saves the two derivatives instead of recomputing the
    terms (8 bytes per token, against ~8 tensors kept by autograd for the
    composite); the Triton backward recomputes them.
    """
    n_rows, n_cols = logprobs.shape
    device = logprobs.device
    sums = torch.zeros(7, dtype=torch.float64, device=device)   # pg, vf2, clipped, vclipped, kl, ratio, count
    dpg_all = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device) if with_grads else None
    derr_all = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device) if with_grads else None
    step = rows_per_chunk(n_cols, temporaries=12, budget_bytes=PPO_CHUNK_BYTES)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        keep = mask_as_float(mask[rows])
        pg, vf, pg_clipped, vf_clipped, kl, ratio, dpg, derr = ppo_loss_terms(
            logprobs[rows], old_logprobs[rows], advantages[rows], values[rows], old_values[rows], returns[rows],
            keep, clip_eps, value_clip, dual_clip, clip_eps_high=clip_eps_high,
            weight=None if weight is None else weight[rows],
            seq_log_ratio=None if seq_log_ratio is None else seq_log_ratio[rows], cispo=cispo)
        zero = torch.zeros((), device=device)
        sums += torch.stack([pg.sum(), vf.sum(), pg_clipped.sum(), vf_clipped.sum() if vf_clipped is not None else zero,
                             kl.sum(), ratio.sum(), keep.sum()]).double()
        if with_grads:
            dpg_all[rows], derr_all[rows] = dpg, derr
    if normalizer is None:
        norm = sums[6].float()
    elif isinstance(normalizer, torch.Tensor):
        norm = normalizer.reshape(()).to(device=device, dtype=torch.float32)
    else:
        norm = torch.tensor(float(normalizer), dtype=torch.float32, device=device)
    norm = torch.where(norm > 0, norm, torch.ones((), device=device))
    means = sums[:6].float() / norm
    means[1] *= 0.5                                                                      # value loss is ½·vf2
    out = torch.cat([(means[0] + vf_coef * means[1]).reshape(1), means, norm.reshape(1)])
    return (out, dpg_all, derr_all) if with_grads else out


# ----------------------------------------------------------------------------
# linear_token_logprobs (one chunk of logits at a time; the chunk loop and the
# matmuls are in linear_token_logprobs.py). Both functions work in place on a
# (C, V) float32 chunk of logits that the caller recomputes for every chunk, so
# the CPU path holds one extra (C, V) temporary: 8 bytes per logit in all.
# ----------------------------------------------------------------------------

def linear_logits_chunk_forward_(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (C, V) float32, overwritten -> logprobs, entropy, lse, each (C,) float32.

    Only the first vocab_size columns are real (the rest, alignment padding, is
    neither read nor written).

    With x = logits / T shifted by its row max m, s = Σ exp(x), t = Σ exp(x)·x:
    lse = m + log s, entropy = log s − t / s (both terms ≥ 0: no cancellation at
    large logits), as token_logprobs' kernel. Ignored rows give logprob and
    entropy 0, but lse is returned for every row (the backward below needs it
    finite everywhere). Logits are finite (they come from a matmul).
    """
    valid = labels != ignore_index
    x = logits[:, :vocab_size]
    if temperature != 1.0:
        x.div_(temperature)
    m = x.amax(dim=-1)
    x.sub_(m[:, None])                                          # x − m ≤ 0
    p = torch.exp(x)                                            # the one (C, V) temporary
    s = p.sum(-1)
    t = torch.linalg.vecdot(p, x)                               # Σ exp(x − m)·(x − m), per row
    log_s = s.log()
    label_x = x.gather(-1, torch.where(valid, labels, 0).long()[:, None]).squeeze(-1)
    logprobs = torch.where(valid, label_x - log_s, 0.0)
    entropy = torch.where(valid, log_s - t / s, 0.0)
    return logprobs, entropy, m + log_s


def linear_logits_chunk_backward_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None, temperature: float, ignore_index: int,
    vocab_size: int,
) -> torch.Tensor:
    """logits (C, V) float32 -> dlogits, written over them (the same tensor is returned).

    Columns from vocab_size on are alignment padding: their dlogits are 0.

    As token_logprobs_backward, with x = logits / T, log p = x − lse:
      dlogits_j = (g_lp·([j = label] − p_j) − g_ent·p_j (log p_j + H)) / T
                = (p_j · (−g_ent·log p_j − (g_ent·H + g_lp)) + g_lp·[j = label]) / T.
    `lse` must be finite on every kept row (linear_logits_chunk_forward_ gives it so); ignored rows get zero
    upstream gradients, their lse and entropy are not read, and so their dlogits are exactly zero wherever
    their logits are finite (the caller zeroes their hidden states: NaN ones too).
    """
    valid = labels != ignore_index
    g_lp = torch.zeros_like(lse) if grad_logprobs is None else torch.where(valid, grad_logprobs, 0.0)
    g_ent = torch.zeros_like(lse) if grad_entropy is None else torch.where(valid, grad_entropy, 0.0)
    lse, entropy = torch.where(valid, lse, 0.0), torch.where(valid, entropy, 0.0)
    logits[:, vocab_size:] = 0.0
    logp = logits[:, :vocab_size]
    if temperature != 1.0:
        logp.div_(temperature)
    logp.sub_(lse[:, None])
    p = torch.exp(logp)                                         # the one (C, V) temporary
    inv_t = 1.0 / temperature
    # In place: logp -> the per-logit coefficient -> dlogits.
    coef = logp.mul_((-g_ent * inv_t)[:, None]).sub_(((g_ent * entropy + g_lp) * inv_t)[:, None])
    dlogits = coef.mul_(p)
    if grad_logprobs is not None:
        dlogits.scatter_add_(-1, torch.where(valid, labels, 0).long()[:, None], (g_lp * inv_t)[:, None])
    return logits


# ----------------------------------------------------------------------------
# linear_ppo_loss (one chunk of valid tokens at a time; the chunk loop, the
# token compaction and the matmuls are in linear_ppo_loss.py). The chunk
# function works in place on the (C, V) float32 logits, with no (C, V)
# temporary: a few rows at a time go through a cache-sized one.
# ----------------------------------------------------------------------------

# Rows of the per-token statistics linear_ppo_chunk_ returns (and the Triton kernel writes).
PPO_TOKEN_STATS = ("logprobs", "entropy", "pg", "clipped", "approx_kl", "ratio", "kl")


# linear_ppo_chunk_ works through its (C, V) chunk a few rows at a time, through a cache-sized temporary:
# (C, V) temporaries cost more in page faults than the arithmetic that fills them (a fresh 64 MB buffer:
# ~11 ms, against ~3 ms for the exp that fills it, at C=512, V=32000 on the 2-core CPU).
PPO_ROW_BLOCK_ELEMENTS = 1 << 19


def linear_ppo_chunk_(
    x: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    policy_weight: torch.Tensor | None,
    normalizer: torch.Tensor,
    params,
    with_grad: bool,
    vocab_size: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward and gradient of the PPO policy loss for C tokens, from their scaled logits.

    x (C, V) float32: logits / temperature (finite: from a matmul), overwritten;
    only its first vocab_size columns are real (the rest is alignment padding:
    never read, and its gradient is 0). With ``with_grad`` it becomes
    d loss / d logits (the 1/T included), where
        loss = Σ_tokens [pg − ent_coef·H + kl_coef·k(logprob − ref)] / normalizer,
    pg the weighted policy term of `policy_surrogate` (PPO or CISPO, params.cispo). labels (C,) int in
    [0, vocab_size); old_logprobs, advantages, ref_logprobs, policy_weight (C,)
    float32 (ref_logprobs and policy_weight may be None); normalizer a 0-dim
    float32 tensor > 0; params a ``linear_ppo_loss.LinearPPOParams`` (clip
    range, coefficients, estimator, temperature). ``valid`` (C,) bool, or
    None when every token is valid: invalid tokens (finite inputs, e.g. zeros)
    get zero statistics and zero gradient.
    Returns the per-token statistics (len(PPO_TOKEN_STATS), C) float32.

    With p = softmax(x), H its entropy and
      g_lp  = (dpg + kl_coef·k'(d)) / n,   g_ent = −ent_coef / n
    (d = logprob − ref, dpg from policy_surrogate, k' the estimator's slope):
      dlogits_j = (g_lp·([j = label] − p_j) − g_ent·p_j·(log p_j + H)) / T.
    With x' = x − max, e = exp(x'), s = Σ e, t = Σ e·x' (so log p = x' − log s
    and H = log s − t / s), that is
      dlogits_j = e_j·(α·x'_j + β) + [j = label]·g_lp / T,
      α = −g_ent / (T·s),  β = −(g_lp − g_ent·t / s) / (T·s),
    written over x' in one pass (α = 0 without an entropy bonus). Extra memory:
    one block of PPO_ROW_BLOCK_ELEMENTS floats; e is recomputed for the
    gradient inside each block instead of being stored for the chunk.
    """
    logprobs, entropy, s, t = linear_ppo_chunk_stats_(x, labels, vocab_size)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg, clipped, dpg = policy_surrogate(ratio, logprobs, advantages, params.clip_eps, params.clip_eps_high,
                                        params.dual_clip, params.cispo, policy_weight)
    approx_kl = (ratio - 1.0).sub_(log_ratio)
    if ref_logprobs is not None:
        kl, slope = kl_penalty_forward(logprobs, ref_logprobs, params.kl_estimator, None, with_slope=with_grad)
    else:
        kl, slope = torch.zeros_like(logprobs), None
    stats = torch.stack([logprobs, entropy, pg, clipped, approx_kl, ratio, kl])
    if valid is not None:
        stats = torch.where(valid, stats, 0.0)
    if not with_grad:
        return stats
    g_lp = dpg if slope is None or params.kl_coef == 0 else dpg + params.kl_coef * slope
    g_lp = g_lp / normalizer
    g_ent = -params.ent_coef / normalizer                        # 0-dim, or (C,) with a valid mask
    if valid is not None:
        g_lp = torch.where(valid, g_lp, 0.0)
        g_ent = torch.where(valid, g_ent, 0.0)
    linear_ppo_chunk_grad_(x, labels, s, t, g_lp, g_ent, params.temperature, vocab_size, params.ent_coef != 0)
    return stats


def linear_ppo_chunk_stats_(x: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """x (C, V) float32 scaled logits, shifted in place to x' = x − max over the first vocab_size columns
    -> logprobs, entropy, s = Σ e^x', t = Σ e^x'·x', each (C,) (see `linear_ppo_chunk_`)."""
    n_rows = x.shape[0]
    x = x[:, :vocab_size]
    step = max(1, PPO_ROW_BLOCK_ELEMENTS // max(1, vocab_size))
    tmp = torch.empty(min(step, n_rows), vocab_size, dtype=torch.float32, device=x.device)
    m = x.amax(dim=-1)
    x.sub_(m[:, None])                                          # x' = x − m ≤ 0
    s, t = torch.empty(2, n_rows, dtype=torch.float32, device=x.device)
    for r in range(0, n_rows, step):
        xb, eb = x[r:r + step], tmp[:min(step, n_rows - r)]
        torch.sum(torch.exp(xb, out=eb), dim=-1, out=s[r:r + step])
        torch.sum(eb.mul_(xb), dim=-1, out=t[r:r + step])
    log_s = s.log()
    logprobs = x.gather(-1, labels.long()[:, None]).squeeze(-1) - log_s
    return logprobs, log_s - t / s, s, t


def linear_ppo_chunk_grad_(x: torch.Tensor, labels: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                           g_lp: torch.Tensor, g_ent: torch.Tensor, temperature: float, vocab_size: int,
                           has_entropy: bool) -> None:
    """x' (C, V) from `linear_ppo_chunk_stats_` -> d (Σ g_lp·logprob + g_ent·H) / d logits, written over it (the
    1/T included; padding columns 0): dlogits_j = e_j·(α·x'_j + β) + [j = label]·g_lp / T (`linear_ppo_chunk_`).
    g_lp (C,), g_ent 0-dim or (C,); has_entropy False when g_ent is 0 (α = 0: one multiply per logit)."""
    n_rows = x.shape[0]
    x[:, vocab_size:] = 0.0
    x = x[:, :vocab_size]
    step = max(1, PPO_ROW_BLOCK_ELEMENTS // max(1, vocab_size))
    inv_t = 1.0 / temperature
    beta = (g_lp - g_ent * (t / s)).mul_(-inv_t).div_(s)[:, None]
    alpha = ((-inv_t * g_ent) / s)[:, None]
    tmp = torch.empty(min(step, n_rows), vocab_size, dtype=torch.float32, device=x.device) if has_entropy else None
    for r in range(0, n_rows, step):
        xb = x[r:r + step]
        if not has_entropy:
            xb.exp_().mul_(beta[r:r + step])
        else:
            eb = torch.exp(xb, out=tmp[:xb.shape[0]])
            torch.addcmul(beta[r:r + step], xb, alpha[r:r + step], out=xb).mul_(eb)
    x.scatter_add_(-1, labels.long()[:, None], (g_lp * inv_t)[:, None])
