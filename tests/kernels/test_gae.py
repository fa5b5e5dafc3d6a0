"""gae: a 3-token episode worked by hand, a float64 Python-loop oracle over
shapes, discounts and mask patterns, and the argument checks.

On CPU the "triton" backend runs in the interpreter; on CUDA, the compiled kernels
(see tests/kernels/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fastppo import algo
from fastppo.kernels import gae, torch_backend
from fastppo.kernels.gae import ONE_SCAN_MIN_LAM, _gae_triton

BACKENDS = ["torch", "triton"]


def oracle(rewards, values, mask, gamma, lam):
    """float64 GAE, one row and one token at a time: each row's valid tokens in order are one episode."""
    return algo.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)


def python_loop(rewards, values, mask, gamma, lam):
    """The same loop in float32, as trainers write it: the error budget for the fused op."""
    adv, ret = algo.gae(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    return adv.double(), ret.double()


def make_mask(batch, length, pattern):
    """left / right padding with random lengths (at least one full row), or random holes."""
    if pattern == "holes":
        mask = torch.rand(batch, length) < 0.7
    else:
        lengths = torch.randint(0, length + 1, (batch,))
        lengths[0] = length
        cols = torch.arange(length)
        mask = cols < lengths[:, None] if pattern == "right" else cols >= (length - lengths)[:, None]
    if batch > 1:
        mask[-1] = False                                         # an all-false row
    return mask


def assert_within_budget(name, got, want, plain_value, atol=1e-5):
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    budget = 2 * ((plain_value - want).abs().max().item() if want.numel() else 0.0) + atol
    assert err <= budget, f"{name}: max error {err:.3g} > 2 x plain error + atol = {budget:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_tokens_by_hand(backend):
    """γ = 0.9, λ = 0.8 (γλ = 0.72), r = (0, 0, 1), V = (0.5, 0.6, 0.7):
        δ_2 = 1 + 0.9·0 − 0.7   = 0.3            A_2 = 0.3
        δ_1 = 0 + 0.9·0.7 − 0.6 = 0.03           A_1 = 0.03 + 0.72·0.3   = 0.246
        δ_0 = 0 + 0.9·0.6 − 0.5 = 0.04           A_0 = 0.04 + 0.72·0.246 = 0.21712
        R = A + V = (0.71712, 0.846, 1.0)
    The same episode with left padding and holes (NaN in them) gives the same
    numbers at its tokens and 0 elsewhere; an all-false row gives 0.
    """
    nan = float("nan")
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
                            [nan, 0.0, nan, 0.0, 1.0, nan],
                            [nan, nan, nan, nan, nan, nan]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.0, 0.0, 0.0],
                           [nan, 0.5, nan, 0.6, 0.7, nan],
                           [nan, nan, nan, nan, nan, nan]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0],
                         [0, 1, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    want_adv = torch.tensor([0.21712, 0.246, 0.3])
    want_ret = torch.tensor([0.71712, 0.846, 1.0])
    for row, cols in ((0, [0, 1, 2]), (1, [1, 3, 4])):
        torch.testing.assert_close(adv[row, cols], want_adv, atol=1e-6, rtol=0)
        torch.testing.assert_close(ret[row, cols], want_ret, atol=1e-6, rtol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("length", [1, 9, 257])
@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("lam", [0.95, 0.8, 0.3])        # 0.3: the two-scan path
@pytest.mark.parametrize("pattern", ["left", "right", "holes"])
def test_matches_float64_loop(backend, batch, length, gamma, lam, pattern):
    rewards = torch.randn(batch, length)
    values = torch.randn(batch, length) + 2.0
    mask = make_mask(batch, length, pattern)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == (batch, length)
    want_adv, want_ret = oracle(rewards, values, mask, gamma, lam)
    plain_adv, plain_ret = python_loop(rewards, values, mask, gamma, lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_within_budget("advantages", adv, want_adv, plain_adv)
    assert_within_budget("returns", ret, want_ret, plain_ret)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,lam", [(0.5, 0.0), (0.0, 0.9), (1.0, 1.0), (0.6, 0.5)])
def test_edge_discounts(backend, gamma, lam):
    """γλ = 0 (one-step TD, the next value still found across holes), γλ = 1, and a small γλ
    whose torch path cuts T into many chunks."""
    rewards, values = torch.randn(4, 70), torch.randn(4, 70)
    mask = make_mask(4, 70, "holes")
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    want_adv, want_ret = oracle(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), want_adv, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), want_ret, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("lam", [0.95, 0.3], ids=["one_scan", "two_scans"])
@pytest.mark.parametrize("pattern", ["right", "holes"])
def test_kernel_carries_across_blocks(pattern, lam):
    """Rows longer than one block: the values carried from block to block, with one row or several rows a
    program (5 rows in programs of 4: the last program's rows past the batch are masked)."""
    assert (lam >= ONE_SCAN_MIN_LAM) == (lam == 0.95)
    rewards, values = torch.randn(5, 100), torch.randn(5, 100)
    mask = make_mask(5, 100, pattern)
    mask[0, 48:72] = False                                       # a hole across block edges
    want_adv, want_ret = oracle(rewards, values, mask, 0.99, lam)
    for block_t, block_m in ((8, 1), (16, 1), (16, 4)):
        adv, ret = _gae_triton(rewards, values, mask, 0.99, lam, block_t=block_t, block_m=block_m)
        torch.testing.assert_close(adv.double(), want_adv, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ret.double(), want_ret, atol=2e-5, rtol=1e-5)


def _episode_masks(patterns, length, block_t):
    """One row of `length` tokens per pattern, its episode edges inside blocks of `block_t` (read from the
    end): "left" / "right" padding of random length, or random "holes" with one long hole across a block edge."""
    mask = torch.zeros(len(patterns), length, dtype=torch.bool)
    for row, pattern in enumerate(patterns):
        cut = int(torch.randint(1, length, ()))
        if pattern == "left":
            mask[row, cut:] = True
        elif pattern == "right":
            mask[row, :cut] = True
        else:
            mask[row] = torch.rand(length) < 0.7
            edge = max(length - block_t, length // 2)            # a block edge (counted from the end), or the middle
            mask[row, max(0, edge - 5):edge + 7] = False
    return mask


@pytest.mark.parametrize("block_t,length,patterns", [
    (2048, 2048, ["right"]),                   # one GPU-sized block (8 warps), exactly full
    (2048, 8192, ["holes"]),                   # four full blocks: three carries
    (2048, 3001, ["left", "right"]),           # odd T: the row's first block is partial
    (1, 37, ["left", "right", "holes"]),       # BLOCK_T = 1: every token is its own block
    (64, 130, ["left", "right", "holes"]),     # the interpreter's block size, a 2-token first block
], ids=str)
@pytest.mark.parametrize("lam", [0.95, 0.6, 0.3], ids=["one_scan", "one_scan_small_lam", "two_scans"])
def test_kernel_forced_block_sizes(block_t, length, patterns, lam):
    """The kernel at forced block sizes (GPU-sized blocks under the interpreter too) against the float64 loop.

    Error analysis: inside a block the advantages are sums Σ_k (γλ)^k·δ_k formed by a scan of depth
    d = log2(BLOCK_T); each level rounds every partial result once in its multiply and once in its add,
    so a term carries a relative error ≤ 2u per level (u = 2^-24) and the sum ≤ 2u·(d + 2)·Σ_k (γλ)^k·|δ_k|
    ≤ 2u·(d + 2)·max|δ| / (1 − γλ) (the +2: δ's own rounding and the carry into the block). Carries from
    the blocks to the right are multiplied by (γλ)^k ≤ 1, so their errors do not grow. Returns add V:
    one more rounding. At λ ≥ 1/2 the kernel scans Z = λ·A + V instead, whose terms λ·r + (1 − λ)·V are
    bounded by the same max|δ|, and A = (Z − V)/λ scales that error by 1/λ, plus the rounding of Z − V and
    of the product by 1/λ: the bound times 1/λ + 2u·(|A| + |Z − V|/λ), which the (d + 2) margin covers. Twice
    that bound is allowed, on top of twice the float32 loop's own error. Below λ = 1/2, two scans: the first
    (a max-scan of lane numbers) is exact, so the same bound without 1/λ.
    """
    gamma = 0.99
    rows = len(patterns)                       # few rows: the interpreter runs a scan element by element
    rewards, values = torch.randn(rows, length), torch.randn(rows, length) + 2.0
    mask = _episode_masks(patterns, length, block_t)
    adv, ret = _gae_triton(rewards, values, mask, gamma, lam, block_t=block_t)
    want_adv, want_ret = oracle(rewards, values, mask, gamma, lam)
    plain_adv, plain_ret = python_loop(rewards, values, mask, gamma, lam)
    depth = max(1, block_t).bit_length() - 1
    max_delta = (rewards.abs() + (1 + gamma) * values.abs()).max().item()
    atol = 2 * 2 * 2.0 ** -24 * (depth + 2) * max_delta / (1 - gamma * lam) / (lam if lam >= ONE_SCAN_MIN_LAM else 1)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_within_budget("advantages", adv, want_adv, plain_adv, atol=atol)
    assert_within_budget("returns", ret, want_ret, plain_ret, atol=atol + 2.0 ** -24 * want_ret.abs().max().item())
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_torch_path_row_chunks(monkeypatch):
    """The CPU path in row chunks (forced down to one row per chunk) gives the whole-batch answer."""
    rewards, values = torch.randn(6, 33), torch.randn(6, 33)
    mask = make_mask(6, 33, "holes")
    whole = gae(rewards, values, mask, gamma=0.99, lam=0.9, backend="torch")
    monkeypatch.setattr(torch_backend, "GAE_CHUNK_BYTES", 1)
    chunked = gae(rewards, values, mask, gamma=0.99, lam=0.9, backend="torch")
    torch.testing.assert_close(chunked.advantages, whole.advantages, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.returns, whole.returns, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs(backend, dtype):
    """Half-precision inputs are computed in fp32: the error is fp32's, on the rounded inputs."""
    rewards, values = torch.randn(3, 40).to(dtype), torch.randn(3, 40).to(dtype)
    mask = make_mask(3, 40, "right")
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=backend)
    want_adv, want_ret = oracle(rewards.double(), values.double(), mask, 1.0, 0.95)
    torch.testing.assert_close(adv.double(), want_adv, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), want_ret, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_leading_dims_and_mask_dtypes(backend):
    """Row slices of wider NaN-padded buffers are read in place; (2, 3, T) inputs; int and float masks."""
    length = 21
    buf_r = torch.full((6, length + 7), float("nan"))
    buf_v = torch.full((6, length + 7), float("nan"))
    rewards, values = buf_r[:, 3:3 + length], buf_v[:, 3:3 + length]
    rewards.copy_(torch.randn(6, length))
    values.copy_(torch.randn(6, length))
    mask = make_mask(6, length, "holes")
    want_adv, want_ret = oracle(rewards, values, mask, 0.99, 0.95)
    for m in (mask, mask.long(), mask.to(torch.uint8), mask.float(), mask.to(torch.bfloat16)):
        adv, ret = gae(rewards.view(2, 3, length), values.view(2, 3, length), m.view(2, 3, length),
                       gamma=0.99, lam=0.95, backend=backend)
        assert adv.shape == (2, 3, length)
        torch.testing.assert_close(adv.reshape(6, length).double(), want_adv, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ret.reshape(6, length).double(), want_ret, atol=2e-5, rtol=1e-5)


def test_row_result_does_not_depend_on_the_batch():
    rewards, values = torch.randn(5, 30), torch.randn(5, 30)
    mask = make_mask(5, 30, "holes")
    adv_all, _ = gae(rewards, values, mask, backend="triton")
    for i in (0, 2, 4):
        adv_one, _ = gae(rewards[i:i + 1], values[i:i + 1], mask[i:i + 1], backend="triton")
        assert torch.equal(adv_one[0], adv_all[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_differentiable(backend):
    rewards = torch.randn(2, 5, requires_grad=True)
    values = torch.randn(2, 5, requires_grad=True)
    out = gae(rewards, values, torch.ones(2, 5, dtype=torch.bool), backend=backend)
    assert not out.advantages.requires_grad and not out.returns.requires_grad


EMPTY_SHAPES = [(0,), (0, 4), (4, 0), (2, 0, 5), (3, 2, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_inputs(backend, shape):
    """No token (no row, or rows of length 0): empty float32 outputs of the inputs' shape."""
    rewards, values = torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape)
    out = gae(rewards, values, torch.zeros(shape, dtype=torch.bool), backend=backend)
    for x in out:
        assert x.shape == shape and x.dtype == torch.float32 and x.device == rewards.device


def test_backends_agree():
    rewards, values = torch.randn(4, 50), torch.randn(4, 50)
    mask = make_mask(4, 50, "holes")
    a = gae(rewards, values, mask, backend="torch")
    b = gae(rewards, values, mask, backend="triton")
    torch.testing.assert_close(a.advantages, b.advantages, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a.returns, b.returns, atol=2e-5, rtol=1e-5)


_R, _V, _M = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: gae([[1.0]], _V, _M), TypeError, "rewards"),
    (lambda: gae(_R.long(), _V, _M), TypeError, "rewards"),
    (lambda: gae(_R, _V.double(), _M), TypeError, "values"),
    (lambda: gae(_R, _V, _M.to(torch.complex64)), TypeError, "mask"),
    (lambda: gae(_R, _V[:, :4], _M), ValueError, "values"),
    (lambda: gae(_R, _V, _M[:1]), ValueError, "mask"),
    (lambda: gae(_R, _V, _M.to("meta")), ValueError, "mask"),
    (lambda: gae(_R, _V.to("meta"), _M), ValueError, "values"),
    (lambda: gae(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(True)), ValueError, "rewards"),
    (lambda: gae(_R, _V, _M, gamma=1.5), ValueError, "gamma"),
    (lambda: gae(_R, _V, _M, lam=-0.1), ValueError, "lam"),
    (lambda: gae(_R, _V, _M, gamma="1"), TypeError, "gamma"),
    (lambda: gae(_R, _V, _M, backend="cuda"), ValueError, "backend"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
