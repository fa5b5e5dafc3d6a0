"""sample: one decode step's token draw, with its logprob and entropy, in one fused pass over the logits.

What is drawn, per row (x = logits / T over the first vocab_size columns):

1. top-k keeps every token whose x is >= the k-th largest x (ties at the
   threshold all kept; k = 0 or k >= vocab_size: all);
2. top-p keeps, among those, every token whose x is >= tau_p, the largest
   value such that the tokens at or above it hold >= top_p of the top-k set's
   probability: the smallest set of highest-probability tokens whose mass
   reaches top_p, with every token tied at the threshold kept (equivalently: a
   token is kept when the mass of the tokens strictly more likely than it is
   < top_p). top_p = 1: all;
3. the token is argmax over the kept set of x + g, g a standard Gumbel
   variable that is a pure function of (seed, sample id, step, token id)
   (`gumbel_noise`); equal x + g go to the smallest token id. This is a draw
   from softmax(x) restricted to the kept set (the Gumbel-max trick).

Returned with it: the token's float32 logprob under softmax(x) over all
vocab_size columns, before top-k/top-p (the policy's distribution, which the
PPO ratio refers to), and that distribution's entropy. Columns >= vocab_size
(embedding rows padded on for alignment) are never drawn and carry no
probability. A row without a finite logit draws token 0, with logprob -inf and
entropy 0.

Memory traffic. The logits-processor path it replaces (temperature, top-k, a
full sort and two softmaxes for top-p, ~20 elementwise passes over (B, V) for
the Gumbel noise) moves ~230 bytes per logit (~9 GB per step at B=256,
V=151936). The kernel reads each logit once per pass and writes 16 bytes per
row: 1 pass without top-k/top-p (statistics and the Gumbel argmax together);
2 for most rows with top-p alone (the draw, then a check of the mass above it:
`_sample_final_kernel`); with top-k 1 + 8 per filter + 1 (statistics, threshold
search, draw), the later passes re-reading the row (V·4 bytes) from L2 when
the rows in flight fit. No sort and no (B, V) temporary: the thresholds are
found by a 16-way search on the float32 order key, which pins a 32-bit key
range to one key in 8 passes (16^8 = 2^32), so they are exact, not
approximations of the mass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES, INT_DTYPES, as_rows, check_number, check_positive, check_same_device, check_shape, check_tensor,
    check_vocab_size,
)
from ._dispatch import empty_output, on_device_of, resolve_backend, triton_interpreter_enabled
from ._math import LN2, LOG2E, fast_exp2, lse2_and_entropy, online_lse2_fold

_M32 = 0xFFFFFFFF
_TOKEN_SALT = 0x85EBCA6B  # (the kernel writes these two constants in place)
_STEP_SALT = 0x632BE5AB
_MIX_A, _MIX_B = 0x7FEB352D, 0x5BD1E995  # mix32's multipliers
_NPROBE = 16          # thresholds probed per search pass
_SEARCH_PASSES = 8    # 16^8 = 2^32: a 32-bit key range narrowed to one key
_CHECKS = 4           # top-p alone: check passes before a row falls back to the search (_sample_final_kernel)
_MAX_SPLITS = 8       # programs per row in the passes that read it (at most; fewer for short rows)
_MAX_VOCAB = 1 << 24  # token counts are summed in float32, exact up to 2^24
_U_MAX = 1.0 - 2.0 ** -24  # the largest float32 below 1


# ----------------------------------------------------------------------------
# 0. The counter-based noise, in torch (the twin's and the tests' definition)
# ----------------------------------------------------------------------------

def mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds) of x in [0, 2^32), for Python ints or int64 tensors.

    Both multipliers are below 2^31, so products of 32-bit values stay inside int64.
    """
    if isinstance(x, torch.Tensor):
        return _mix32_(x.clone())
    x = x ^ (x >> 16)
    x = (x * _MIX_A) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX_B) & _M32
    return x ^ (x >> 16)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`mix32` of an int64 tensor in place, with one scratch tensor (a (B, V) counter is 8 bytes an element)."""
    t = x >> 16
    x ^= t
    x.mul_(_MIX_A).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=t)
    x ^= t
    x.mul_(_MIX_B).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=t)
    x ^= t
    return x


def gumbel_noise(seed: int, sample_ids: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 standard Gumbel noise, a pure function of (seed, sample id, step, token id); `step` an
    int or each row's, (B,) integer (its low 32 bits enter the counter).

    24 random bits per (row, token): u = (bits + 0.5) / 2^24 in float32, g = -log(-log u). u is clamped to
    1 - 2^-24, the largest float32 below 1: (2^24 - 1) + 0.5 rounds to 2^24 in float32, and u = 1 would give
    g = +inf (once in 2^24 tokens; at V = 151936 about one row-step in 110 drew a uniformly random kept token).
    """
    sample_hash = mix32(mix32(sample_ids.to(torch.int64) & _M32) ^ seed)                 # (B,)
    if isinstance(step, torch.Tensor):
        step = (step.to(device=sample_ids.device, dtype=torch.int64) + _STEP_SALT) & _M32
    else:
        step = step + _STEP_SALT
    row = mix32(sample_hash ^ mix32(step))                                               # (B,)
    tokens = mix32((torch.arange(vocab, device=sample_ids.device, dtype=torch.int64) + _TOKEN_SALT) & _M32)
    bits = _mix32_(row[:, None] ^ tokens[None, :]).bitwise_right_shift_(8)                # (B, V) 24 random bits
    u = bits.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 24)).clamp_(max=_U_MAX)
    del bits
    return u.log_().neg_().log_().neg_()


# ----------------------------------------------------------------------------
# 1. Kernel
# ----------------------------------------------------------------------------

@triton.jit
def _mix32(x):
    """`mix32` on uint32: products wrap modulo 2^32, which is the `& 0xFFFFFFFF` of the torch version."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x5BD1E995
    return x ^ (x >> 16)


@triton.jit
def _gumbel(row_hash, offs):
    """Standard Gumbel noise of tokens `offs` for the row whose counter half is row_hash (see `gumbel_noise`).

    tl.log of float32 compiles to libdevice's logf (1 ulp; checked in the PTX for sm_90), not lg2.approx, whose
    absolute error near 1 would make -log(u) 0 or negative for u within a few ulps of 1."""
    token_hash = _mix32(offs.to(tl.uint32) + 0x85EBCA6B)
    bits = _mix32(row_hash ^ token_hash) >> 8
    u = tl.minimum((bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994)   # 1 - 2^-24, as in gumbel_noise
    return -tl.log(-tl.log(u))


@triton.jit
def _scaled_block(row_ptr, offs, n_cols, n_valid, stride_lv, temp):
    """x = logits / T for columns offs; -inf on padding (>= n_valid) and past the row."""
    x = tl.load(row_ptr + offs * stride_lv, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
    return tl.where(offs < n_valid, x / temp, float("-inf"))


@triton.jit
def _order_key(x):
    """int64 key whose order is the order of float32 x (-0.0 and +0.0 get the same key)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, key).to(tl.int64)


@triton.jit
def _search_pass(row_ptr, n_cols, n_valid, stride_lv, temp, m_ref, lo, hi, target,
                 BY_COUNT: tl.constexpr, BLOCK_V: tl.constexpr, NPROBE: tl.constexpr):
    """One pass of a 16-way search for the largest key v with F(v) >= target, known to lie in [lo, hi).

    F(v) is the number (BY_COUNT) or the mass sum exp(x - m_ref) of the valid
    tokens whose key is >= v. Returns the narrowed [lo, hi) and F(lo) by mass.
    F is a sum of non-negative terms in a fixed order, so its float value is
    monotone in v and the probes' verdicts are consistent.
    """
    probe_ix = tl.arange(0, NPROBE).to(tl.int64)
    probes = lo + ((hi - lo) * probe_ix) // NPROBE                                     # (NPROBE,) ascending
    count = tl.zeros([NPROBE], dtype=tl.float32)
    mass = tl.zeros([NPROBE], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = _scaled_block(row_ptr, offs, n_cols, n_valid, stride_lv, temp)
        above = (_order_key(x)[None, :] >= probes[:, None]) & (offs < n_valid)[None, :]  # (NPROBE, BLOCK_V)
        count += tl.sum(above.to(tl.float32), axis=1)
        mass += tl.sum(tl.where(above, tl.exp(x - m_ref)[None, :], 0.0), axis=1)
    score = count if BY_COUNT else mass
    ok = (score >= target) | (probes == lo)                                             # F(lo) >= target by invariant
    new_lo = tl.max(tl.where(ok, probes, lo), axis=0)
    new_hi = tl.min(tl.where(ok, hi, probes), axis=0)
    lo_mass = tl.max(tl.where(probes == new_lo, mass, 0.0), axis=0)
    return new_lo, new_hi, lo_mass


@triton.jit
def _lane_draw(x, offs, row_hash, keep, m, best, best_x, best_tok):
    """Fold one block into per-lane running Gumbel argmaxes (score, x, token) over the tokens `keep`.

    No reduction: each lane keeps its own best, its tokens coming in increasing order (strict >: the smallest
    id of a tie); `_lane_result` reduces once per row. The noise (two hashes and two logs per token, the
    costly part) is skipped for a block that cannot win: g lies in [-2.86, 16.7] (u in [2^-25, 1 - 2^-24]), so
    the best score is at least m - 2.86, m the largest x folded so far or in the set, and a block whose
    largest kept x is at most m - 20 has no score above it."""
    if tl.max(tl.where(keep, x, float("-inf")), axis=0) + 20.0 > m:
        score = tl.where(keep, x + _gumbel(row_hash, offs), float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_x = tl.where(better, x, best_x)
        best_tok = tl.where(better, offs, best_tok)
    return best, best_x, best_tok


@triton.jit
def _lane_result(best, best_x, best_tok):
    """(score, x, token) of the per-lane argmaxes: the largest score, the smallest token among equal ones."""
    top = tl.max(best, axis=0)
    tok = tl.min(tl.where(best == top, best_tok, 2147483647), axis=0)
    return top, tl.max(tl.where(best_tok == tok, best_x, float("-inf")), axis=0), tok


@triton.jit
def _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed):
    """The counter half of a row's noise: mix(mix(mix(id) ^ seed) ^ mix(step + salt)) (see `gumbel_noise`);
    the row's step at steps_ptr + row·stride_step (stride 0: one step for every row)."""
    sample_id = tl.load(ids_ptr + row * stride_id).to(tl.uint32)
    step_hash = _mix32(tl.load(steps_ptr + row * stride_step).to(tl.uint32) + 0x632BE5AB)
    return _mix32(_mix32(_mix32(sample_id) ^ seed.to(tl.uint32)) ^ step_hash)


@triton.jit
def _merge_draws(part_ptr, stride_f, offs, valid):
    """(score, x, token) of the best of per-split draws stored as fields 0, 1, 2 (token as float32, exact below
    2^24): the largest score, the smallest token among equal ones (the earlier split's, as in one pass)."""
    best = tl.load(part_ptr + offs, mask=valid, other=float("-inf"))
    best_x = tl.load(part_ptr + stride_f + offs, mask=valid, other=float("-inf"))
    best_tok = tl.load(part_ptr + 2 * stride_f + offs, mask=valid, other=0.0).to(tl.int32)
    return _lane_result(best, best_x, best_tok)


@triton.jit
def _merge_stats(stats_ptr, row, n_splits, stride_f, SPLITS: tl.constexpr):
    """Merge a row's per-split statistics (fields m, r, s, t, low, then the draw): exact up to rounding.

    Each split holds s_i = sum 2^(y - r_i), t_i = sum 2^(y - r_i)(y - r_i) (y = x·log2 e) for its own reference
    r_i; relative to R = max r_i they are s_i·2^(r_i - R) and 2^(r_i - R)·(t_i + (r_i - R)·s_i).
    Returns (m, R, log2 S, entropy, low, score, x, token of the unfiltered draw)."""
    offs = row * n_splits + tl.arange(0, SPLITS)
    valid = tl.arange(0, SPLITS) < n_splits
    m = tl.max(tl.load(stats_ptr + offs, mask=valid, other=float("-inf")), axis=0)
    r = tl.load(stats_ptr + stride_f + offs, mask=valid, other=float("-inf"))
    s = tl.load(stats_ptr + 2 * stride_f + offs, mask=valid, other=0.0)
    t = tl.load(stats_ptr + 3 * stride_f + offs, mask=valid, other=0.0)
    low = tl.min(tl.load(stats_ptr + 4 * stride_f + offs, mask=valid, other=float("inf")), axis=0)
    big_r = tl.max(r, axis=0)
    r_ref = tl.where(big_r == float("-inf"), 0.0, big_r)
    shift = tl.where(r == float("-inf"), 0.0, r - r_ref)
    alpha = tl.exp2(shift)
    t = tl.where(r == float("-inf"), 0.0, alpha * (t + shift * s))
    s = tl.where(r == float("-inf"), 0.0, s * alpha)
    _, log2_s, entropy = lse2_and_entropy(big_r, s, t, m == float("-inf"))
    top, top_x, top_tok = _merge_draws(stats_ptr + 5 * stride_f, stride_f, offs, valid)
    return m, r_ref, log2_s, entropy, low, top, top_x, top_tok


@triton.jit
def _candidate(stats_ptr, check_ptr, state_ptr, row, n_splits, n_rows, stride_f, top_p, FIRST: tl.constexpr,
               SPLITS: tl.constexpr):
    """The row's top-p candidate (score, x, token) and whether it is known kept, after the previous check.

    FIRST: the unfiltered draw, unchecked (resolved only for a row without a finite logit). Otherwise the
    state before the previous check (state_ptr: score, x, token, resolved) and that check's per-split
    results (check_ptr: mass above the candidate, then the draw above it): mass < top_p·S keeps the
    candidate (resolved), else the draw above it becomes the candidate."""
    m, r_ref, log2_s, _, _, top, top_x, top_tok = _merge_stats(stats_ptr, row, n_splits, stride_f, SPLITS)
    if FIRST:
        resolved = m == float("-inf")
    else:
        offs = row * n_splits + tl.arange(0, SPLITS)
        valid = tl.arange(0, SPLITS) < n_splits
        mass = tl.sum(tl.load(check_ptr + offs, mask=valid, other=0.0), axis=0)
        next_top, next_x, next_tok = _merge_draws(check_ptr + stride_f, stride_f, offs, valid)
        top = tl.load(state_ptr + row)
        top_x = tl.load(state_ptr + n_rows + row)
        top_tok = tl.load(state_ptr + 2 * n_rows + row).to(tl.int32)
        was_resolved = tl.load(state_ptr + 3 * n_rows + row) != 0.0
        target = tl.cast(top_p, tl.float32) * tl.exp2(log2_s)       # of sum 2^(y - R)
        move = (not was_resolved) & (mass >= target)
        resolved = was_resolved | (mass < target)
        top = tl.where(move, next_top, top)
        top_x = tl.where(move, next_x, top_x)
        top_tok = tl.where(move, next_tok, top_tok)
    return top, top_x, top_tok, resolved, m, r_ref


@triton.jit(do_not_specialize=["seed"])
def _sample_stats_kernel(
    logits_ptr, ids_ptr, steps_ptr, stats_ptr,
    n_cols, n_valid, stride_lm, stride_lv, stride_id, stride_step, blocks_per_split, stride_f,
    seed, temperature,
    BLOCK_V: tl.constexpr, DRAW: tl.constexpr, FTZ: tl.constexpr,
):
    """Grid (rows, splits): pass 1 over one split of a row, its statistics written for `_merge_stats`.

    Per-lane state, one reduction per block (its max): the log-sum-exp and entropy in base 2
    (_math.online_lse2_fold), the smallest x and, with DRAW, the Gumbel argmax (`_lane_draw`)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    temp = tl.cast(temperature, tl.float32)
    row_ptr = logits_ptr + row * stride_lm
    row_hash = _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed)
    lanes = tl.arange(0, BLOCK_V)
    m = tl.cast(float("-inf"), tl.float32)
    r = tl.cast(float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    low = tl.full([BLOCK_V], float("inf"), tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_x = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_tok = tl.zeros([BLOCK_V], dtype=tl.int32)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(n_cols, BLOCK_V))):
        offs = block * BLOCK_V + lanes
        x = _scaled_block(row_ptr, offs, n_cols, n_valid, stride_lv, temp)
        x_max = tl.max(x, axis=0)
        r, s, t = online_lse2_fold(r, s, t, x, x_max * LOG2E, LOG2E, FTZ)
        m = tl.maximum(m, x_max)
        low = tl.minimum(low, tl.where(offs < n_valid, x, float("inf")))
        if DRAW:
            best, best_x, best_tok = _lane_draw(x, offs, row_hash, offs < n_valid, m, best, best_x, best_tok)
    top, top_x, top_tok = _lane_result(best, best_x, best_tok)
    out = stats_ptr + row * n_splits + split
    tl.store(out, m)
    tl.store(out + stride_f, r)
    tl.store(out + 2 * stride_f, tl.sum(s, axis=0))
    tl.store(out + 3 * stride_f, tl.sum(t, axis=0))
    tl.store(out + 4 * stride_f, tl.min(low, axis=0))
    tl.store(out + 5 * stride_f, top)
    tl.store(out + 6 * stride_f, top_x)
    tl.store(out + 7 * stride_f, top_tok.to(tl.float32))


@triton.jit(do_not_specialize=["seed"])
def _sample_check_kernel(
    logits_ptr, ids_ptr, steps_ptr, stats_ptr, prev_ptr, state_in_ptr, state_out_ptr, check_ptr,
    n_rows, n_cols, n_valid, stride_lm, stride_lv, stride_id, stride_step, blocks_per_split, stride_f,
    seed, temperature, top_p,
    BLOCK_V: tl.constexpr, SPLITS: tl.constexpr, FIRST: tl.constexpr, FTZ: tl.constexpr,
):
    """Grid (rows, splits): one check of top-p's candidate over one split (see `_sample_final_kernel`).

    Every program of a row derives the same candidate from the previous launch's results (`_candidate`);
    split 0 records it for the next launch. Unresolved rows sum the mass strictly above x_c over the split
    and draw among the tokens above it; resolved rows read nothing."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    top, top_x, top_tok, resolved, m, r_ref = _candidate(stats_ptr, prev_ptr, state_in_ptr, row, n_splits, n_rows,
                                                         stride_f, top_p, FIRST, SPLITS)
    if split == 0:
        tl.store(state_out_ptr + row, top)
        tl.store(state_out_ptr + n_rows + row, top_x)
        tl.store(state_out_ptr + 2 * n_rows + row, top_tok.to(tl.float32))
        tl.store(state_out_ptr + 3 * n_rows + row, resolved.to(tl.float32))
    temp = tl.cast(temperature, tl.float32)
    row_ptr = logits_ptr + row * stride_lm
    row_hash = _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed)
    lanes = tl.arange(0, BLOCK_V)
    mass = tl.zeros([BLOCK_V], dtype=tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_x = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_tok = tl.zeros([BLOCK_V], dtype=tl.int32)
    first = split * blocks_per_split
    last = tl.where(resolved, first, tl.minimum(first + blocks_per_split, tl.cdiv(n_cols, BLOCK_V)))
    for block in range(first, last):
        offs = block * BLOCK_V + lanes
        x = _scaled_block(row_ptr, offs, n_cols, n_valid, stride_lv, temp)
        above = x > top_x                                          # -inf (padding, past the row) never is
        mass += tl.where(above, fast_exp2(x * LOG2E - r_ref, FTZ), 0.0)
        best, best_x, best_tok = _lane_draw(x, offs, row_hash, above, m, best, best_x, best_tok)
    next_top, next_x, next_tok = _lane_result(best, best_x, best_tok)
    out = check_ptr + row * n_splits + split
    tl.store(out, tl.sum(mass, axis=0))
    tl.store(out + stride_f, next_top)
    tl.store(out + 2 * stride_f, next_x)
    tl.store(out + 3 * stride_f, next_tok.to(tl.float32))


@triton.jit(do_not_specialize=["seed", "top_k"])
def _sample_final_kernel(
    logits_ptr, ids_ptr, steps_ptr, stats_ptr, check_ptr, state_ptr, tokens_ptr, logprobs_ptr, entropy_ptr,
    n_rows, n_splits, n_cols, n_valid, stride_lm, stride_lv, stride_id, stride_step, stride_f,
    seed, temperature, top_k, top_p,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, NPROBE: tl.constexpr,
    SEARCH_PASSES: tl.constexpr, HAS_CHECKS: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
):
    """One program per row: the merged statistics, the filters' outcome, and the outputs.

    Rows are split across programs for the passes that read them (`_sample_stats_kernel`, then for top-p
    alone the checks); the merges are exact up to rounding (log-sum-exp rescaled to the largest reference;
    argmax: largest score, smallest token).

    Top-p alone: the kept set is the tokens whose strictly more likely tokens
    hold < top_p of the mass, an upper set in x. A check pass sums the mass
    strictly above the candidate x_c (first the unfiltered Gumbel argmax):
    below top_p·S, c is kept and, being the argmax over a superset of the kept
    set, is the draw (2 reads of the row in all). Otherwise no token with
    x <= x_c is kept, and the same pass has drawn the next candidate among the
    tokens with x > x_c (again a superset of the kept set). A row unresolved
    after the checks (the draw fell outside the nucleus each time) takes the
    threshold search here.

    With top-k (or for unresolved rows): 8 search passes per filter for its
    threshold key (blocks of BLOCK_S: a pass holds (NPROBE, BLOCK_S) tiles),
    then the Gumbel argmax over the tokens at or above it.
    """
    row = tl.program_id(0).to(tl.int64)
    temp = tl.cast(temperature, tl.float32)
    row_ptr = logits_ptr + row * stride_lm
    FILTERED: tl.constexpr = HAS_TOP_K or HAS_TOP_P
    NUCLEUS: tl.constexpr = HAS_TOP_P and not HAS_TOP_K
    m, r_ref, log2_s, entropy, low, top, top_x, top_tok = _merge_stats(stats_ptr, row, n_splits, stride_f, SPLITS)
    no_mass = m == float("-inf")
    lse = (r_ref + log2_s) * LN2

    if FILTERED:
        m_ref = tl.where(no_mass, 0.0, m)
        s_nat = tl.exp2(log2_s + (r_ref - m_ref * LOG2E))          # sum exp(x - m), the search's unit of mass
        n_search = SEARCH_PASSES
        n_draw = n_cols
        if NUCLEUS and HAS_CHECKS:
            top, top_x, top_tok, resolved, _, _ = _candidate(stats_ptr, check_ptr, state_ptr, row, n_splits, n_rows,
                                                             stride_f, top_p, False, SPLITS)
            n_search = tl.where(resolved, 0, SEARCH_PASSES)
            n_draw = tl.where(resolved, 0, n_cols)
        lo = _order_key(low)                                       # everything kept
        lo_mass = s_nat
        if HAS_TOP_K:
            hi = _order_key(m) + 1
            n_pass = tl.where(top_k < n_valid, SEARCH_PASSES, 0)
            for _ in range(n_pass):
                lo, hi, lo_mass = _search_pass(row_ptr, n_cols, n_valid, stride_lv, temp, m_ref, lo, hi,
                                               tl.cast(top_k, tl.float32), True, BLOCK_S, NPROBE)
        if HAS_TOP_P:
            hi = _order_key(m) + 1
            target = tl.cast(top_p, tl.float32) * lo_mass           # top_p of the top-k set's mass
            for _ in range(n_search):
                lo, hi, lo_mass = _search_pass(row_ptr, n_cols, n_valid, stride_lv, temp, m_ref, lo, hi,
                                               target, False, BLOCK_S, NPROBE)
        if n_draw > 0:
            row_hash = _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed)
            best = tl.full([BLOCK_V], float("-inf"), tl.float32)
            best_x = tl.full([BLOCK_V], float("-inf"), tl.float32)
            best_tok = tl.zeros([BLOCK_V], dtype=tl.int32)
            for start in range(0, n_draw, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = _scaled_block(row_ptr, offs, n_cols, n_valid, stride_lv, temp)
                kept = (offs < n_valid) & (_order_key(x) >= lo)
                best, best_x, best_tok = _lane_draw(x, offs, row_hash, kept, m, best, best_x, best_tok)
            top, top_x, top_tok = _lane_result(best, best_x, best_tok)

    tl.store(tokens_ptr + row, top_tok.to(tl.int64))
    tl.store(logprobs_ptr + row, tl.where(no_mass, float("-inf"), top_x - lse))
    tl.store(entropy_ptr + row, tl.where(no_mass, 0.0, entropy))


# ----------------------------------------------------------------------------
# 2. Backends: the launcher and the torch twin
# ----------------------------------------------------------------------------

def _row_block(n_cols: int) -> int:
    """Columns per trip of the row passes: the interpreter costs ~1 ms per program per loop trip whatever the
    block size (the largest blocks there); a GPU takes 2048 (8 per thread at 8 warps: seven per-lane vectors
    in registers)."""
    return min(triton.next_power_of_2(n_cols), (1 << 16) if triton_interpreter_enabled() else 2048)


def _sample_triton(logits2d, ids1d, steps1d, seed, temperature, top_k, top_p, vocab_size):
    n_rows, n_cols = logits2d.shape
    device = logits2d.device
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    out = empty_output((2, n_rows), torch.float32, device)
    if n_rows == 0:
        return tokens, out[0], out[1]
    interpreted = triton_interpreter_enabled()
    block_v = _row_block(n_cols)
    has_top_k, has_top_p = 0 < top_k < vocab_size, top_p < 1.0
    nucleus = has_top_p and not has_top_k
    # A search pass holds a (16, BLOCK_S) tile; the final kernel (search and draw for the rows that need them)
    # takes that block for its draw too. Larger blocks there make ptxas spill (2048 always, 1024 with the
    # checks' merge; tests/kernels/test_aot_compile.py): the search is only the rare fallback of top-p alone.
    block_s = min(block_v, (1 << 16) if interpreted else 512 if nucleus else 1024)
    # Splits depend on V only, never on the batch: a row's result (rounding included) is the same in any batch.
    n_blocks = triton.cdiv(n_cols, block_v)
    per_split = triton.cdiv(n_blocks, min(n_blocks, _MAX_SPLITS))
    n_splits = triton.cdiv(n_blocks, per_split)
    splits_p2 = triton.next_power_of_2(n_splits)
    n_checks = _CHECKS if nucleus else 0
    stats = empty_output((8, n_rows, n_splits), torch.float32, device)
    checks = empty_output((2, 4, n_rows, n_splits), torch.float32, device) if n_checks else stats
    states = empty_output((2, 4, n_rows), torch.float32, device) if n_checks else stats
    common = (n_cols, vocab_size, logits2d.stride(0), logits2d.stride(1), ids1d.stride(0), steps1d.stride(0))
    # seed | 2^32: always typed int64 (a bare 32-bit value is i32 or u32 by its top bit: two compilations); the
    # kernels keep its low 32 bits.
    draw_args = (seed | (1 << 32), float(temperature))
    with on_device_of(logits2d):
        _sample_stats_kernel[(n_rows, n_splits)](
            logits2d, ids1d, steps1d, stats, *common, per_split, stats.stride(0), *draw_args,
            BLOCK_V=block_v, DRAW=not has_top_k, FTZ=not interpreted, num_warps=8,
        )
        for i in range(n_checks):       # check i reads check i - 1's results and state, writes its own
            _sample_check_kernel[(n_rows, n_splits)](
                logits2d, ids1d, steps1d, stats, checks[(i + 1) % 2], states[(i + 1) % 2], states[i % 2], checks[i % 2],
                n_rows, *common, per_split, stats.stride(0), *draw_args, float(top_p),
                BLOCK_V=block_v, SPLITS=splits_p2, FIRST=i == 0, FTZ=not interpreted, num_warps=8,
            )
        last = (n_checks - 1) % 2
        _sample_final_kernel[(n_rows,)](
            logits2d, ids1d, steps1d, stats, checks[last] if n_checks else stats, states[last] if n_checks else stats,
            tokens, out[0], out[1], n_rows, n_splits, *common, stats.stride(0), *draw_args, top_k, float(top_p),
            BLOCK_V=block_s, BLOCK_S=block_s, SPLITS=splits_p2, NPROBE=_NPROBE, SEARCH_PASSES=_SEARCH_PASSES,
            HAS_CHECKS=n_checks > 0, HAS_TOP_K=has_top_k, HAS_TOP_P=has_top_p, num_warps=8,
        )
    return tokens, out[0], out[1]


def _sample_torch(logits2d, ids1d, steps1d, seed, temperature, top_k, top_p, vocab_size):
    """The same draw with torch ops on (B, V) temporaries, in place where it can (a sort for top-p)."""
    x = logits2d.float() / temperature                                                  # a new (B, V) tensor
    V = x.size(-1)
    if vocab_size < V:
        x[:, vocab_size:] = float("-inf")
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)                                          # a row with no finite logit
    e = torch.sub(x, m).exp_()                                                          # exp(x - m)
    s = e.sum(-1)
    log_s = torch.log(s)
    entropy = log_s - torch.special.xlogy(e, e).sum(-1) / s                             # log s - sum e (x - m) / s
    if 0 < top_k < vocab_size:
        below = x < torch.topk(x, top_k, dim=-1).values[:, -1:]                         # ties with the k-th kept
        e.masked_fill_(below, 0.0)                                                      # the top-k set's mass
        x.masked_fill_(below, float("-inf"))                                            # the drawn token's x stays
        del below
    if top_p < 1.0:
        ordered, order = torch.sort(x, dim=-1, descending=True)
        # Summed in float64: a float32 running sum over V terms drifts by up to V ulps of the mass.
        mass = torch.cumsum(e.gather(-1, order), -1, dtype=torch.float64)
        del order
        # A token is kept when the mass strictly before it is below top_p of the total: the first always.
        n_keep = (mass[:, :-1] < top_p * mass[:, -1:]).sum(-1, keepdim=True) + 1
        del mass
        x.masked_fill_(x < ordered.gather(-1, n_keep - 1), float("-inf"))              # ties at the threshold kept
        del ordered
    del e
    tokens = gumbel_noise(seed, ids1d, steps1d, V).add_(x).argmax(-1)                      # first of equal maxima
    no_mass = s == 0
    x_token = x.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = torch.where(no_mass, float("-inf"), x_token - m.squeeze(-1) - log_s)
    return tokens, logprobs, torch.where(no_mass, 0.0, entropy)


# ----------------------------------------------------------------------------
# 3. Public function
# ----------------------------------------------------------------------------

class Sample(NamedTuple):
    tokens: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    value = check_number(name, value, integer=True)
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value < high:
        raise ValueError(f"{name} must lie in [{low}, {high}), got {value}")
    return value


def sample(
    logits: torch.Tensor,
    *,
    seed: int,
    sample_ids: torch.Tensor,
    step: int | torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> Sample:
    """Draw one token per row from softmax(logits / temperature), top-k then top-p filtered, by counter-based
    Gumbel-max; return it with its logprob and entropy under the unfiltered distribution (module docstring).

    Args:
        logits: (..., V) float32, bfloat16 or float16; any strides. Math in float32.
        seed: int in [0, 2^32): the run's sampling seed.
        sample_ids: (...) integer: each row's sample id (its low 32 bits enter the noise). The draw of a row
            depends on (seed, its id, step, its logits) only, not on the other rows.
        step: int in [0, 2^31): the decode step (0 for the first response token); or each row's step, an
            integer tensor of sample_ids' shape on its device (rows at different steps: continuous batching),
            whose values are not checked (that would synchronise with the device): their low 32 bits enter the
            noise as an int step's do.
        temperature: > 0.
        top_k: >= 0; 0 = off. top_p: in (0, 1]; 1 = off.
        vocab_size: columns >= vocab_size are alignment padding, never drawn and outside the softmax.
            ``None`` = all V columns (V <= 2^24).
        backend: ``None`` (triton on CUDA, torch elsewhere; ``FASTPPO_BACKEND`` overrides), ``"triton"`` or
            ``"torch"``.

    Returns:
        ``Sample(tokens (...) int64, logprobs (...) float32, entropy (...) float32)``. No gradient.
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_dim=1)
    check_tensor("sample_ids", sample_ids, dtypes=INT_DTYPES)
    check_same_device("sample_ids", sample_ids, "logits", logits)
    check_shape("sample_ids", sample_ids, logits.shape[:-1], "the leading dimensions of logits")
    seed = _check_int("seed", seed, 0, 1 << 32)
    if isinstance(step, torch.Tensor):
        check_tensor("step", step, dtypes=INT_DTYPES)
        check_same_device("step", step, "logits", logits)
        check_shape("step", step, logits.shape[:-1], "the leading dimensions of logits")
    else:
        step = _check_int("step", step, 0, 1 << 31)
    temperature = check_positive("temperature", temperature)
    top_k = _check_int("top_k", top_k, 0)
    top_p = check_number("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    width = logits.shape[-1]
    if not 1 <= width <= _MAX_VOCAB:
        raise ValueError(f"logits must have a last (vocabulary) dimension in [1, 2^24], got {width}")
    vocab = check_vocab_size(vocab_size, width, "the last dimension of logits")
    backend = resolve_backend(backend, logits, "logits")

    logits2d = as_rows(logits.detach(), width)
    ids1d = sample_ids.reshape(-1)
    # One step for every row: a 1-element tensor read with stride 0 (a device fill, no synchronisation).
    steps1d = step.reshape(-1) if isinstance(step, torch.Tensor) else \
        torch.full((1,), step, dtype=torch.int64, device=logits.device).expand(ids1d.numel())
    run = _sample_triton if backend == "triton" else _sample_torch
    tokens, logprobs, entropy = run(logits2d, ids1d, steps1d, seed, float(temperature), min(top_k, vocab),
                                    float(top_p), vocab)
    lead = logits.shape[:-1]
    return Sample(tokens.view(lead), logprobs.view(lead), entropy.view(lead))
