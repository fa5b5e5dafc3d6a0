"""sample: one decode step's token draw, with its logprob and entropy, in fused passes over the logits.

What is drawn, per row (x = logits·(1/T) in float32, 1/T rounded to float32, over the first vocab_size columns):

1. top-k keeps every token whose x is >= the k-th largest x (ties at the
   threshold all kept; k = 0 or k >= vocab_size: all);
2. top-p keeps, among those, every token whose x is >= tau_p, the largest
   value such that the tokens at or above it hold >= top_p of the top-k set's
   probability: the smallest set of highest-probability tokens whose mass
   reaches top_p, with every token tied at the threshold kept (equivalently: a
   token is kept when the mass of the tokens strictly more likely than it is
   < top_p). top_p = 1: all;
3. a token is drawn from softmax(x) restricted to the kept set in three
   levels, each a Gumbel-max (Gumbel 1954; the trick as in Maddison et al.
   2014): the vocabulary is cut into chunks of CHUNK = 2048 tokens and each
   chunk into groups of GROUP = 64; the chunk is the argmax over chunks of
   ln(the chunk's kept mass) + G_c, the group the argmax over the chunk's
   groups of ln(the group's kept mass) + G_g, then the token the argmax over
   the group's kept tokens of x + g_i. The maximum of x_i + g_i over a set is
   itself Gumbel(ln of its mass) and its argmax is independent of it, so the
   levels draw exactly softmax(x) over the kept set, while only one group per
   row pays for per-token noise. g, G_g and G_c are standard Gumbel variables,
   pure functions of (seed, sample id, step, token id) and of (seed, sample
   id, step, stage, group or chunk id) (`gumbel_noise`; a chunk's counter is
   _CHUNK_SALT + stage·2^13 + chunk id, a group's _GROUP_SALT + stage·2^18 +
   token id // GROUP); equal keys and scores go to the smallest id.

Top-p alone is drawn by rejection, in stages: stage 0 draws from every token;
a check sums the mass strictly above the drawn token: below top_p of the
total, the token is kept (the kept set is an upper set in x) and is the draw;
otherwise stage i + 1 draws from the tokens above it (a superset of the kept
set) with stage i + 1's chunk and group noise. A draw from a superset,
accepted when it lands in the kept set, is a draw from the kept set, so every
stage's accepted token follows softmax over the nucleus. The per-token noise
may be shared across stages: within a group each stage's set is nested in the
previous one's and excludes its draw, so what the earlier draws reveal about a
subset's noise is a bound on its maximum, which is independent of its argmax:
the argmax over the subset is again softmax-distributed. After CHECKS = 4
rejections the kept set is found by the threshold search and drawn with stage
CHECKS's noise. With top-k, the thresholds are searched first and the draw is
stage 0.

Returned with it: the token's float32 logprob under softmax(x) over all
vocab_size columns, before top-k/top-p (the policy's distribution, which the
PPO ratio refers to), and that distribution's entropy. Columns >= vocab_size
(embedding rows padded on for alignment) are never drawn and carry no
probability. A row without a finite logit draws token 0, with logprob -inf and
entropy 0.

Memory traffic. The logits-processor path it replaces (temperature, top-k, a
full sort and two softmaxes for top-p, ~20 elementwise passes over (B, V) for
the Gumbel noise) moves ~230 bytes per logit (~9 GB per step at B=256,
V=151936). The kernel reads each logit once per pass and writes a few floats
per row and chunk: 1 pass without top-k/top-p (statistics and the chunk draw),
then one chunk of the row (its groups' mass, and one group's tokens); 2 for
most rows with top-p alone (the draw, then the check of the mass above it),
and a chunk per stage; with top-k 1 + 16 per filter + 1 (statistics, threshold
search, the chunks' kept mass; one more for the top-k set's mass when top-p
follows) and one chunk, the later passes re-reading the row from L2 when the
rows in flight fit. No sort and no (B, V) temporary: the thresholds are found
by a 4-way search on the float32 order key, which pins a 32-bit key range to
one key in 16 passes (4^16 = 2^32), so they are exact, not approximations of
the mass. A search pass costs a float compare against the probe's value and an
add per token and probe (and, summing mass, a select, with one exponential per
token), within the bandwidth's budget of instructions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES, INT_DTYPES, as_rows, check_number, check_positive, check_same_device, check_shape, check_tensor,
    check_vocab_size,
)
from ._dispatch import empty_output, on_device_of, resolve_backend, triton_interpreter_enabled
from ._math import LN2, LOG2E, fast_exp2, fast_log2, merge_lse2, online_lse2_mass_step, to_largest_reference

_M32 = 0xFFFFFFFF
_TOKEN_SALT = 0x85EBCA6B  # (the kernels write these three constants in place)
_STEP_SALT = 0x632BE5AB
_CHUNK_SALT = 0x10000000  # a chunk's counter: salt + stage·2^13 + chunk (< 2^16 above it: never a token's)
_MIX_A, _MIX_B = 0x7FEB352D, 0x5BD1E995  # mix32's multipliers
_CHUNK = 2048         # tokens per chunk of the draw: part of the definition, and the kernels' block
_GROUP = 64           # tokens per group of a chunk: part of the definition
_GROUP_SALT = 0x20000000  # a group's counter: salt + stage·2^18 + group (token // _GROUP < 2^18)
_SEARCH_PASSES = 16   # 4-way: 4^16 = 2^32, a 32-bit key range narrowed to one key
_SEARCH_BLOCK_INTERPRETED = 1 << 16   # the search's block under the interpreter (a chunk when compiled)
_PASS_WARPS = 4       # a pass over a row: 16 tokens a thread (half the per-block reductions' share of 8 warps)
_DRAW_WARPS = 1       # a program that only draws in one chunk: 64 tokens a thread, its noise and reductions paid once
_CHECKS = 4           # top-p alone: rejection stages checked before a row falls back to the search
_MAX_SPLITS = 8       # programs per row in the passes that read it (at most; fewer for short rows)
_MAX_VOCAB = 1 << 24  # token counts are summed in float32, exact up to 2^24; chunk ids stay below 2^13
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
    """`mix32` of an int64 tensor in place, with one scratch tensor."""
    t = x >> 16
    x ^= t
    x.mul_(_MIX_A).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=t)
    x ^= t
    x.mul_(_MIX_B).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 16, out=t)
    x ^= t
    return x


def _row_hashes(seed: int, sample_ids: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """(B,) int64: each row's counter half, mix(mix(mix(id) ^ seed) ^ mix(step + salt))."""
    sample_hash = mix32(mix32(sample_ids.reshape(-1).to(torch.int64) & _M32) ^ seed)
    if isinstance(step, torch.Tensor):
        step = (step.reshape(-1).to(device=sample_ids.device, dtype=torch.int64) + _STEP_SALT) & _M32
    else:
        step = step + _STEP_SALT
    return mix32(sample_hash ^ mix32(step))


def _gumbel_of(rows: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """float32 standard Gumbel noise of counters (B, n) or (n,) for rows (B,) (see `gumbel_noise`)."""
    bits = _mix32_(rows[:, None] ^ mix32(counters)).bitwise_right_shift_(8)              # 24 random bits
    u = bits.to(torch.float32).add_(0.5).mul_(1.0 / (1 << 24)).clamp_(max=_U_MAX)
    del bits
    return u.log_().neg_().log_().neg_()


def gumbel_noise(seed: int, sample_ids: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 standard Gumbel noise of the tokens, a pure function of (seed, sample id, step, token
    id); `step` an int or each row's, (B,) integer (its low 32 bits enter the counter).

    24 random bits per (row, token): u = (bits + 0.5) / 2^24 in float32, g = -log(-log u). u is clamped to
    1 - 2^-24, the largest float32 below 1: (2^24 - 1) + 0.5 rounds to 2^24 in float32, and u = 1 would give
    g = +inf.
    """
    tokens = torch.arange(vocab, device=sample_ids.device, dtype=torch.int64) + _TOKEN_SALT
    return _gumbel_of(_row_hashes(seed, sample_ids, step), tokens & _M32)


# ----------------------------------------------------------------------------
# 1. Kernels
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
def _exponential(row_hash, counter):
    """E = -ln(u), standard exponential, of uint32 counters for the row whose counter half is row_hash: the
    Gumbel noise is -ln(E) (`_gumbel_of`).

    tl.log of float32 compiles to libdevice's logf (1 ulp; checked in the PTX for sm_90), not lg2.approx, whose
    absolute error near 1 would make -log(u) 0 or negative for u within a few ulps of 1."""
    bits = _mix32(row_hash ^ _mix32(counter)) >> 8
    u = tl.minimum((bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994)   # 1 - 2^-24, as in _gumbel_of
    return -tl.log(u)


@triton.jit
def _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed):
    """The counter half of a row's noise (`_row_hashes`); the row's step at steps_ptr + row·stride_step
    (stride 0: one step for every row)."""
    sample_id = tl.load(ids_ptr + row * stride_id).to(tl.uint32)
    step_hash = _mix32(tl.load(steps_ptr + row * stride_step).to(tl.uint32) + 0x632BE5AB)
    return _mix32(_mix32(_mix32(sample_id) ^ seed.to(tl.uint32)) ^ step_hash)


@triton.jit
def _log2_mass(mass, FAST: tl.constexpr = False):
    """log2 of a non-negative sum, -inf for 0 (the interpreter's numpy warns on log2(0)); FAST: `fast_log2`."""
    return tl.where(mass > 0.0, fast_log2(tl.maximum(mass, 1e-30), FAST), float("-inf"))


@triton.jit
def _best_chunk(chunk_lse2, first, row_hash, stage, CH: tl.constexpr):
    """(key, chunk) of the best of chunks first + [0, CH): lane j holds chunk first + j's base-2 log-mass
    (-inf: no kept mass, or past the split). key = log2 mass + G·log2 e; equal keys: the smallest chunk."""
    ids = first + tl.arange(0, CH)
    key = chunk_lse2 - tl.log(_exponential(row_hash, (ids + stage * 8192 + 0x10000000).to(tl.uint32))) * LOG2E
    best = tl.max(key, axis=0)
    return best, tl.min(tl.where(key == best, ids, 2147483647), axis=0)


@triton.jit
def _merge_chunks(part_ptr, stride_f, offs, valid):
    """(key, chunk) of the best of per-split chunk draws stored as fields 0 and 1 (chunk as float32)."""
    key = tl.load(part_ptr + offs, mask=valid, other=float("-inf"))
    chunk = tl.load(part_ptr + stride_f + offs, mask=valid, other=0.0).to(tl.int32)
    best = tl.max(key, axis=0)
    return best, tl.min(tl.where(valid & (key == best), chunk, 2147483647), axis=0)


@triton.jit
def _kept_terms(raw, k2, inv_t, ref, lo_x, KEEP_ALL: tl.constexpr, FTZ: tl.constexpr):
    """2^(raw·k2 - ref) of the tokens whose x = raw·inv_t is >= lo_x, else 0 (KEEP_ALL: of every token)."""
    e = fast_exp2(raw * k2 - ref, FTZ)
    if not KEEP_ALL:
        if FTZ:
            e = tl.inline_asm_elementwise("{ .reg .pred p; setp.ge.f32 p, $1, $2; selp.f32 $0, $3, 0f00000000, p; }",
                                          "=f,f,f,f", [raw * inv_t, lo_x, e], dtype=tl.float32, is_pure=True, pack=1)
        else:
            e = tl.where(raw * inv_t >= lo_x, e, 0.0)
    return e


@triton.jit
def _draw_in_chunk(row_ptr, chunk, n_valid, stride_lv, inv_t, r_ref, row_hash, lo, stage, BLOCK_V: tl.constexpr,
                   GROUP: tl.constexpr, VEC: tl.constexpr, KEEP_ALL: tl.constexpr, FTZ: tl.constexpr):
    """(x, token) of the draw in a chunk among its tokens whose order key is >= lo (`_order_key`; KEEP_ALL:
    every token, lo unused): the group of GROUP tokens by ln(its kept mass) + its noise of this stage, then the
    argmax of x + g over the group's kept tokens (equal keys or scores: the smallest id).

    The chunk is read as a (GROUP/VEC, groups, VEC) tensor (token g·GROUP + a·VEC + b at [a, g, b]), VEC the
    tokens one vector load holds (1 where a compiled load cannot be a vector): a thread's loads then fall in
    one group, the group masses are sums within threads, and a thread computes one group's noise instead of
    the noise of every group its loads touch. The loads carry no mask: a group that the row's end cuts or that
    lies past it reads instead the GROUP tokens that end with the chunk's last, their start rounded down to a
    vector (inside the row: in the chunk before when this one holds fewer), and its mass is replaced: 0 past
    the end, and for the cut group a masked read of its own tokens (a vocabulary of one group is that masked
    read alone). A filtered draw takes the masses 2^(y - r_ref) of the pass that chose the chunk (the same
    terms: a chunk chosen for its kept mass has a group with mass); KEEP_ALL, whose chunk the statistics chose
    relative to their split's running reference, takes them relative to the chunk's largest x, so that they
    never all underflow. Per-token noise for one group, re-read from cache."""
    NG: tl.constexpr = BLOCK_V // GROUP
    chunk_ptr = row_ptr + chunk.to(tl.int64) * BLOCK_V * stride_lv
    n_rem = tl.minimum(n_valid - chunk * BLOCK_V, BLOCK_V)                   # the chunk's tokens
    ids = tl.arange(0, NG)
    if VEC == 1 and GROUP > 1:    # no vectors: the lanes swapped in pairs, whose contiguity would lay threads
        in_group = tl.arange(0, GROUP)[:, None, None] ^ 1                                           # along a group
    else:
        in_group = tl.arange(0, GROUP // VEC)[:, None, None] * VEC + tl.arange(0, VEC)[None, None, :]
    full = (ids + 1) * GROUP <= n_rem
    if NG == 1:
        raw = tl.load(chunk_ptr + in_group * stride_lv, mask=in_group < n_rem, other=float("-inf")).to(tl.float32)
        top = tl.max(tl.max(tl.max(raw, axis=2), axis=0), axis=0)
    else:
        start = tl.multiple_of(tl.where(full, ids * GROUP, (n_rem - GROUP) & -VEC), [VEC])
        raw = tl.load((chunk_ptr + start[None, :, None] * stride_lv) + in_group * stride_lv).to(tl.float32)
        cut = n_rem // GROUP                                                # NG in a full chunk: nothing read
        raw_cut = _raw_block(chunk_ptr, cut * GROUP, n_rem, stride_lv, GROUP, True)
        top = tl.maximum(tl.max(tl.where(full, tl.max(tl.max(raw, axis=2), axis=0), float("-inf")), axis=0),
                         tl.max(raw_cut, axis=0))
    k2 = inv_t * LOG2E
    lo_x = _key_value(lo)
    ref = r_ref
    if KEEP_ALL:
        ref = tl.where(top == float("-inf"), 0.0, top * k2)                 # (a row without mass)
    group_mass = tl.sum(tl.sum(_kept_terms(raw, k2, inv_t, ref, lo_x, KEEP_ALL, FTZ), axis=2), axis=0)
    if NG > 1:
        cut_mass = tl.sum(_kept_terms(raw_cut, k2, inv_t, ref, lo_x, KEEP_ALL, FTZ), axis=0)
        group_mass = tl.where(full, group_mass, tl.where(ids == cut, cut_mass, 0.0))
    groups = chunk * NG + ids
    e_group = _exponential(row_hash, (groups + stage * 262144 + 0x20000000).to(tl.uint32))
    key = _log2_mass(group_mass, FTZ) - fast_log2(e_group, FTZ)                 # log2 mass + G·log2 e
    best = tl.max(key, axis=0)
    group = tl.min(tl.where(key == best, groups, 2147483647), axis=0)
    offs = group.to(tl.int64) * GROUP + tl.arange(0, GROUP)
    xg = _raw_block(row_ptr, group.to(tl.int64) * GROUP, n_valid, stride_lv, GROUP, True) * inv_t
    score = xg - fast_log2(_exponential(row_hash, offs.to(tl.uint32) + 0x85EBCA6B), FTZ) * LN2
    if not KEEP_ALL:
        score = tl.where(xg >= lo_x, score, float("-inf"))
    best = tl.max(score, axis=0)
    token = tl.min(tl.where(score == best, offs, 2147483647), axis=0)
    return tl.load(row_ptr + token * stride_lv).to(tl.float32) * inv_t, token.to(tl.int32)


@triton.jit
def _order_key(x):
    """int64 key whose order is the order of float32 x (-0.0 and +0.0 get the same key)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, key).to(tl.int64)


@triton.jit
def _raw_block(row_ptr, start, n_valid, stride_lv, BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    """float32 raw logits of columns start + [0, BLOCK_V) (the block's offset in 64 bits, its lanes' in 32);
    MASKED: -inf at and past n_valid (padding and past the row: the row's last, partial block)."""
    lanes = tl.arange(0, BLOCK_V)
    ptrs = row_ptr + tl.cast(start, tl.int64) * stride_lv + lanes * stride_lv
    if MASKED:
        raw = tl.load(ptrs, mask=lanes < n_valid - start, other=float("-inf"))
    else:
        raw = tl.load(ptrs)
    return raw.to(tl.float32)


@triton.jit
def _key_value(key):
    """The float32 whose `_order_key` is key, for keys from key(-inf) to key(+inf) (the key -1, which no float
    has, gives -0.0: x >= it exactly when key(x) >= 0): x >= _key_value(k) is key(x) >= k for every non-NaN x."""
    bits = key.to(tl.int32)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)


@triton.jit
def _search_block(a1, a2, a3, raw, inv_t, k2, r_ref, p1, p2, p3, BY_COUNT: tl.constexpr, FTZ: tl.constexpr):
    """Add a block's tokens whose x is >= each probe to per-lane sums: a count (in float32: exact below 2^24,
    which bounds the vocabulary), or the mass 2^(raw·k2 - r_ref)."""
    x = raw * inv_t
    if BY_COUNT:
        a1 += (x >= p1).to(tl.float32)
        a2 += (x >= p2).to(tl.float32)
        a3 += (x >= p3).to(tl.float32)
    else:
        e = fast_exp2(raw * k2 - r_ref, FTZ)
        a1 += tl.where(x >= p1, e, 0.0)
        a2 += tl.where(x >= p2, e, 0.0)
        a3 += tl.where(x >= p3, e, 0.0)
    return a1, a2, a3


@triton.jit
def _search_pass(row_ptr, n_valid, stride_lv, inv_t, k2, r_ref, lo, hi, target,
                 BY_COUNT: tl.constexpr, BLOCK_S: tl.constexpr, FTZ: tl.constexpr):
    """One pass of a 4-way search for the largest key v with F(v) >= target, known to lie in [lo, hi): the
    probes lo + (hi - lo)·j / 4 cut the range into 4 parts, and one read of the row keeps the part that holds
    v. Returns the narrowed [lo, hi).

    F(v) is the number (BY_COUNT) or the mass sum 2^(raw·k2 - r_ref) of the tokens whose key is >= v; F(lo)
    >= target holds on entry. Per-lane sums, reduced once per pass; blocks of BLOCK_S, the last alone masked
    (its padding is -inf: no mass, and below every probe but one at key(-inf), which can only be lo, whose
    verdict is known). F is a sum of non-negative terms in a fixed order, so its float value is monotone in v
    and the verdicts are consistent. The probes compare x as floats (`_key_value`).
    """
    q1 = lo + (hi - lo) // 4
    q2 = lo + (hi - lo) // 2
    q3 = lo + (hi - lo) * 3 // 4
    p1 = _key_value(q1)
    p2 = _key_value(q2)
    p3 = _key_value(q3)
    a1 = tl.zeros([BLOCK_S], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_S], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_S], dtype=tl.float32)
    n_left = tl.where(hi - lo > 1, n_valid, 0)                         # a range of one key: nothing to read
    n_full = n_left // BLOCK_S
    for block in range(0, n_full):
        raw = _raw_block(row_ptr, block * BLOCK_S, n_valid, stride_lv, BLOCK_S, False)
        a1, a2, a3 = _search_block(a1, a2, a3, raw, inv_t, k2, r_ref, p1, p2, p3, BY_COUNT, FTZ)
    if n_full * BLOCK_S < n_left:
        raw = _raw_block(row_ptr, n_full * BLOCK_S, n_valid, stride_lv, BLOCK_S, True)
        a1, a2, a3 = _search_block(a1, a2, a3, raw, inv_t, k2, r_ref, p1, p2, p3, BY_COUNT, FTZ)
    f1 = tl.sum(a1, axis=0)
    f2 = tl.sum(a2, axis=0)
    f3 = tl.sum(a3, axis=0)
    # F does not increase with v: the last probe whose F reaches the target starts the part that holds v (a
    # probe equal to lo, in a range under 4 keys wide, holds by the invariant).
    new_lo = tl.where(f3 >= target, q3, tl.where(f2 >= target, q2, tl.where(f1 >= target, q1, lo)))
    new_hi = tl.where(f3 >= target, hi, tl.where(f2 >= target, q3, tl.where(f1 >= target, q2, q1)))
    return new_lo, tl.where(hi - lo > 1, tl.maximum(new_hi, new_lo + 1), hi)


@triton.jit
def _kept_chunks(row_ptr, n_valid, stride_lv, inv_t, k2, r_ref, lo_x, BLOCK_V: tl.constexpr, CH: tl.constexpr,
                 FTZ: tl.constexpr):
    """((CH,), total): lane c holds the base-2 log-mass (r_ref + log2 of the sum of 2^(raw·k2 - r_ref)) of
    chunk c's tokens whose x is >= lo_x (-inf: none, or past the row); total is the sum of those masses
    (relative to r_ref). One read of the row, a block per chunk, the last alone masked."""
    lanes = tl.arange(0, CH)
    chunk_lse2 = tl.full([CH], float("-inf"), tl.float32)
    total = tl.cast(0.0, tl.float32)
    n_full = n_valid // BLOCK_V
    for c in range(0, n_full):
        raw = _raw_block(row_ptr, c * BLOCK_V, n_valid, stride_lv, BLOCK_V, False)
        mass = tl.sum(tl.where(raw * inv_t >= lo_x, fast_exp2(raw * k2 - r_ref, FTZ), 0.0), axis=0)
        chunk_lse2 = tl.where(lanes == c, r_ref + _log2_mass(mass), chunk_lse2)
        total += mass
    if n_full * BLOCK_V < n_valid:
        raw = _raw_block(row_ptr, n_full * BLOCK_V, n_valid, stride_lv, BLOCK_V, True)
        mass = tl.sum(tl.where(raw * inv_t >= lo_x, fast_exp2(raw * k2 - r_ref, FTZ), 0.0), axis=0)
        chunk_lse2 = tl.where(lanes == n_full, r_ref + _log2_mass(mass), chunk_lse2)
        total += mass
    return chunk_lse2, total


@triton.jit
def _split_fields(stats_ptr, row, n_splits, stride_f, SPLITS: tl.constexpr):
    """A row's per-split statistics (fields m, r, s, t, then the chunk draw): m merged, then r, s and t per split
    (r -inf, s and t 0 past n_splits)."""
    offs = row * n_splits + tl.arange(0, SPLITS)
    valid = tl.arange(0, SPLITS) < n_splits
    m = tl.max(tl.load(stats_ptr + offs, mask=valid, other=float("-inf")), axis=0)
    r = tl.load(stats_ptr + stride_f + offs, mask=valid, other=float("-inf"))
    s = tl.load(stats_ptr + 2 * stride_f + offs, mask=valid, other=0.0)
    t = tl.load(stats_ptr + 3 * stride_f + offs, mask=valid, other=0.0)
    return m, r, s, t


@triton.jit
def _merge_stats(stats_ptr, row, n_splits, stride_f, SPLITS: tl.constexpr):
    """Merge a row's per-split statistics: exact up to rounding.

    Each split holds s_i = sum 2^(y - r_i), t_i = sum 2^(y - r_i)(y - r_i) (y = x·log2 e) for its own reference
    r_i (`_math.merge_lse2`). Returns (m, R, log2 S, entropy)."""
    m, r, s, t = _split_fields(stats_ptr, row, n_splits, stride_f, SPLITS)
    r_ref, log2_s, entropy = merge_lse2(r, s, t, 0)
    return m, r_ref, log2_s, entropy


@triton.jit
def _merge_mass(stats_ptr, row, n_splits, stride_f, SPLITS: tl.constexpr):
    """(m, R, S) of `_merge_stats` without logarithms: S the row's mass relative to R (0 for a row without
    mass, whose R is 0)."""
    m, r, s, _ = _split_fields(stats_ptr, row, n_splits, stride_f, SPLITS)
    big_r, _, s = to_largest_reference(r, s, 0)
    return m, tl.where(big_r == float("-inf"), 0.0, big_r), tl.sum(s, axis=0)


@triton.jit(do_not_specialize=["seed"])
def _sample_stats_kernel(
    logits_ptr, ids_ptr, steps_ptr, stats_ptr,
    n_valid, stride_lm, stride_lv, stride_id, stride_step, blocks_per_split, stride_f,
    seed, inv_temperature,
    BLOCK_V: tl.constexpr, CH: tl.constexpr, DRAW: tl.constexpr, FTZ: tl.constexpr,
):
    """Grid (rows, splits): pass 1 over one split of a row (blocks of one chunk), its statistics written for
    `_merge_stats` and, with DRAW, its best chunk of stage 0 over every token.

    Two reductions per block, its max and its mass (_math.online_lse2_mass_step); the mass is the chunk's.
    The blocks inside [0, n_valid) are loaded without a mask; the row's last, partial block alone is masked.
    The split's chunks get their noise once, after the loop, a lane each (`_best_chunk`). m = max(raw)·(1/T) is
    max(x): rounding is monotone."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    inv_t = tl.cast(inv_temperature, tl.float32)
    k2 = inv_t * LOG2E
    row_ptr = logits_ptr + row * stride_lm
    chunk_lanes = tl.arange(0, CH)
    raw_max = tl.cast(float("-inf"), tl.float32)
    r = tl.cast(float("-inf"), tl.float32)
    s = tl.cast(0.0, tl.float32)
    c = tl.cast(0.0, tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    chunk_lse2 = tl.full([CH], float("-inf"), tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n_valid, BLOCK_V))
    n_full = n_valid // BLOCK_V
    for block in range(first, tl.minimum(last, n_full)):
        raw = _raw_block(row_ptr, block * BLOCK_V, n_valid, stride_lv, BLOCK_V, False)
        r, s, c, t, mass, block_max = online_lse2_mass_step(r, s, c, t, raw, k2, FTZ)
        raw_max = tl.maximum(raw_max, block_max)
        if DRAW:
            chunk_lse2 = tl.where(chunk_lanes == block - first, r + _log2_mass(mass), chunk_lse2)
    if n_full < last:                                              # the split holds the partial last block
        raw = _raw_block(row_ptr, n_full * BLOCK_V, n_valid, stride_lv, BLOCK_V, True)
        r, s, c, t, mass, block_max = online_lse2_mass_step(r, s, c, t, raw, k2, FTZ)
        raw_max = tl.maximum(raw_max, block_max)
        if DRAW:
            chunk_lse2 = tl.where(chunk_lanes == n_full - first, r + _log2_mass(mass), chunk_lse2)
    out = stats_ptr + row * tl.num_programs(1) + split
    tl.store(out, raw_max * inv_t)
    tl.store(out + stride_f, r)
    tl.store(out + 2 * stride_f, s)
    tl.store(out + 3 * stride_f, tl.sum(t, axis=0) + c)
    if DRAW:
        row_hash = _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed)
        key, chunk = _best_chunk(chunk_lse2, first, row_hash, 0, CH)
        tl.store(out + 4 * stride_f, key)
        tl.store(out + 5 * stride_f, chunk.to(tl.float32))


@triton.jit(do_not_specialize=["seed", "stage"])
def _sample_pick_kernel(
    logits_ptr, ids_ptr, steps_ptr, stats_ptr, check_ptr, state_in_ptr, state_out_ptr,
    n_rows, n_splits, n_valid, stride_lm, stride_lv, stride_id, stride_step, stride_f,
    seed, inv_temperature, top_p, stage,
    BLOCK_V: tl.constexpr, GROUP: tl.constexpr, VEC: tl.constexpr, SPLITS: tl.constexpr, FIRST: tl.constexpr,
    FTZ: tl.constexpr,
):
    """One program per row, top-p alone: the next candidate of the rejection stages (module docstring).

    FIRST: stage 0's draw (the chunk from the statistics, then the token in it). Otherwise the previous
    candidate (state_in: x, token, resolved) and the check of it (check_ptr: per split the mass strictly above
    it, then the best chunk above it): a mass below top_p·S keeps it (resolved); else the next candidate is
    drawn in the chosen chunk among the tokens above it. Writes state_out."""
    row = tl.program_id(0).to(tl.int64)
    offs = row * n_splits + tl.arange(0, SPLITS)
    valid = tl.arange(0, SPLITS) < n_splits
    m, r_ref, total = _merge_mass(stats_ptr, row, n_splits, stride_f, SPLITS)
    if FIRST:
        x_c = tl.cast(float("-inf"), tl.float32)
        token = tl.cast(0, tl.int32)
        resolved = m == float("-inf")
        _, chunk = _merge_chunks(stats_ptr + 4 * stride_f, stride_f, offs, valid)
    else:
        x_c = tl.load(state_in_ptr + row)
        token = tl.load(state_in_ptr + n_rows + row).to(tl.int32)
        mass = tl.sum(tl.load(check_ptr + offs, mask=valid, other=0.0), axis=0)
        resolved = (tl.load(state_in_ptr + 2 * n_rows + row) != 0.0) | (mass < top_p * total)
        _, chunk = _merge_chunks(check_ptr + stride_f, stride_f, offs, valid)
    if not resolved:                                               # the tokens strictly above x_c
        row_hash = _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed)
        x_c, token = _draw_in_chunk(logits_ptr + row * stride_lm, chunk, n_valid, stride_lv,
                                    tl.cast(inv_temperature, tl.float32), r_ref, row_hash, _order_key(x_c) + 1, stage,
                                    BLOCK_V, GROUP, VEC, FIRST, FTZ)
    tl.store(state_out_ptr + row, x_c)
    tl.store(state_out_ptr + n_rows + row, token.to(tl.float32))
    tl.store(state_out_ptr + 2 * n_rows + row, resolved.to(tl.float32))


@triton.jit(do_not_specialize=["seed", "stage"])
def _sample_check_kernel(
    logits_ptr, ids_ptr, steps_ptr, stats_ptr, state_ptr, check_ptr,
    n_rows, n_valid, stride_lm, stride_lv, stride_id, stride_step, blocks_per_split, stride_f,
    seed, inv_temperature, stage,
    BLOCK_V: tl.constexpr, CH: tl.constexpr, SPLITS: tl.constexpr, DRAW: tl.constexpr, FTZ: tl.constexpr,
):
    """Grid (rows, splits): the check of a row's top-p candidate over one split (`_sample_pick_kernel`).

    An unresolved row sums the mass strictly above the candidate's x per block (a chunk's mass above it) and,
    with DRAW, picks the split's best chunk of the next stage among them; resolved rows read nothing."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    _, r_ref, _, _ = _merge_stats(stats_ptr, row, n_splits, stride_f, SPLITS)
    x_c = tl.load(state_ptr + row)
    resolved = tl.load(state_ptr + 2 * n_rows + row) != 0.0
    inv_t = tl.cast(inv_temperature, tl.float32)
    k2 = inv_t * LOG2E
    row_ptr = logits_ptr + row * stride_lm
    chunk_lanes = tl.arange(0, CH)
    mass = tl.cast(0.0, tl.float32)
    chunk_lse2 = tl.full([CH], float("-inf"), tl.float32)
    first = split * blocks_per_split
    last = tl.where(resolved, first, tl.minimum(first + blocks_per_split, tl.cdiv(n_valid, BLOCK_V)))
    n_full = n_valid // BLOCK_V
    for block in range(first, tl.minimum(last, n_full)):
        raw = _raw_block(row_ptr, block * BLOCK_V, n_valid, stride_lv, BLOCK_V, False)
        block_mass = tl.sum(tl.where(raw * inv_t > x_c, fast_exp2(raw * k2 - r_ref, FTZ), 0.0), axis=0)
        mass += block_mass
        if DRAW:
            chunk_lse2 = tl.where(chunk_lanes == block - first, r_ref + _log2_mass(block_mass), chunk_lse2)
    if n_full < last:
        raw = _raw_block(row_ptr, n_full * BLOCK_V, n_valid, stride_lv, BLOCK_V, True)
        block_mass = tl.sum(tl.where(raw * inv_t > x_c, fast_exp2(raw * k2 - r_ref, FTZ), 0.0), axis=0)
        mass += block_mass
        if DRAW:
            chunk_lse2 = tl.where(chunk_lanes == n_full - first, r_ref + _log2_mass(block_mass), chunk_lse2)
    out = check_ptr + row * n_splits + split
    tl.store(out, mass)
    if DRAW:
        row_hash = _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed)
        key, chunk = _best_chunk(chunk_lse2, first, row_hash, stage, CH)
        tl.store(out + stride_f, key)
        tl.store(out + 2 * stride_f, chunk.to(tl.float32))


@triton.jit(do_not_specialize=["seed", "top_k"])
def _sample_final_kernel(
    logits_ptr, ids_ptr, steps_ptr, stats_ptr, check_ptr, state_ptr, tokens_ptr, logprobs_ptr, entropy_ptr,
    n_rows, n_splits, n_valid, stride_lm, stride_lv, stride_id, stride_step, stride_f,
    seed, inv_temperature, top_k, top_p, stage,
    BLOCK_V: tl.constexpr, GROUP: tl.constexpr, VEC: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
    CH: tl.constexpr,
    SEARCH_PASSES: tl.constexpr, HAS_CHECKS: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
    FTZ: tl.constexpr,
):
    """One program per row: the merged statistics, the filters' outcome, the draw, and the outputs.

    Rows are split across programs for the passes that read them; the merges are exact up to rounding
    (log-sum-exp rescaled to the largest reference; chunk draws: largest key, smallest chunk).

    No filter: the token in stats' chunk. Top-p alone: the last candidate, kept when the last check's mass
    above it is below top_p·S. With top-k, or for a row the checks left unresolved: SEARCH_PASSES search
    passes per filter for its threshold key (blocks of BLOCK_S: a chunk when compiled), then the draw over
    the tokens at or above it (`stage`): a pass for the chunks' kept mass, their noise once after it
    (`_best_chunk`), and the group and token in the chosen chunk. Top-p after top-k takes top_p of the
    top-k set's mass, summed by one more pass of the same kind.
    """
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.cast(inv_temperature, tl.float32)
    row_ptr = logits_ptr + row * stride_lm
    offs_s = row * n_splits + tl.arange(0, SPLITS)
    valid_s = tl.arange(0, SPLITS) < n_splits
    FILTERED: tl.constexpr = HAS_TOP_K or HAS_TOP_P
    NUCLEUS: tl.constexpr = HAS_TOP_P and not HAS_TOP_K
    m, r_ref, log2_s, entropy = _merge_stats(stats_ptr, row, n_splits, stride_f, SPLITS)
    no_mass = m == float("-inf")
    lse = (r_ref + log2_s) * LN2
    row_hash = _row_hash(ids_ptr, steps_ptr, row, stride_id, stride_step, seed)

    if not FILTERED:
        _, chunk = _merge_chunks(stats_ptr + 4 * stride_f, stride_f, offs_s, valid_s)
        top_x, top_tok = _draw_in_chunk(row_ptr, chunk, n_valid, stride_lv, inv_t, r_ref, row_hash, _order_key(m), 0,
                                        BLOCK_V, GROUP, VEC, True, FTZ)      # lo: unused (every token kept)
    else:
        top_x = tl.cast(float("-inf"), tl.float32)
        top_tok = tl.cast(0, tl.int32)
        resolved = no_mass
        if NUCLEUS and HAS_CHECKS:
            top_x = tl.load(state_ptr + row)
            top_tok = tl.load(state_ptr + n_rows + row).to(tl.int32)
            mass = tl.sum(tl.load(check_ptr + offs_s, mask=valid_s, other=0.0), axis=0)
            resolved = (tl.load(state_ptr + 2 * n_rows + row) != 0.0) | (mass < top_p * tl.exp2(log2_s))
        if not resolved:
            k2 = inv_t * LOG2E
            lo = _order_key(tl.cast(float("-inf"), tl.float32))        # everything kept
            kept_mass = tl.exp2(log2_s)                                 # sum 2^(y - r_ref) over the kept tokens
            if HAS_TOP_K:
                hi = _order_key(m) + 1
                for _ in range(SEARCH_PASSES):
                    lo, hi = _search_pass(row_ptr, n_valid, stride_lv, inv_t, k2, r_ref, lo, hi,
                                          tl.cast(top_k, tl.float32), True, BLOCK_S, FTZ)
                if HAS_TOP_P:                                           # the top-k set's mass
                    _, kept_mass = _kept_chunks(row_ptr, n_valid, stride_lv, inv_t, k2, r_ref, _key_value(lo),
                                                BLOCK_V, CH, FTZ)
            if HAS_TOP_P:
                hi = _order_key(m) + 1
                target = top_p * kept_mass
                for _ in range(SEARCH_PASSES):
                    lo, hi = _search_pass(row_ptr, n_valid, stride_lv, inv_t, k2, r_ref, lo, hi, target,
                                          False, BLOCK_S, FTZ)
            # The kept set is the tokens whose key is >= lo: the chunk by its kept mass, then the token.
            chunk_lse2, _ = _kept_chunks(row_ptr, n_valid, stride_lv, inv_t, k2, r_ref, _key_value(lo), BLOCK_V,
                                         CH, FTZ)
            _, chunk = _best_chunk(chunk_lse2, 0, row_hash, stage, CH)
            top_x, top_tok = _draw_in_chunk(row_ptr, chunk, n_valid, stride_lv, inv_t, r_ref, row_hash, lo, stage,
                                            BLOCK_V, GROUP, VEC, False, FTZ)

    tl.store(tokens_ptr + row, top_tok.to(tl.int64))
    tl.store(logprobs_ptr + row, tl.where(no_mass, float("-inf"), top_x - lse))
    tl.store(entropy_ptr + row, tl.where(no_mass, 0.0, entropy))


# ----------------------------------------------------------------------------
# 2. Backends: the launcher and the torch twin
# ----------------------------------------------------------------------------

def _vector_width(logits2d: torch.Tensor) -> int:
    """Tokens per 16-byte load where a compiled kernel's loads of a row can be vectors (the data pointer and the
    row stride divisible by 16, as Triton specialises them; contiguous columns), else 1."""
    aligned = logits2d.data_ptr() % 16 == 0 and logits2d.stride(0) % 16 == 0 and logits2d.stride(1) == 1
    return 16 // logits2d.element_size() if aligned else 1


def _sample_triton(logits2d, ids1d, steps1d, seed, inv_t, top_k, top_p, vocab_size):
    n_rows = logits2d.size(0)
    device = logits2d.device
    tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    out = empty_output((2, n_rows), torch.float32, device)
    if n_rows == 0:
        return tokens, out[0], out[1]
    interpreted = triton_interpreter_enabled()
    # A block is a chunk (one chunk, a smaller block, for a vocabulary shorter than one).
    block_v = _CHUNK if vocab_size > _CHUNK else triton.next_power_of_2(vocab_size)
    group = min(_GROUP, block_v)          # a block under one group (V < _GROUP) is that group: ids agree
    vec = min(_vector_width(logits2d), group)
    has_top_k, has_top_p = 0 < top_k < vocab_size, top_p < 1.0
    nucleus = has_top_p and not has_top_k
    # The search passes read blocks of a chunk (the interpreter, whole rows: it costs ~1 ms per program and loop
    # trip whatever the size).
    block_s = min(triton.next_power_of_2(vocab_size), _SEARCH_BLOCK_INTERPRETED) if interpreted else block_v
    # Splits depend on V only, never on the batch: a row's result (rounding included) is the same in any batch.
    n_blocks = triton.cdiv(vocab_size, block_v)
    per_split = triton.cdiv(n_blocks, min(n_blocks, _MAX_SPLITS))
    n_splits = triton.cdiv(n_blocks, per_split)
    splits_p2, chunks_p2 = triton.next_power_of_2(n_splits), triton.next_power_of_2(per_split)
    n_checks = _CHECKS if nucleus else 0
    stats = empty_output((6, n_rows, n_splits), torch.float32, device)
    checks = empty_output((2, 3, n_rows, n_splits), torch.float32, device) if n_checks else stats
    states = empty_output((2, 3, n_rows), torch.float32, device) if n_checks else stats
    common = (vocab_size, logits2d.stride(0), logits2d.stride(1), ids1d.stride(0), steps1d.stride(0))
    # seed | 2^32: always typed int64 (a bare 32-bit value is i32 or u32 by its top bit: two compilations); the
    # kernels keep its low 32 bits.
    draw_args = (seed | (1 << 32), inv_t)
    ftz = not interpreted
    with on_device_of(logits2d):
        _sample_stats_kernel[(n_rows, n_splits)](
            logits2d, ids1d, steps1d, stats, *common, per_split, stats.stride(0), *draw_args,
            BLOCK_V=block_v, CH=chunks_p2, DRAW=not (has_top_k or nucleus and not n_checks), FTZ=ftz,
            num_warps=_PASS_WARPS,
        )
        pick = dict(BLOCK_V=block_v, GROUP=group, VEC=vec, SPLITS=splits_p2, FTZ=ftz, num_warps=_DRAW_WARPS)
        if n_checks:                    # stage 0's candidate, then check i (stage i's chunks) and its pick
            _sample_pick_kernel[(n_rows,)](logits2d, ids1d, steps1d, stats, stats, states[1], states[0], n_rows,
                                           n_splits, *common, stats.stride(0), *draw_args, top_p, 0, FIRST=True, **pick)
        for stage in range(1, n_checks + 1):
            state, check = states[(stage - 1) % 2], checks[stage % 2]
            _sample_check_kernel[(n_rows, n_splits)](
                logits2d, ids1d, steps1d, stats, state, check, n_rows, *common, per_split, stats.stride(0),
                *draw_args, stage, BLOCK_V=block_v, CH=chunks_p2, SPLITS=splits_p2, DRAW=stage < n_checks, FTZ=ftz,
                num_warps=_PASS_WARPS,
            )
            if stage < n_checks:
                _sample_pick_kernel[(n_rows,)](logits2d, ids1d, steps1d, stats, check, state, states[stage % 2],
                                               n_rows, n_splits, *common, stats.stride(0), *draw_args, top_p,
                                               stage, FIRST=False, **pick)
        _sample_final_kernel[(n_rows,)](
            logits2d, ids1d, steps1d, stats, checks[n_checks % 2] if n_checks else stats,
            states[(n_checks - 1) % 2] if n_checks else stats, tokens, out[0], out[1], n_rows, n_splits, *common,
            stats.stride(0), *draw_args, top_k, top_p, n_checks,
            BLOCK_V=block_v, GROUP=group, VEC=vec, BLOCK_S=block_s, SPLITS=splits_p2,
            CH=triton.next_power_of_2(n_blocks), SEARCH_PASSES=_SEARCH_PASSES, HAS_CHECKS=n_checks > 0,
            HAS_TOP_K=has_top_k, HAS_TOP_P=has_top_p, FTZ=ftz,
            num_warps=_PASS_WARPS if has_top_k or has_top_p else _DRAW_WARPS,
        )
    return tokens, out[0], out[1]


def _draw_torch(x, keep, rows, stage):
    """The three-level draw (module docstring) over the tokens `keep` of each row of x (B, V): (B,) tokens."""
    B, V = x.shape
    size = min(_CHUNK, triton.next_power_of_2(V))
    group = min(_GROUP, size)
    n_chunks, n_groups = triton.cdiv(V, size), size // group
    xs = F.pad(torch.where(keep, x, float("-inf")), (0, n_chunks * size - V), value=float("-inf"))
    xs = xs.view(B, n_chunks, size)
    chunk_ids = torch.arange(n_chunks, device=x.device) + _CHUNK_SALT + (stage << 13)
    chunk = (torch.logsumexp(xs, -1) + _gumbel_of(rows, chunk_ids)).argmax(-1)         # first of equal maxima
    xg = xs[torch.arange(B, device=x.device), chunk].view(B, n_groups, group)
    top = xg.amax((1, 2), keepdim=True)                     # relative to the chunk's largest x, as the kernel
    xg = xg - torch.where(torch.isfinite(top), top, 0.0)
    groups = chunk[:, None] * n_groups + torch.arange(n_groups, device=x.device)
    group_ids = groups[torch.arange(B, device=x.device),
                       (torch.logsumexp(xg, -1) + _gumbel_of(rows, groups + _GROUP_SALT + (stage << 18))).argmax(-1)]
    tokens = group_ids[:, None] * group + torch.arange(group, device=x.device)
    score = xs.view(B, -1).gather(-1, tokens) + _gumbel_of(rows, (tokens + _TOKEN_SALT) & _M32)
    return group_ids * group + score.argmax(-1)


def _top_p_keep(x, e, top_p):
    """The top-p set of each row of x, e = exp(x - max) on its candidates (0 elsewhere): by a sort."""
    ordered, order = torch.sort(x, dim=-1, descending=True)
    # Summed in float64: a float32 running sum over V terms drifts by up to V ulps of the mass.
    mass = torch.cumsum(e.gather(-1, order), -1, dtype=torch.float64)
    del order
    # A token is kept when the mass strictly before it is below top_p of the total: the first always.
    n_keep = (mass[:, :-1] < top_p * mass[:, -1:]).sum(-1, keepdim=True) + 1
    return x >= ordered.gather(-1, n_keep - 1)                                          # ties at the threshold kept


def _sample_torch(logits2d, ids1d, steps1d, seed, inv_t, top_k, top_p, vocab_size):
    """The same draw with torch ops on (B, V) temporaries (a sort for the top-p set)."""
    x = logits2d.float() * inv_t                                                        # a new (B, V) tensor
    if vocab_size < x.size(-1):
        x[:, vocab_size:] = float("-inf")
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)                                          # a row with no finite logit
    e = torch.sub(x, m).exp_()                                                          # exp(x - m)
    s = e.sum(-1)
    log_s = torch.log(s)
    entropy = log_s - torch.special.xlogy(e, e).sum(-1) / s                             # log s - sum e (x - m) / s
    rows = _row_hashes(seed, ids1d, steps1d)
    has_top_k = 0 < top_k < vocab_size
    keep = x > float("-inf")
    if has_top_k:
        keep &= x >= torch.topk(x, top_k, dim=-1).values[:, -1:]                       # ties with the k-th kept
    if top_p < 1.0 and not has_top_k and _CHECKS:                                       # rejection stages
        tokens = _draw_torch(x, keep, rows, 0)
        todo = torch.nonzero(s != 0).squeeze(-1)                  # the rows not resolved yet (a draw is per row)
        for stage in range(1, _CHECKS + 1):
            x_todo = x[todo]
            above = x_todo > x_todo.gather(-1, tokens[todo, None])
            open_ = torch.where(above, e[todo], 0.0).sum(-1) >= top_p * s[todo]
            todo, above = todo[open_], above[open_]
            if todo.numel() == 0:
                break
            if stage < _CHECKS:
                tokens[todo] = _draw_torch(x[todo], above, rows[todo], stage)
        if todo.numel():
            tokens[todo] = _draw_torch(x[todo], _top_p_keep(x[todo], e[todo], top_p), rows[todo], _CHECKS)
    else:
        if top_p < 1.0:
            keep &= _top_p_keep(x, torch.where(keep, e, 0.0), top_p)
        tokens = _draw_torch(x, keep, rows, 0)
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
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))                 # 1/T rounded to float32
    tokens, logprobs, entropy = run(logits2d, ids1d, steps1d, seed, inv_t, min(top_k, vocab),
                                    float(top_p), vocab)
    lead = logits.shape[:-1]
    return Sample(tokens.view(lead), logprobs.view(lead), entropy.view(lead))
