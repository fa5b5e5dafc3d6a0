"""Per-token math shared by the Triton kernels, written once as @triton.jit device functions.

A device function is compiled inside each kernel that calls it (inlined: no
call and no registers beyond those of the same code written out), never
launched on its own. Scalar parameters arrive as kernel arguments, which the
interpreter passes as Python floats: the helpers cast them with ``tl.cast``.
The same formulas, for the PyTorch backend, are in torch_backend.py.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_lse_step(m, s, t, x):
    """Fold one block x of a row's (scaled) logits into the running (m, s, t); returns the new state.

    All relative to the running max m, which starts at −inf (not 0: rows of
    all-negative logits must work):  s = Σ exp(x − m),  t = Σ exp(x − m)·(x − m),
    so that lse = m + log s and the entropy log s − t / s need no large
    differences (see `lse_and_entropy`). Logits of −inf count as probability 0.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While every logit so far is -inf, keep the reference point finite.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_ref)
    shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
    e = tl.exp(x - m_ref)
    x_rel = tl.where(e > 0.0, x - m_ref, 0.0)
    t = alpha * (t + shift * s) + tl.sum(e * x_rel, axis=0)
    s = s * alpha + tl.sum(e, axis=0)
    return m_new, s, t


@triton.jit
def lse_and_entropy(m, s, t):
    """(log-sum-exp, entropy) of a row from the final state of `online_lse_step` (s > 0)."""
    log_s = tl.log(s)
    return tl.where(m == float("-inf"), 0.0, m) + log_s, log_s - t / s


@triton.jit
def softmax_grad(is_label, logp, entropy, g_lp, g_ent, HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr):
    """d (g_lp·logprob + g_ent·H) / d x_j for one block of a row, x the scaled logits, logp = log p_j:

      g_lp·([j = label] − p_j) − g_ent·p_j·(log p_j + H)
    (p·log p is 0 where p is 0). Each term only when its HAS_* switch is set.
    """
    p = tl.exp(logp)
    if HAS_G_LP:
        grad = tl.where(is_label, g_lp, 0.0) - p * g_lp
    else:
        grad = tl.zeros(logp.shape, dtype=tl.float32)
    if HAS_G_ENT:
        grad -= g_ent * tl.where(p > 0.0, p * (logp + entropy), 0.0)
    return grad


@triton.jit
def clipped_surrogate(ratio, adv, weight, clip_eps, clip_eps_high, dual_clip,
                      HAS_DUAL_CLIP: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """PPO's clipped policy surrogate per token (Schulman et al. 2017, eq. 7) -> (pg, dpg, clipped):

      pg  = w·max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high)),
            for A < 0 also min(·, −c·A) (dual clip, Ye et al. 2020)
      dpg = d pg / d log ρ = w·(−A·ρ) where no clipped branch is the larger, else 0
      clipped = a clipped branch (ε or dual) is strictly the larger
    w = weight when HAS_WEIGHT (else 1: weight is not read).
    """
    eps_low = tl.cast(clip_eps, tl.float32)
    eps_high = tl.cast(clip_eps_high, tl.float32)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    clipped = pg2 > pg1
    pg = tl.maximum(pg1, pg2)
    if HAS_DUAL_CLIP:
        bound = -tl.cast(dual_clip, tl.float32) * adv
        dual = (adv < 0.0) & (bound < pg)
        clipped = clipped | dual
        pg = tl.where(dual, bound, pg)
    dpg = tl.where(clipped, 0.0, pg1)
    if HAS_WEIGHT:
        pg = pg * weight
        dpg = dpg * weight
    return pg, dpg, clipped


@triton.jit
def policy_surrogate(ratio, logp, adv, weight, clip_eps, clip_eps_high, dual_clip,
                     HAS_DUAL_CLIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, CISPO: tl.constexpr):
    """The policy loss per token -> (pg, dpg, clipped): PPO's `clipped_surrogate` at the ratio ρ (a token's, or
    its sequence's: GSPO), or with CISPO (MiniMax-M1, 2025) the truncated importance weight, detached:

      pg  = −w·min(ρ, 1 + ε_high)·A·logp,  dpg = d pg / d logp = −w·min(ρ, 1 + ε_high)·A,
      clipped = ρ > 1 + ε_high (the weight was truncated).
    PPO's dpg is d pg / d log ρ (the token's logp when ρ is the token's ratio); CISPO's is d pg / d logp at
    any ratio level (the weight is a constant). logp is read by CISPO only; dual_clip is PPO's.
    """
    if CISPO:
        iw = tl.minimum(ratio, 1.0 + tl.cast(clip_eps_high, tl.float32))
        dpg = -iw * adv
        clipped = ratio > 1.0 + tl.cast(clip_eps_high, tl.float32)
        if HAS_WEIGHT:
            dpg = dpg * weight
        pg = dpg * logp
    else:
        pg, dpg, clipped = clipped_surrogate(ratio, adv, weight, clip_eps, clip_eps_high, dual_clip,
                                             HAS_DUAL_CLIP, HAS_WEIGHT)
    return pg, dpg, clipped


@triton.jit
def clipped_value_error(v, ret, old_v, value_clip, HAS_VALUE_CLIP: tl.constexpr):
    """PPO's clipped value error per token (Schulman et al. 2017, eq. 9) -> (vf2, dvf, clipped):

      vf2 = max((V − R)², (clip(V, V_old ± ε_v) − R)²)   (twice the value loss term)
      dvf = d(vf2 / 2) / dV = V − R unless the clipped error is strictly the larger, else 0
    Without HAS_VALUE_CLIP: (V − R)², V − R, False (old_v is not read).
    """
    err = v - ret
    vf = err * err
    clipped = False
    if HAS_VALUE_CLIP:
        vc = tl.cast(value_clip, tl.float32)
        dv = v - old_v
        err_c = err + (tl.minimum(tl.maximum(dv, -vc), vc) - dv)     # clip(V, V_old ± ε_v) − R
        vf_c = err_c * err_c
        clipped = vf_c > vf
        vf = tl.maximum(vf, vf_c)
        err = tl.where(clipped, 0.0, err)
    return vf, err, clipped


@triton.jit
def kl_estimate(d, ESTIMATOR: tl.constexpr):
    """(k(d), k'(d)) of the KL estimator on d = logprobs − ref_logprobs (Schulman's k1, k2, k3; abs):

      k1 = d, 1;  k2 = ½d², d;  k3 = max(e^(−d) + d − 1, 0), 1 − e^(−d);  abs = |d|, sign(d)
    (k3 is clamped at 0 so that rounding near d = 0 never makes it negative).
    """
    if ESTIMATOR == "k1":
        kl = d
        slope = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == "k2":
        kl = 0.5 * d * d
        slope = d
    elif ESTIMATOR == "k3":
        e = tl.exp(-d)
        kl = tl.maximum(e + d - 1.0, 0.0)
        slope = 1.0 - e
    else:
        kl = tl.abs(d)
        slope = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    return kl, slope


# -- base-2 row statistics: the row kernels' hot loops ---------------------------------------------------------------
# exp2 is one MUFU instruction; exp(x) is exp2(x·log2 e), a multiply more. Scaling the logits by log2(e) / T in
# the same fused multiply-add that subtracts the reference point leaves one FFMA and one MUFU per element.

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
RESCALE_LOG2 = tl.constexpr(8.0)       # the reference point moves when a block's max passes it by 2^8


@triton.jit
def _ptx(x, INSTRUCTION: tl.constexpr):
    """One PTX instruction `INSTRUCTION d, a;` on float32 x (inline PTX: compiled kernels only)."""
    return tl.inline_asm_elementwise(INSTRUCTION, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def fast_exp2(x, FTZ: tl.constexpr):
    """2^x; with FTZ the single PTX instruction ex2.approx.ftz.f32 (results below 2^-126 flush to 0; without
    .ftz ptxas adds three instructions per element to rescale subnormal results). FTZ needs the compiler
    (inline PTX): the interpreter takes tl.exp2."""
    return _ptx(x, "ex2.approx.ftz.f32 $0, $1;") if FTZ else tl.exp2(x)


@triton.jit
def fast_log2(x, FAST: tl.constexpr):
    """log2(x) for x > 0; with FAST the single PTX instruction lg2.approx.ftz.f32 (absolute error below 2^-22
    for normal x, PTX ISA) instead of libdevice's ~20-instruction log2f. FAST needs the compiler (inline PTX)."""
    return _ptx(x, "lg2.approx.ftz.f32 $0, $1;") if FAST else tl.log2(x)


@triton.jit
def exp2_terms(x, scale, r, FTZ: tl.constexpr):
    """d = y − r, at least −1000, and 2^d for raw logits x (y = x·scale) against a running reference r (−inf: no
    finite logit yet, taken as 0): −inf → −1000, where 2^−1000 is 0 and 0·(−1000) is 0, not NaN."""
    r_ref = tl.where(r == float("-inf"), 0.0, r)
    d = tl.maximum(x * scale - r_ref, -1000.0)
    return d, fast_exp2(d, FTZ)


@triton.jit
def online_lse2_step(r, s, t, x, scale, FTZ: tl.constexpr):
    """Fold one block x of raw logits into the running state; returns (r, s, t).

    With y = x·scale (scale = log2(e) / T: base-2 units) and a reference point r,
    the per-lane vectors s and t hold Σ 2^(y − r) and Σ 2^(y − r)·(y − r): no
    reduction per block but the block's max. Reduce with `lse2_and_entropy`.

    r starts at −inf and moves (both vectors rescaled) only when a block's max
    exceeds it by RESCALE_LOG2, so terms stay ≤ 2^8 and the common block costs
    per element one FFMA (y − r), one max (−inf → −1000: 2^−1000 is 0 and
    0·(−1000) is 0, where 0·(−inf) would be NaN), one MUFU and two adds.
    """
    y_max = tl.max(x, axis=0) * scale
    if y_max > r + RESCALE_LOG2:
        alpha = tl.exp2(r - y_max)                               # 0 from r = −inf
        shift = tl.where(r == float("-inf"), 0.0, r - y_max)
        t = alpha * (t + shift * s)
        s = alpha * s
        r = y_max
    d, e = exp2_terms(x, scale, r, FTZ)
    return r, s + e, t + e * d


@triton.jit
def online_lse2_mass_step(r, s, c, t, x, scale, FTZ: tl.constexpr):
    """`online_lse2_step` for a caller that needs each block's mass (the sampler's chunks): returns (r, s, c,
    t, the block's mass Σ 2^(y − r), the block's max x).

    The mass S = Σ 2^(y − r) is a scalar s, the sum of the blocks' masses (the
    reduction the caller needs anyway, in place of a per-lane add), and
    T = Σ 2^(y − r)·(y − r) is per-lane t plus a scalar c: moving r rescales one
    vector, T' = α(T + shift·S) putting α·shift·S into c.
    """
    x_max = tl.max(x, axis=0)
    y_max = x_max * scale
    if y_max > r + RESCALE_LOG2:
        alpha = tl.exp2(r - y_max)
        shift = tl.where(r == float("-inf"), 0.0, r - y_max)
        c = alpha * (c + shift * s)
        s = alpha * s
        t = alpha * t
        r = y_max
    d, e = exp2_terms(x, scale, r, FTZ)
    mass = tl.sum(e, axis=0)
    return r, s + mass, c, t + e * d, mass, x_max


@triton.jit
def lse2_and_entropy(r, s, t, is_empty, AXIS: tl.constexpr = 0):
    """(reference point, log₂ S, natural entropy) from the state of `online_lse2_step`; the row's base-2
    log-sum-exp of the scaled logits is their sum. is_empty: a row that folded nothing (0, 0 and 0 then).

    S = Σ s, T = Σ t (along AXIS): lse₂ = r + log₂ S and H = −Σ p ln p = ln 2·(log₂ S − T / S), both relative
    to r, so no large difference; a logprob is (y − r) − log₂ S, times ln 2."""
    s_sum = tl.where(is_empty, 1.0, tl.sum(s, axis=AXIS))
    t_sum = tl.sum(t, axis=AXIS)
    log2_s = tl.log2(s_sum)
    return tl.where(r == float("-inf"), 0.0, r), log2_s, (log2_s - t_sum / s_sum) * LN2


@triton.jit
def to_largest_reference(r, s, AXIS: tl.constexpr):
    """Partial states along AXIS, each a reference r_i (−inf: empty) and a mass s_i = Σ 2^(y − r_i), taken to
    R = max r_i: (R, r_i − R, s_i·2^(r_i − R)); an empty part's shift and mass are 0. The total mass relative
    to R is the sum of the third."""
    big_r = tl.max(r, axis=AXIS)
    r_ref = tl.expand_dims(tl.where(big_r == float("-inf"), 0.0, big_r), AXIS)
    shift = tl.where(r == float("-inf"), 0.0, r - r_ref)
    return big_r, shift, tl.where(r == float("-inf"), 0.0, s * tl.exp2(shift))


@triton.jit
def merge_lse2(r, s, t, AXIS: tl.constexpr):
    """`lse2_and_entropy` of partial states along AXIS (a row's splits), each reduced to a reference r_i (−inf:
    empty), s_i = Σ 2^(y − r_i) and t_i = Σ 2^(y − r_i)(y − r_i): exact up to rounding. Relative to
    R = max r_i they are s_i·2^(r_i − R) and 2^(r_i − R)·(t_i + (r_i − R)·s_i) (`to_largest_reference`)."""
    big_r, shift, s_big = to_largest_reference(r, s, AXIS)
    t = tl.where(r == float("-inf"), 0.0, tl.exp2(shift) * (t + shift * s))
    return lse2_and_entropy(big_r, s_big, t, big_r == float("-inf"), AXIS)
