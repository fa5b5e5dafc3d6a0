"""token_logprobs against a float64 oracle, its properties, and its errors.

On CPU the "triton" backend runs in the interpreter; on CUDA, the compiled kernels
(see tests/kernels/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastppo import algo
from fastppo.kernels import token_logprobs
from fastppo_testing.devices import VALUES_CHECKED_ON_CPU_ONLY, batch_size_invariant
from fastppo_testing.tolerances import assert_within, logprob_entropy_tolerance

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int = -100):
    """float64 logprobs and entropy; ignored positions give 0 (and so no gradient)."""
    return algo.token_logprobs(logits.double(), labels, temperature=temperature, ignore_index=ignore_index)


def plain(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int = -100):
    """What a trainer writes by hand, in float32: the error budget for the fused op."""
    return algo.token_logprobs(logits.float(), labels, temperature=temperature, ignore_index=ignore_index)


def forward_backward(fn, logits, labels, g_lp, g_ent, temperature, dtype=None):
    x = logits.detach().clone().requires_grad_()
    lp, ent = fn(x, labels, temperature)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach().double(), ent.detach().double(), x.grad.double()


def make_logits(shape, dtype, *, scale=3.0, noncontiguous=False):
    """Random logits; non-contiguous as a last-dim slice of a wider NaN-padded
    buffer, so an out-of-bounds read would show up as NaN."""
    if not noncontiguous:
        return (torch.randn(shape) * scale).to(dtype)
    *lead, v = shape
    buf = torch.full((*lead, v + 11), float("nan"), dtype=dtype)
    view = buf[..., 5:5 + v]
    view.copy_((torch.randn(shape) * scale).to(dtype))
    return view


def assert_within_budget(name, got, want, plain_value, atol):
    err = (got - want).abs().max().item()
    budget = 2 * (plain_value - want).abs().max().item() + atol
    assert err <= budget, f"{name}: max error {err:.3g} > 2 x plain error + atol = {budget:.3g}"


CASES = [
    # (leading shape, V)
    ((7,), 1),
    ((5,), 33),
    ((1,), 4099),           # a single row
    ((2, 9), 4099),         # leading dims
    ((3,), 50257),          # GPT-2 vocabulary
    ((2,), 70000),          # more than one interpreter block
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_oracle(backend, dtype, lead, vocab, temperature):
    noncontiguous = vocab == 4099 and len(lead) == 2
    logits = make_logits((*lead, vocab), dtype, noncontiguous=noncontiguous)
    labels = torch.randint(0, vocab, lead)
    labels.view(-1)[0] = -100                                   # an ignored position
    g_lp, g_ent = torch.randn(lead), torch.randn(lead)

    def fused(x, y, t):
        return token_logprobs(x, y, temperature=t, return_entropy=True, backend=backend)

    lp, ent, grad = forward_backward(fused, logits, labels, g_lp, g_ent, temperature)
    lp64, ent64, grad64 = forward_backward(oracle, logits.double(), labels, g_lp.double(), g_ent.double(), temperature)
    lp32, ent32, grad32 = forward_backward(plain, logits, labels, g_lp, g_ent, temperature)

    assert lp.dtype == ent.dtype == torch.float64  # converted above; the op returns float32
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert_within_budget("logprobs", lp, lp64, lp32, atol=1e-5)
    assert_within_budget("entropy", ent, ent64, ent32, atol=1e-5)
    # Gradients are stored in the input dtype: allow one ulp of it on top (the interpreter truncates
    # the float32 -> half store, a GPU rounds to nearest: both within one ulp).
    ulp = torch.finfo(dtype).eps * grad64.abs().max().item()
    # dlogit_j = (g_lp·([j = label] − p_j) − g_ent·p_j·(log p_j + H)) / T: an error δ in p_j's exponent moves
    # it by at most δ·p_j·(|g_lp| + |g_ent|·(|log p_j| + H + 1)) / T (not by δ·|dlogit_j|: at p_j ≈ 1 the label
    # term cancels). The exponent x_j/T − lse has an absolute float32 error of about u·(|x_j/T| + |lse| + 2)
    # ≤ u·(2·max|x/T| + log V + 2), twice that for the two evaluations; a GPU's exp2 (PTX ex2.approx.f32)
    # adds a relative error of at most 2^-22. This bounds any evaluation order (the plain computation's
    # included, so "2 x plain" alone is not a bound).
    u = torch.finfo(torch.float32).eps / 2
    span = 2 * logits.float().abs().max().item() / temperature + math.log(vocab) + 2
    p64 = torch.softmax(logits.double() / temperature, -1)
    p_logp = torch.special.xlogy(p64, p64).abs()
    g_lp64, g_ent64 = g_lp.double().abs()[..., None], g_ent.double().abs()[..., None]
    moved = (p64 * (g_lp64 + g_ent64 * (ent64.abs()[..., None] + 1)) + g_ent64 * p_logp) / temperature
    atol = 1e-6 + ulp + (2 * u * span + 2.0 ** -22) * moved.max().item()
    assert_within_budget("dlogits", grad, grad64, grad32, atol=atol)
    # Ignored position: zero output, zero gradient.
    first = (0,) * len(lead)
    assert lp[first] == 0 and ent[first] == 0 and (grad[first] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtypes_and_grad_dtype(backend):
    logits = torch.randn(4, 100, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 100, (4,))
    out = token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert out.logprobs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    out.logprobs.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert isinstance(token_logprobs(logits, labels, backend=backend), torch.Tensor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_output_used(backend):
    """Gradient of entropy alone, and of logprobs alone, each match the oracle."""
    logits = torch.randn(6, 257)
    labels = torch.randint(0, 257, (6,))
    for which in (0, 1):
        x = logits.clone().requires_grad_()
        token_logprobs(x, labels, return_entropy=True, backend=backend)[which].sum().backward()
        x64 = logits.double().requires_grad_()
        oracle(x64, labels, 1.0)[which].sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend):
    vocab = 1000
    labels = torch.randint(0, vocab, (6,))
    rows = torch.randn(6, vocab) * 5
    lp, ent = token_logprobs(rows, labels, return_entropy=True, backend=backend)
    assert (lp <= 0).all()
    assert (ent >= -1e-6).all() and (ent <= math.log(vocab) + 1e-5).all()
    # Adding a constant to a row changes nothing.
    # Both results against the exact answer, which the shift leaves alone: the error bounds of each, the shifted
    # row's with the rounding of rows + c to float32 as its logits' error (fastppo_testing.tolerances).
    c = torch.randn(6, 1) * 100
    shifted = rows + c
    lp2, ent2 = token_logprobs(shifted, labels, return_entropy=True, backend=backend)
    tol_lp, tol_ent = logprob_entropy_tolerance(rows, labels)
    tol_lp2, tol_ent2 = logprob_entropy_tolerance(shifted, labels,
                                                  (shifted.double() - (rows.double() + c.double())).abs())
    assert_within("logprobs", lp2, lp, tol_lp + tol_lp2)
    assert_within("entropy", ent2, ent, tol_ent + tol_ent2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, dtype):
    vocab = 777
    labels = torch.randint(0, vocab, (4,))
    cases = {
        "huge": (torch.randn(4, vocab) * 1e4),
        "all_negative": torch.full((4, vocab), -1000.0) + torch.randn(4, vocab),  # a max started at 0 breaks this
        "one_hot": torch.where(torch.arange(vocab) == 3, 1e4, -1e4).expand(4, vocab).clone(),
        "constant": torch.zeros(4, vocab),
    }
    for name, x in cases.items():
        x = x.to(dtype).requires_grad_()
        lp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()
        want_lp, want_ent = oracle(x.detach(), labels, 1.0)
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all(), name
        assert (lp <= 0).all() and (ent >= -1e-5).all(), name
        # Logits up to ~4e4 ("huge"): float32 rounding of x_y and lse alone is ~2e-3 (fastppo_testing.tolerances).
        tol_lp, tol_ent = logprob_entropy_tolerance(x.detach().double(), labels)
        assert_within(f"{name} logprobs", lp, want_lp, tol_lp)
        assert_within(f"{name} entropy", ent, want_ent, tol_ent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits(backend):
    """Masked-out vocabulary entries (-inf) have probability 0 and do not poison anything."""
    x = torch.randn(3, 300)
    x[:, 100:] = float("-inf")
    labels = torch.tensor([1, 50, 99])
    x.requires_grad_()
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    want_lp, want_ent = oracle(x.detach()[:, :100], labels, 1.0)
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(x.grad).all() and (x.grad[:, 100:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e4, float("nan")], ids=["normal", "huge", "nan"])
def test_ignored_rows_have_zero_outputs_and_gradients(backend, scale):
    """A fully ignored batch, and ignored rows beside kept ones: logprob, entropy and gradient 0, also for
    logits far above exp's range (an ignored row's saved lse is 0: its p must not become 2^(x·log2 e)) and for
    NaN and inf ones (e.g. a padding position's hidden state)."""
    x = torch.randn(2, 3, 50) * scale if scale == scale else torch.randn(2, 3, 50)
    if scale != scale:
        x[..., ::3], x[..., 1::3] = float("nan"), float("inf")
    x.requires_grad_()
    labels = torch.full((2, 3), -100)
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (x.grad == 0).all()

    x.grad = None
    labels[0, 1] = 7
    if scale != scale:
        x.data[0, 1] = torch.randn(50)                      # the kept row: finite logits
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    ignored = labels == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (x.grad[ignored] == 0).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_labels(backend):
    x = torch.randn(4, 64)
    labels = torch.tensor([3, 7, 7, 60], dtype=torch.int32)
    lp = token_logprobs(x, labels, ignore_index=7, backend=backend)
    want, _ = oracle(x, labels.long(), 1.0, ignore_index=7)
    torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-5)
    assert lp[1] == 0 and lp[2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_result_does_not_depend_on_the_batch(backend):
    """Bitwise: a row's logprob and entropy are the same alone and next to different rows (alone only where the
    backend is batch-size invariant: not the torch backend on CUDA, see `batch_size_invariant`)."""
    vocab = 3001
    batch = torch.randn(9, vocab)
    labels = torch.randint(0, vocab, (9,))
    lp_all, ent_all = token_logprobs(batch, labels, return_entropy=True, backend=backend)
    for i in (0, 4, 8) if batch_size_invariant(backend) else ():
        lp_one, ent_one = token_logprobs(batch[i:i + 1], labels[i:i + 1], return_entropy=True, backend=backend)
        assert torch.equal(lp_one[0], lp_all[i]) and torch.equal(ent_one[0], ent_all[i])
    other = torch.cat([batch[:3], torch.randn(6, vocab) * 50])
    lp_mixed = token_logprobs(other, torch.cat([labels[:3], labels[3:]]), backend=backend)
    assert torch.equal(lp_mixed[:3], lp_all[:3])


def test_backends_agree_and_dispatch(monkeypatch):
    x = torch.randn(5, 4099)
    y = torch.randint(0, 4099, (5,))
    a = token_logprobs(x, y, backend="torch")
    b = token_logprobs(x, y, backend="triton")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("FASTPPO_BACKEND", "triton")
    torch.testing.assert_close(token_logprobs(x, y), b, atol=0, rtol=0)
    monkeypatch.setenv("FASTPPO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTPPO_BACKEND"):
        token_logprobs(x, y)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTPPO_BACKEND")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        token_logprobs(x.cpu(), y.cpu(), backend="triton")


@pytest.mark.parametrize("call,exc,match", [
    (lambda: token_logprobs([[1.0]], torch.tensor([0])), TypeError, "logits"),
    (lambda: token_logprobs(torch.randn(3, 5).long(), torch.tensor([0, 1, 2])), TypeError, "logits"),
    (lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    (lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0, 1])), ValueError, "labels"),
    pytest.param(lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 5])), ValueError, "labels",
                 marks=VALUES_CHECKED_ON_CPU_ONLY),
    pytest.param(lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0, -1, 2])), ValueError, "labels",
                 marks=VALUES_CHECKED_ON_CPU_ONLY),
    (lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), temperature=0.0), ValueError, "temperature"),
    (lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), temperature=-1.0), ValueError, "temperature"),
    (lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), backend="cuda"), ValueError, "backend"),
    (lambda: token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2], device="meta")), ValueError, "labels"),
    (lambda: token_logprobs(torch.randn(3, 0), torch.tensor([0, 1, 2])), ValueError, "logits"),
    (lambda: token_logprobs(torch.randn(()), torch.tensor(0)), ValueError, "logits"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
