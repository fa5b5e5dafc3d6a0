"""sample: tokens, logprobs and entropy against a float64 reference of the same definition, its tie and top-p
boundary rules, batch independence, and its errors.

On CPU the "triton" backend runs in the interpreter; on CUDA, the compiled kernel (tests/kernels/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastppo.kernels import gumbel_noise, sample, sampler
from fastppo_testing.devices import on_test_device

BACKENDS = ["torch", "triton"]
U = 2.0 ** -24                         # float32 unit roundoff
M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------
# The definition, in float64
# ----------------------------------------------------------------------------

def _mix(x):
    """The 32-bit counter hash, on int64 tensors or Python ints."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & M32
    return x ^ (x >> 16)


def _unmix(y: int) -> int:
    """The inverse of `_mix` (xorshifts and odd multiplications are bijections of 32-bit words)."""
    y ^= y >> 16
    y = (y * pow(0x5BD1E995, -1, 1 << 32)) & M32
    y ^= (y >> 15) ^ (y >> 30)
    y = (y * pow(0x7FEB352D, -1, 1 << 32)) & M32
    return y ^ (y >> 16)


def _row_hash(seed: int, sample_id: int, step: int) -> int:
    return _mix(_mix(_mix(sample_id & M32) ^ seed) ^ _mix(step + 0x632BE5AB))


def _noise64(rows, counters):
    """float64 Gumbel noise of int64 counters (B, n) for row hashes (B,): u = float32(bits + 0.5) / 2^24 (the
    sum rounded to float32 is part of the definition: it moves u near 1 by up to half its distance to 1), at
    most 1 - 2^-24."""
    bits = _mix(rows[:, None] ^ _mix(counters & M32)) >> 8
    u = ((bits.float() + 0.5).double() / 2 ** 24).clamp(max=1 - U)
    return -torch.log(-torch.log(u))


def _rows(seed, ids, step):
    steps = step.reshape(-1).tolist() if isinstance(step, torch.Tensor) else [step] * ids.numel()
    return torch.tensor([_row_hash(seed, int(i), int(s) & M32) for i, s in zip(ids.reshape(-1).tolist(), steps)],
                        dtype=torch.int64)


def noise64(seed, ids, step, vocab):
    """(B, V) float64 token noise, on ids' device."""
    return _noise64(_rows(seed, ids, step), torch.arange(vocab, dtype=torch.int64)[None, :] + 0x85EBCA6B).to(ids.device)


def scaled64(logits, temperature=1.0, vocab_size=None):
    """x = logits·(1/T) in float32 (1/T rounded to float32: the definition), as float64 on the CPU (the reference
    computes there whatever device the kernel ran on); padding at -inf."""
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    x = (logits.detach().cpu().reshape(-1, logits.size(-1)).float() * inv_t).double()
    if vocab_size is not None:
        x[:, vocab_size:] = float("-inf")
    return x


def stats64(logits, temperature=1.0, vocab_size=None):
    """float64 (logprobs (B, V), entropy (B,)) of softmax(x)."""
    logp = torch.log_softmax(scaled64(logits, temperature, vocab_size), -1)
    return logp, -torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1)


def _second_gap(v):
    """Per row, the largest value minus the second largest (inf with fewer than two finite values)."""
    top2 = torch.topk(v, min(2, v.size(-1)), -1).values
    if v.size(-1) < 2:
        return torch.full(v.shape[:1], float("inf"), dtype=v.dtype)
    return torch.where(torch.isfinite(top2[:, 1]), top2[:, 0] - top2[:, 1], float("inf"))


def draw64(x, keep, rows, stage, chunk_tol, token_tol):
    """The three-level draw over `keep` in float64: (tokens (B,), close (B,) bool: a decision within rounding)."""
    B, V = x.shape
    size = min(sampler._CHUNK, 1 << (V - 1).bit_length())
    group = min(sampler._GROUP, size)
    n_chunks, n_groups = -(-V // size), size // group
    xs = torch.nn.functional.pad(torch.where(keep, x, float("-inf")), (0, n_chunks * size - V), value=float("-inf"))
    keys = torch.logsumexp(xs.view(B, n_chunks, size), -1) + _noise64(
        rows, torch.arange(n_chunks)[None, :] + 0x10000000 + (stage << 13))
    chunk = keys.argmax(-1)
    groups = chunk[:, None] * n_groups + torch.arange(n_groups)
    group_keys = torch.logsumexp(xs.view(B, -1, group).gather(1, groups[:, :, None].expand(-1, -1, group)), -1)
    group_keys = group_keys + _noise64(rows, groups + 0x20000000 + (stage << 18))
    g = groups.gather(-1, group_keys.argmax(-1, keepdim=True)).squeeze(-1)
    tokens = g[:, None] * group + torch.arange(group)
    score = xs.gather(-1, tokens) + _noise64(rows, tokens + 0x85EBCA6B)
    close = (_second_gap(keys) <= 2 * chunk_tol) | (_second_gap(group_keys) <= 2 * chunk_tol) | (
        _second_gap(score) <= 2 * token_tol)                                           # both keys err
    return g * group + score.argmax(-1), close


def reference(logits, *, seed, sample_ids, step, temperature=1.0, top_k=0, top_p=1.0, vocab_size=None):
    """float64 (tokens (B,), ambiguous (B,)): the draw of the definition (module docstring of the sampler), and
    whether float32 rounding can change it. A float32 kernel's decisions can differ from these only where
    their margins are within rounding:

    - a chunk's or a group's key ln(mass) + G: the log-sum-exp of up to 2048 terms of relative error
      u·(|y - r| + 2) each, summed in a tree, then its log and the noise's two logs:
      |error| <= u·(4 max|x| + 8(1 + |g|) + 64);
    - a token's x + g: u·(2|x| + 8(1 + |g|)) (x exact by the definition; g: two logs and the clamp: the inner
      log 1 ulp, the outer one, in the compiled draw in a chunk lg2.approx (absolute error below 2^-22 in
      log2, under 3u in ln), 2 ulps elsewhere; the log of a group's mass the same);
    - top-p's mass above a candidate against top_p·S, and the top-p set's boundary: n exp terms of relative
      error u·(|x| + |max x| + 2) summed in blocks and trees: a relative error of at most
      slack = u·(4 max|x| + 2 log2 V + V/1024 + 16) on either side.
    |g| <= -log(-log(1 - 2^-24)) < 17. Two keys can swap when their gap is within both errors. top-k's set is
    exact (an order of float32 values).
    """
    x = scaled64(logits, temperature, vocab_size)
    B, V = x.shape
    x_max = x.abs().nan_to_num(posinf=0).max().item()
    chunk_tol = U * (4 * x_max + 8 * 18 + 64)
    token_tol = U * (2 * x_max + 8 * 18)
    slack = U * (4 * x_max + 2 * math.log2(V) + V / 1024 + 16)
    rows = _rows(seed, sample_ids, step)
    p = torch.softmax(x, -1).nan_to_num(0.0)
    keep = torch.isfinite(x)
    vs = V if vocab_size is None else vocab_size
    has_top_k = 0 < top_k < vs
    if has_top_k:
        keep &= x >= torch.sort(x, -1, descending=True).values[:, top_k - 1:top_k]

    def top_p_set(keep, margin):
        q = torch.where(keep, p, 0.0)
        asc, order = torch.sort(torch.where(keep, x, float("-inf")), -1)
        cum = torch.cumsum(q.gather(-1, order), -1)
        z = cum[:, -1:]
        at_or_below = cum.gather(-1, torch.searchsorted(asc, x.contiguous(), right=True) - 1)
        return keep & ((z - at_or_below) * (1 - margin) < top_p * (1 + margin) * z)

    ambiguous = torch.zeros(B, dtype=torch.bool)
    if top_p < 1.0 and not has_top_k and sampler._CHECKS:
        tokens, ambiguous = draw64(x, keep, rows, 0, chunk_tol, token_tol)
        resolved = ~torch.isfinite(x).any(-1)
        for stage in range(1, sampler._CHECKS + 1):
            above = x > x.gather(-1, tokens[:, None])
            mass = torch.where(above, p, 0.0).sum(-1)
            ambiguous |= ~resolved & ((mass - top_p).abs() <= slack * (mass + top_p))
            resolved |= mass < top_p
            if stage < sampler._CHECKS:
                nxt, close = draw64(x, above, rows, stage, chunk_tol, token_tol)
                ambiguous |= ~resolved & close
                tokens = torch.where(resolved, tokens, nxt)
        last, close = draw64(x, top_p_set(keep, 0.0), rows, sampler._CHECKS, chunk_tol, token_tol)
        edge = top_p_set(keep, slack) != top_p_set(keep, -slack)
        ambiguous |= ~resolved & (close | edge.any(-1))
        tokens = torch.where(resolved, tokens, last)
    else:
        if top_p < 1.0:
            ambiguous |= (top_p_set(keep, slack) != top_p_set(keep, -slack)).any(-1)
            keep = top_p_set(keep, 0.0)
        tokens, close = draw64(x, keep, rows, 0, chunk_tol, token_tol)
        ambiguous |= close
    tokens = torch.where(torch.isfinite(x).any(-1), tokens, 0)          # no finite logit: token 0
    return tokens, ambiguous


def check_draw(got, logits, **kw):
    """The drawn tokens are the reference's on every row where rounding cannot change the draw; returns the
    number of the other (ambiguous) rows."""
    tokens = got.tokens.reshape(-1).cpu()
    want, ambiguous = reference(logits.cpu(), **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                 for k, v in kw.items()})
    assert torch.equal(tokens[~ambiguous], want[~ambiguous]), (tokens, want)
    return int(ambiguous.sum())


def check_logprob_entropy(got, logits, **kw):
    """logprob and entropy vs float64: error at most twice the plain float32 computation's plus u·(|x| + log V)
    (the flash-attn criterion; the atol covers the rounding the plain computation shares)."""
    logp64, ent64 = stats64(logits, kw.get("temperature", 1.0), kw.get("vocab_size"))
    tokens = got.tokens.reshape(-1, 1).cpu()
    x32 = scaled64(logits, kw.get("temperature", 1.0), kw.get("vocab_size")).float()
    plain = torch.log_softmax(x32, -1)
    plain_ent = -torch.where(torch.isfinite(plain), plain.exp() * plain, 0.0).sum(-1)
    x_max = x32.abs().nan_to_num(posinf=0).max().item()
    atol = 4 * U * (x_max + math.log(logits.size(-1)) + 1)
    finite = torch.isfinite(logp64.max(-1).values)
    want_lp = logp64.gather(-1, tokens).squeeze(-1)
    for name, g, w, p in (("logprobs", got.logprobs.reshape(-1).cpu(), want_lp,
                           plain.gather(-1, tokens).squeeze(-1)),
                          ("entropy", got.entropy.reshape(-1).cpu(), ent64, plain_ent)):
        assert g.dtype == torch.float32
        err = (g.double() - w).abs()[finite]
        budget = 2 * (p.double() - w).abs()[finite] + atol
        assert (err <= budget).all(), f"{name}: error {err.max().item():.3g} over budget"


def draw(logits, backend, **kw):
    out = sample(logits, backend=backend, **kw)
    check_draw(out, logits, **kw)
    check_logprob_entropy(out, logits, **kw)
    return out


# ----------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------

CASES = [  # (rows, V, temperature, top_k, top_p): every switch, on odd and tiny vocabularies
    (4, 1, 1.0, 0, 0.9),
    (6, 7, 0.7, 0, 0.9),
    (6, 7, 1.0, 1, 1.0),
    (6, 1000, 1.0, 0, 1.0),
    (6, 1000, 1.3, 5, 1.0),
    (6, 1000, 0.8, 20, 0.5),
    (6, 1000, 1.0, 0, 1e-6),
    (3, 5003, 0.7, 0, 0.9),
    (3, 5003, 1.0, 300, 0.95),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_draws_match_the_float64_reference(backend, case):
    rows, vocab, T, k, p = case
    logits = torch.randn(rows, vocab) * 3
    ambiguous = 0
    # The interpreter runs ~1 ms per program and loop trip (18 trips a row with both filters): fewer draws there.
    draws = ((2**32 - 1, 7), (12345, 1000), (0, 0), (99, 3))[:2 if backend == "triton" else 4]
    for seed, step in draws:
        ids = torch.randint(-2**40, 2**40, (rows,))                  # only the low 32 bits matter
        out = sample(logits, seed=seed, sample_ids=ids, step=step, temperature=T, top_k=k, top_p=p, backend=backend)
        assert out.tokens.dtype == torch.int64 and out.tokens.shape == (rows,)
        kw = dict(seed=seed, sample_ids=ids, step=step, temperature=T, top_k=k, top_p=p)
        ambiguous += check_draw(out, logits, **kw)
        check_logprob_entropy(out, logits, **kw)
    assert ambiguous <= len(draws) * rows // 2                        # the check is not vacuous


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_logits_and_strided_rows(backend, dtype):
    """Math in float32 on 16-bit logits (exact in float32 and float64), read through a strided view whose
    neighbours are NaN: an out-of-bounds read would show."""
    buf = torch.full((9, 2 * 301), float("nan"), dtype=dtype)
    logits = buf[:, 1::2]
    logits.copy_(torch.randn(9, 301) * 4)
    draw(logits, backend, seed=5, sample_ids=torch.arange(9), step=2, temperature=0.9, top_k=40, top_p=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions(backend):
    logits = torch.randn(2, 3, 50) * 2
    ids = torch.arange(6).view(2, 3)
    out = sample(logits, seed=1, sample_ids=ids, step=0, top_p=0.9, backend=backend)
    flat = sample(logits.view(6, 50), seed=1, sample_ids=ids.view(6), step=0, top_p=0.9, backend=backend)
    assert out.tokens.shape == out.logprobs.shape == out.entropy.shape == (2, 3)
    assert torch.equal(out.tokens.view(6), flat.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_threshold_are_all_kept(backend):
    """top-k keeps every token tied with the k-th largest; top-p keeps a whole group of equal logits (here the
    top group alone holds the mass), and a tie in x + g goes to the smallest token id."""
    # Each draw is checked against the reference; over 128 draws every kept token shows (the least likely has
    # probability 0.098: missed with probability < 2e-6). The interpreter draws 16 (a program per row).
    n = 128 if backend == "torch" or torch.cuda.is_available() else 16
    ids = torch.arange(n)
    row = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 2.0, -1.0])
    logits = row.expand(n, -1)
    for k, p, want in ((1, 1.0, {1, 2, 4}), (2, 1.0, {1, 2, 4}), (4, 1.0, {1, 2, 4, 5, 6}), (0, 0.01, {1, 2, 4}),
                       (0, 0.6, {1, 2, 4})):
        drawn = set(draw(logits, backend, seed=9, sample_ids=ids, step=0, top_k=k, top_p=p).tokens.tolist())
        assert drawn == want if n == 128 else drawn <= want, (k, p)
    # -0.0 and +0.0 are one value: tied at the top-k threshold, both kept.
    logits = torch.tensor([0.0, -1.0, 2.0, -0.0, -2.0]).expand(n, -1)
    drawn = set(draw(logits, backend, seed=5, sample_ids=ids, step=0, top_k=2).tokens.tolist())
    assert drawn == {0, 2, 3} if n == 128 else drawn <= {0, 2, 3}
    # Equal x + g: two tokens of one row and group whose noise is equal (24 bits: about 64^2 / 2^25 such pairs
    # per group), given the same, dominant logit (their group wins: its mass is e^43 times any other's).
    V = 20_000
    g = gumbel_noise(9, torch.arange(256), 0, V)
    for row in range(256):
        values, order = torch.sort(g[row])
        dup = (values[1:] == values[:-1]) & (order[1:] // 64 == order[:-1] // 64)
        if dup.any():
            i = int(dup.nonzero()[0, 0])
            t1, t2 = sorted(order[i:i + 2].tolist())
            break
    logits = torch.zeros(1, V)
    logits[0, [t1, t2]] = 50.0
    out = sample(logits, seed=9, sample_ids=torch.tensor([row]), step=0, backend=backend)
    assert out.tokens.item() == t1, (t1, t2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_it(backend):
    """Probabilities 0.5, 0.3, 0.2 (margins far above float32 rounding): a token is kept when the mass of the
    tokens more likely than it is below top_p."""
    n = 80 if backend == "torch" or torch.cuda.is_available() else 12   # 80: a kept token missed < 0.8^80 = 2e-8
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(n, -1)
    for p, want in ((0.45, {0}), (0.55, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2})):
        drawn = set(draw(logits, backend, seed=3, sample_ids=torch.arange(n), step=1, top_p=p).tokens.tolist())
        assert drawn == want if n == 80 else drawn <= want, p


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_and_padding_columns_are_never_drawn(backend):
    """-inf logits have no mass; columns >= vocab_size are never drawn even when they are the largest; a row
    without a finite logit draws token 0 with logprob -inf and entropy 0."""
    n, V = 16, 12
    logits = torch.randn(n, V)
    logits[:, 3] = float("-inf")
    logits[:, 9:] = 50.0                                             # padding columns, the likeliest
    logits[0, :9] = float("-inf")                                    # no finite real logit
    for k, p in ((0, 1.0), (20, 1.0), (0, 0.95), (8, 0.99)):
        out = draw(logits, backend, seed=2, sample_ids=torch.arange(n), step=3, top_k=k, top_p=p, vocab_size=9)
        assert out.tokens[0] == 0 and out.logprobs[0] == float("-inf") and out.entropy[0] == 0
        assert (out.tokens < 9).all() and (out.tokens[1:] != 3).all()
        assert torch.isfinite(out.logprobs[1:]).all() and (out.logprobs[1:] <= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_last_noise_value_is_finite(backend):
    """The counter value whose 24 bits are all ones: (2^24 - 1) + 0.5 rounds to 2^24 in float32, and u = 1
    would make g = +inf and the token win whatever its logit. With u clamped to 1 - 2^-24, g is about 16.6."""
    token = 5
    z = _unmix(0xFFFFFFFF) ^ _mix((token + 0x85EBCA6B) & M32)           # the row hash that gives it
    seed = _unmix(_unmix(z) ^ _mix(0x632BE5AB)) ^ _mix(0)               # sample id 0, step 0
    assert _row_hash(seed, 0, 0) == z
    g = gumbel_noise(seed, torch.zeros(1, dtype=torch.long), 0, token + 1)
    assert torch.isfinite(g).all() and 16 < g[0, token] < 17
    logits = torch.zeros(1, token + 1)
    logits[0, 1:] = -30.0                                            # token 5 at e^-30: never drawn
    assert sample(logits, seed=seed, sample_ids=torch.zeros(1, dtype=torch.long), step=0,
                  backend=backend).tokens.item() == 0


@pytest.mark.parametrize("chunk,group,checks", [(2048, 64, 4), (4, 2, 4), (4, 2, 1)],
                         ids=["one group", "2 chunks of 2 groups", "1 check"])
def test_frequencies_follow_the_filtered_softmax(monkeypatch, chunk, group, checks):
    """Over sample ids, the draws follow softmax(x / T) renormalised on the kept set (4 sigma): top-k, and
    top-p alone by its rejection stages (1 check: many rows fall back to the search). Chunks of 4 tokens in
    groups of 2 give every level of the draw a choice. On the torch twin; the kernel draws its tokens
    (test_the_backends_draw_the_same_tokens, test_top_p_stages_and_chunks_draw_the_definition)."""
    monkeypatch.setattr(sampler, "_CHUNK", chunk)
    monkeypatch.setattr(sampler, "_GROUP", group)
    monkeypatch.setattr(sampler, "_CHECKS", checks)
    n = 20_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for k, p, kept in ((4, 1.0, 4), (0, 0.9, 3)):            # top-p at T = 0.7: probabilities .70 .17 .08 .04 ...
        out = sample(logits.expand(n, -1), seed=4, sample_ids=torch.arange(n), step=2, temperature=0.7, top_k=k,
                     top_p=p, backend="torch")
        freq = torch.bincount(out.tokens, minlength=6).double() / n
        want = torch.softmax(logits.double() / 0.7, -1)
        want[kept:] = 0
        want /= want.sum()
        assert (freq - want).abs().max().item() < 4 * math.sqrt(0.25 / n), (k, p, freq, want)


# ----------------------------------------------------------------------------
# A draw depends on (seed, sample id, step, token) only
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_one_and_n_processes_draw_the_same(monkeypatch, backend):
    """Rows drawn alone, in another order or split between "ranks" get the same tokens and logprobs; seed,
    step and sample id each change the draw. Chunks of 64 tokens: 5 a row, in 5 programs."""
    monkeypatch.setattr(sampler, "_CHUNK", 64)
    B, V = 12, 300
    logits = torch.randn(B, V) * 2
    ids = torch.arange(1000, 1000 + B)
    kw = dict(seed=77, step=4, temperature=0.9, top_k=50, top_p=0.9, backend=backend)
    whole = sample(logits, sample_ids=ids, **kw)
    perm = torch.randperm(B)
    shuffled = sample(logits[perm], sample_ids=ids[perm], **kw)
    assert torch.equal(shuffled.tokens, whole.tokens[perm]) and torch.equal(shuffled.logprobs, whole.logprobs[perm])
    for rank in range(3):                                            # 3 ranks of 4 rows
        part = sample(logits[rank::3], sample_ids=ids[rank::3], **kw)
        assert torch.equal(part.tokens, whole.tokens[rank::3])
    flat = sample(torch.zeros(B, V), sample_ids=ids, **{**kw, "top_k": 0, "top_p": 1.0})
    for change in (dict(seed=78), dict(step=5), dict(sample_ids=ids + 1)):
        other = sample(torch.zeros(B, V), **{**kw, "sample_ids": ids, "top_k": 0, "top_p": 1.0, **change})
        assert (other.tokens != flat.tokens).float().mean() > 0.5, change


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_per_row_draws_what_each_rows_step_draws(monkeypatch, backend):
    """Rows at different steps in one call (continuous batching): row i draws, to the bit, what a call at its
    own int step draws; a tensor of equal steps is the int step; steps enter by their low 32 bits. Chunks of
    64 tokens in groups of 16: the step reaches the chunk and group noise too."""
    monkeypatch.setattr(sampler, "_CHUNK", 64)
    monkeypatch.setattr(sampler, "_GROUP", 16)
    B, V = 6, 300
    logits = torch.randn(B, V) * 2
    ids = torch.arange(50, 50 + B)
    steps = torch.tensor([0, 3, 3, 17, 1000, 2**31 - 1])
    kw = dict(seed=11, temperature=0.9, top_k=40, top_p=0.9, backend=backend)
    mixed = sample(logits, sample_ids=ids, step=steps, **kw)
    for i in range(B):
        alone = sample(logits[i:i + 1], sample_ids=ids[i:i + 1], step=int(steps[i]), **kw)
        assert torch.equal(mixed.tokens[i:i + 1], alone.tokens), i
        assert torch.equal(mixed.logprobs[i:i + 1], alone.logprobs) and torch.equal(mixed.entropy[i:i + 1],
                                                                                    alone.entropy), i
    same = sample(logits, sample_ids=ids, step=torch.full((B,), 3, dtype=torch.int32), **kw)
    assert torch.equal(same.tokens, sample(logits, sample_ids=ids, step=3, **kw).tokens)
    wrapped = sample(logits, sample_ids=ids, step=steps + 2**32, **kw)
    assert torch.equal(wrapped.tokens, mixed.tokens)
    grid = sample(logits.view(2, 3, V), sample_ids=ids.view(2, 3), step=steps.view(2, 3), **kw)
    assert torch.equal(grid.tokens.view(-1), mixed.tokens)
    noise = gumbel_noise(11, ids, steps, V)
    for i in (0, 4):
        assert torch.equal(noise[i], gumbel_noise(11, ids[i:i + 1], int(steps[i]), V)[0])


def test_the_backends_draw_the_same_tokens():
    """The kernel and the torch twin agree token for token on 3 chunks a row, top-p alone included, wherever
    float32 rounding cannot change the draw (check_draw: the reference's ambiguous rows are left out)."""
    logits = torch.randn(16, 5000) * 3
    for k, p in ((100, 0.95), (0, 0.9), (0, 1.0)):
        kw = dict(seed=3, sample_ids=torch.arange(16), step=9, temperature=0.8, top_k=k, top_p=p)
        a, b = sample(logits, backend="triton", **kw), sample(logits, backend="torch", **kw)
        assert check_draw(a, logits, **kw) + check_draw(b, logits, **kw) <= 2, (k, p)


@pytest.mark.parametrize("dtype,vec", [(torch.float32, 4), (torch.bfloat16, 8)], ids=str)
def test_vector_and_scalar_reads_of_a_chunk_draw_the_definition(dtype, vec):
    """The draw in one chunk reads a chunk as vectors of VEC tokens (rows 16-byte aligned) or a token at a time
    (a row starting 4 bytes in): the same logits, both layouts, the reference's tokens. Rows of 2 full chunks
    and a partial one, filterless, top-p alone (the stages' draws) and top-k with top-p."""
    B, V = 6, 2 * 2048 + 64
    values = (torch.randn(B, V) * 3).to(dtype)
    aligned = values.clone()
    shifted = torch.empty(B * V + 2, dtype=dtype)[4 // dtype.itemsize:][:B * V].view(B, V)   # 4 bytes in
    shifted.copy_(values)
    assert sampler._vector_width(aligned) == vec and sampler._vector_width(shifted) == 1
    ambiguous = 0
    for k, p in ((0, 1.0), (0, 0.9), (50, 0.9)):
        kw = dict(seed=8, sample_ids=torch.arange(B), step=4, temperature=0.9, top_k=k, top_p=p)
        for logits in (aligned, shifted):
            ambiguous += check_draw(sample(logits, backend="triton", **kw), values, **kw)
    assert ambiguous <= B


@pytest.mark.parametrize("V", [50, 100, 2048 + 37, 2 * 2048 + 101])
def test_draws_in_a_group_the_vocabulary_cuts_are_the_definitions(V):
    """The draw in one chunk reads each group's tokens unmasked, a group that the row's end cuts (or one past
    it) the 64 that end with the chunk's last instead, and replaces its mass: a vocabulary within one group
    (50), a cut group after a full one (100), a last chunk shorter than a group (its reads start in the chunk
    before), and a cut group whose reads are rounded down to a vector. The mass is put in the cut group, so
    most draws land there: the reference's tokens, bf16 rows read as vectors of 8 (a padded row stride) and a
    token at a time, filterless and top-p alone (p = 0.5: stages past the first; top-k's draw is a filtered
    draw like theirs)."""
    B, chunk = 16, min(2048, 1 << (V - 1).bit_length())
    cut = V // 64 * 64
    values = torch.randn(B, V)
    values[:, (V - 1) // chunk * chunk:] += 4.0                      # the last chunk
    values[:, cut:] += 2.0
    rows = torch.empty(B, -(-V // 16) * 16, dtype=torch.bfloat16)[:, :V]     # rows 16-byte aligned
    rows.copy_(values)
    shifted = torch.empty(B * V + 2, dtype=torch.bfloat16)[2:][:B * V].view(B, V)   # 4 bytes in
    shifted.copy_(values)
    assert sampler._vector_width(rows) == 8 and sampler._vector_width(shifted) == 1
    ambiguous, in_cut = 0, 0
    for p in (1.0, 0.5):
        kw = dict(seed=3, sample_ids=torch.arange(B), step=2, temperature=0.8, top_p=p)
        for logits in (rows, shifted):
            out = sample(logits, backend="triton", **kw)
            ambiguous += check_draw(out, rows, **kw)
            in_cut += int((out.tokens >= cut).sum())
    assert ambiguous <= B // 2
    assert in_cut >= 2 * B, in_cut          # of 4·B draws: most in the cut group


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_split_across_programs_draw_what_one_program_draws(monkeypatch, backend):
    """Chunks of 64 tokens: a row of 1000 is 16 chunks, one program or 8 (statistics and chunk draws merged
    across them): the same tokens, and logprobs equal up to the merge's rounding."""
    monkeypatch.setattr(sampler, "_CHUNK", 64)
    logits = torch.randn(6, 1000) * 3
    outs = []
    for splits in (1, 8):
        monkeypatch.setattr(sampler, "_MAX_SPLITS", splits)
        outs.append([sample(logits, seed=5, sample_ids=torch.arange(6), step=1, temperature=0.9, top_k=k, top_p=p,
                            backend=backend) for k, p in ((0, 1.0), (0, 0.8), (30, 0.9))])
    for one, many in zip(*outs):
        assert torch.equal(one.tokens, many.tokens)
        torch.testing.assert_close(many.logprobs, one.logprobs, atol=4e-6, rtol=0)
        torch.testing.assert_close(many.entropy, one.entropy, atol=4e-6, rtol=0)


# ----------------------------------------------------------------------------
# Errors name the argument
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("change,exc,words", [
    (dict(logits=[1.0, 2.0]), TypeError, "logits must be a torch.Tensor"),
    (dict(logits=torch.zeros(4, 10, dtype=torch.int64)), TypeError, "logits must have dtype"),
    (dict(logits=torch.zeros(4)), ValueError, "sample_ids must have shape ()"),
    (dict(logits=torch.zeros(4, 0), ), ValueError, "logits must have a last (vocabulary) dimension"),
    (dict(sample_ids=torch.zeros(4)), TypeError, "sample_ids must have dtype"),
    (dict(sample_ids=torch.zeros(5, dtype=torch.long)), ValueError, "sample_ids must have shape (4,)"),
    (dict(seed=-1), ValueError, "seed must lie in [0, 4294967296)"),
    (dict(seed=2**32), ValueError, "seed must lie in"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(step=-1), ValueError, "step must lie in"),
    (dict(step=True), TypeError, "step must be an int"),
    (dict(step=torch.zeros(4)), TypeError, "step must have dtype"),
    (dict(step=torch.zeros(3, dtype=torch.long)), ValueError, "step must have shape (4,)"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(top_k=-1), ValueError, "top_k must be >= 0, got -1"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(top_p=0.0), ValueError, "top_p must lie in (0, 1]"),
    (dict(top_p=1.5), ValueError, "top_p must lie in (0, 1]"),
    (dict(top_p="0.9"), TypeError, "top_p must be a number"),
    (dict(vocab_size=11), ValueError, "vocab_size must lie in [1, 10]"),
    (dict(vocab_size=0), ValueError, "vocab_size must lie in [1, 10]"),
    (dict(backend="cuda"), ValueError, "backend must be None or one of"),
])
def test_bad_input_is_named(change, exc, words):
    args = {**dict(logits=torch.zeros(4, 10), seed=0, sample_ids=torch.arange(4), step=0),
            **{k: on_test_device(v) for k, v in change.items()}}
    logits = args.pop("logits")
    with pytest.raises(exc) as err:
        sample(logits, **args)
    assert words in str(err.value)


@pytest.mark.cpu_only("a second device is needed for the mismatch")
def test_ids_on_another_device_are_named():
    with pytest.raises(ValueError, match="sample_ids is on meta but logits is on cpu"):
        sample(torch.zeros(2, 3), seed=0, sample_ids=torch.zeros(2, dtype=torch.long, device="meta"), step=0)
    with pytest.raises(ValueError, match="step is on meta but logits is on cpu"):
        sample(torch.zeros(2, 3), seed=0, sample_ids=torch.zeros(2, dtype=torch.long),
               step=torch.zeros(2, dtype=torch.long, device="meta"))


# ----------------------------------------------------------------------------
# The noise
# ----------------------------------------------------------------------------

def test_gumbel_noise_is_a_pure_function_with_gumbel_moments():
    ids = torch.arange(512)
    g = gumbel_noise(7, ids, step=3, vocab=1000)
    assert g.shape == (512, 1000) and g.dtype == torch.float32 and torch.isfinite(g).all()
    assert torch.equal(g, gumbel_noise(7, ids, step=3, vocab=1000))
    assert torch.equal(g[100:200], gumbel_noise(7, ids[100:200], step=3, vocab=1000))      # rows are independent
    assert not torch.equal(g, gumbel_noise(8, ids, step=3, vocab=1000))
    assert not torch.equal(g, gumbel_noise(7, ids, step=4, vocab=1000))
    # The float64 definition from the same float32 u: y = -log u carries a relative error of one ulp
    # (2^-23) from the float32 log, which moves g = -log y by 2^-23, plus g's own rounding (2^-24 |g|).
    g64 = noise64(7, ids, 3, 1000)
    assert ((g.double() - g64).abs() <= 2.0 ** -21 * (1 + g64.abs())).all()
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6 (512K draws).
    assert g.double().mean().item() == pytest.approx(0.5772, abs=0.01)
    assert g.double().var().item() == pytest.approx(math.pi ** 2 / 6, rel=0.02)
    # No visible correlation between neighbouring rows, steps or tokens.
    for a, b in ((g[:-1], g[1:]), (g[:, :-1], g[:, 1:]), (g, gumbel_noise(7, ids, step=4, vocab=1000))):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01


# ----------------------------------------------------------------------------
# Top-p by rejection stages, rows in several chunks and splits
# ----------------------------------------------------------------------------

def test_top_p_stages_and_chunks_draw_the_definition(monkeypatch):
    """Top-p alone is drawn by rejection stages (sampler._CHECKS checks, then the threshold search): 0 checks
    send every row to the search, 1 leaves many rows to fall back (top_p 0.3 on flat rows), 4 resolve most.
    Chunks of 64 tokens in groups of 16 split a row of 300 across 5 programs whose statistics and chunk draws
    are merged, and the threshold searches read it in 3 blocks (the last partial), as on a GPU. Kernel and
    twin draw the definition's tokens (float64, every stage emulated), logits on a grid of 0.5 give ties in
    x, inside the nucleus and at its boundary, and rows below 0 searched over negative keys; top-k with top-p
    searches both thresholds the same way."""
    monkeypatch.setattr(sampler, "_CHUNK", 64)
    monkeypatch.setattr(sampler, "_GROUP", 16)
    monkeypatch.setattr(sampler, "_SEARCH_BLOCK_INTERPRETED", 128)
    B, V = 12, 300                     # the interpreter: ~1 ms per program and launch
    logits = torch.round(torch.randn(B, V) * 4) / 2
    logits[:4] = torch.round(torch.randn(4, V)) / 2                    # flat rows: the draw often misses
    logits[4, :10] = 6.0                                               # a tied top group holding the nucleus
    logits[5:8] -= 40.0                                                # thresholds below 0: negative keys
    outs = {}
    for checks in (0, 1, 4):
        monkeypatch.setattr(sampler, "_CHECKS", checks)
        for seed, step, T, p in ((2, 5, 0.7, 0.3), (4, 2, 1.3, 0.05)):
            kw = dict(seed=seed, sample_ids=torch.arange(B) + 100 * seed, step=step, temperature=T, top_p=p)
            for backend in BACKENDS:
                out = sample(logits, backend=backend, **kw)
                assert check_draw(out, logits, **kw) <= B // 4, (checks, seed)
                check_logprob_entropy(out, logits, **kw)
                outs.setdefault((seed, backend), []).append(out)
    kw = dict(seed=6, sample_ids=torch.arange(B), step=1, temperature=0.9, top_k=40, top_p=0.8)
    for backend in BACKENDS:                                          # the count search, then the mass search
        assert check_draw(sample(logits, backend=backend, **kw), logits, **kw) <= B // 4, backend
    for (seed, backend), (first, *others) in outs.items():        # the checks change the tokens, not the stats
        for other in others:
            torch.testing.assert_close(other.logprobs[other.tokens == first.tokens],
                                       first.logprobs[other.tokens == first.tokens], atol=0, rtol=0)
            assert torch.equal(other.entropy, first.entropy)
