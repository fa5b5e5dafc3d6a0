"""linear_logprob_loss (the loss form of linear_token_logprobs) against float64 autograd, against the composed
op, its semantics and errors, and the fp16 gradients of the loss forms at production magnitudes.

On CPU the "triton" backend runs in the interpreter (on CUDA, the compiled kernels): a subset of the cases.
"""

from __future__ import annotations

import importlib
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from fastppo import algo
from fastppo.kernels import linear_logprob_loss, linear_ppo_loss, linear_token_logprobs

BACKENDS = ["torch", "triton"]
IGNORE = -100


def make_inputs(n, size_h, vocab, dtype, *, weighted):
    """hidden (2, n, H), weight (V, H) in dtype, labels with a fifth ignored, a loss weight (or None)."""
    hidden = torch.randn(2, n, size_h).to(dtype)
    weight = (torch.randn(vocab, size_h) * 3 / math.sqrt(size_h)).to(dtype)
    labels = torch.randint(0, vocab, (2, n))
    labels = torch.where(torch.rand(2, n) < 0.2, IGNORE, labels)
    labels[0, 0] = 1
    loss_weight = torch.rand(2, n) * 2 if weighted else None
    return hidden, weight, labels, loss_weight


def oracle(hidden, weight, labels, loss_weight, normalizer, temperature):
    """float64: −Σ w·lp / n and (d/dhidden, d/dweight) of 0.7·loss; terms = the sums of |products| behind each
    gradient entry (their float32 error scale)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    z = h @ w.T
    z.retain_grad()
    lp = algo.token_logprobs(z, labels, temperature=temperature).logprobs
    valid = labels != IGNORE
    n = valid.sum() if normalizer is None else normalizer
    loss = -(lp * (1.0 if loss_weight is None else loss_weight.double())).sum() / max(float(n), 1.0)
    (0.7 * loss).backward()
    return loss.detach(), lp.detach(), h.grad, w.grad


CASES = [(backend, dtype, weighted, chunk, temperature)
         for backend in BACKENDS
         for dtype in (torch.float32, torch.bfloat16, torch.float16)
         for weighted in (False, True)
         for chunk in (8, None)
         for temperature in (1.0, 0.8)
         # the interpreter: every switch, not every combination
         if backend == "torch" or (chunk is None) == (temperature == 1.0) == weighted]


@pytest.mark.parametrize("backend,dtype,weighted,chunk,temperature", CASES, ids=str)
def test_matches_float64(backend, dtype, weighted, chunk, temperature):
    """Loss, logprobs, dhidden and dweight on an odd shape (2 × 37 tokens, a fifth ignored, H = 33, V = 101),
    with a normalizer and an upstream gradient of 0.7. The logits are float32 whatever the input dtype, so the
    loss and logprobs are float32-accurate (2e-5 relative to their scale); the gradients carry two ulps of their
    dtype plus float32 accumulation error (4e-5 of the largest entry), as for linear_ppo_loss."""
    hidden, weight, labels, lw = make_inputs(37, 33, 101, dtype, weighted=weighted)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_logprob_loss(h, w, labels, loss_weight=lw, normalizer=50.0, temperature=temperature,
                              backend=backend, chunk_size=chunk)
    (0.7 * out.loss).backward()
    loss, lp, dh, dw = oracle(hidden, weight, labels, lw, 50.0, temperature)
    torch.testing.assert_close(out.loss.double(), loss, atol=2e-5 * (1 + loss.abs().item()), rtol=0)
    torch.testing.assert_close(out.logprobs.double(), lp, atol=2e-5 * (1 + lp.abs().max().item()), rtol=0)
    assert (out.logprobs[labels == IGNORE] == 0).all()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    for name, got, want in (("dhidden", h.grad, dh), ("dweight", w.grad, dw)):
        tol = 2 * eps * want.abs() + 4e-5 * want.abs().max()
        if hidden.is_cuda and dtype != torch.float32:           # half GEMMs take dlogits rounded to the dtype
            tol = tol + 2 * eps * want.abs().max()
        excess = ((got.double() - want).abs() - tol).max().item()
        assert excess <= 0, f"{name}: beyond the tolerance by {excess:.3g}"
    assert (h.grad[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_as_the_composed_op(backend):
    """The loss form gives linear_token_logprobs' numbers (then −Σ w·lp / n): the same float32 logits and row
    reductions, so the losses agree to float32 rounding of the sum and the gradients to the rounding of their
    GEMMs (the composed op's dlogits come from a recomputed GEMM of the same shape: the same values)."""
    hidden, weight, labels, lw = make_inputs(29, 16, 67, torch.float32, weighted=True)
    runs = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss = linear_logprob_loss(h, w, labels, loss_weight=lw, backend=backend, chunk_size=16).loss
        else:
            lp = linear_token_logprobs(h, w, labels, backend=backend, chunk_size=16)
            loss = -(lp * lw).sum() / (labels != IGNORE).sum()
        loss.backward()
        runs.append((loss, h.grad, w.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_backward_once_and_nothing_scored(backend):
    hidden, weight, labels, _ = make_inputs(9, 8, 31, torch.float32, weighted=False)
    with torch.no_grad():
        plain = linear_logprob_loss(hidden, weight, labels, backend=backend).loss
    h = hidden.clone().requires_grad_()
    out = linear_logprob_loss(h, weight, labels, backend=backend)
    assert torch.equal(out.loss.detach(), plain)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same result twice"):
        out.loss.backward()
    h = hidden.clone().requires_grad_()
    none = linear_logprob_loss(h, weight, torch.full_like(labels, IGNORE), backend=backend, normalizer=0.0)
    none.loss.backward()
    assert none.loss.item() == 0 and (h.grad == 0).all() and (none.logprobs == 0).all()


@pytest.mark.parametrize("over,exc,match", [
    (dict(loss_weight=torch.ones(3, dtype=torch.long)), TypeError, "loss_weight"),
    (dict(loss_weight=torch.ones(2)), ValueError, "loss_weight"),
    (dict(loss_weight=torch.ones(3, device="meta")), ValueError, "loss_weight"),
    (dict(normalizer=-1.0), ValueError, "normalizer"),
    (dict(labels=torch.tensor([0, 1, 9])), ValueError, "labels"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_bad_inputs(over, exc, match):
    if "labels" in over and torch.empty(0).device.type != "cpu":
        pytest.skip("label values are checked on CPU only")
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), labels=torch.tensor([0, 1, 2]))
    args.update({k: over.pop(k) for k in list(over) if k in args})
    with pytest.raises(exc, match=match):
        linear_logprob_loss(*args.values(), **over)


# ----------------------------------------------------------------------------
# fp16 at production magnitudes
# ----------------------------------------------------------------------------

@contextmanager
def half_gemm_plan():
    """On CPU, the plan of a GPU with fp16 inputs: GEMMs with float32 output from half operands, so the dlogits
    are rounded to fp16 before the backward GEMMs (CPU builds lack those GEMMs: computed in float32 from the
    same half operands, which is what cuBLAS's float32 accumulation gives up to summation order). On CUDA the
    real plan already is that one."""
    if torch.empty(0).device.type == "cuda":
        yield
        return
    mm, addmm = torch.mm, torch.addmm

    def mm_out_dtype(a, b, *dtype, out=None):
        return mm(a.float(), b.float(), out=out) if dtype else mm(a, b, out=out)

    def addmm_out_dtype(acc, a, b, *dtype, out=None, **kw):
        return addmm(acc, a.float(), b.float(), out=out, **kw) if dtype else addmm(acc, a, b, out=out, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("fastppo.kernels.linear_token_logprobs"), "_has_fp32_out_gemm",
                   lambda device, dtype: dtype != torch.float32)
        mp.setattr(torch, "mm", mm_out_dtype)
        mp.setattr(torch, "addmm", addmm_out_dtype)
        yield


N_TOKENS, VOCAB, SIZE_H, ROWS = 10_000, 151_936, 8, 16     # a minibatch token mean over Qwen2's vocabulary


def _production_inputs():
    torch.manual_seed(0)
    hidden = torch.randn(ROWS, SIZE_H).half()
    weight = (torch.randn(VOCAB, SIZE_H) / math.sqrt(SIZE_H)).half()
    return hidden, weight, torch.randint(0, VOCAB, (ROWS,))


@pytest.mark.parametrize("op", ["linear_logprob_loss", "linear_ppo_loss", "linear_token_logprobs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradients_survive_at_production_magnitudes(op, backend):
    """A token mean over n = 10⁴ tokens with V = 151936: dlogit_j = p_j / n ≈ 10⁻⁹·(p_j·V), below fp16's smallest
    subnormal (6·10⁻⁸); rounded to fp16 as they are, all but the label's vanish and dhidden loses the −E_p[W]
    term (checked below: a relative error of order 1). Scaled by a power of two before the cast (and
    unscaled after the GEMMs) each dlogit keeps fp16's relative precision u = 2⁻¹¹, so dhidden = Σ_j dlogit_j·W_j
    is off by at most u·Σ_j |dlogit_j·W_j| (`terms`) plus its own rounding to fp16. dW (~10⁻⁸ per entry) is
    checked under a GradScaler's 2¹⁶ loss scale, applied before the fp16 rounding (the loss forms keep dW in
    float32 until their backward; linear_token_logprobs' backward sees the scaled upstream gradient). Only
    the rows of one chunk: H = 8 keeps the GEMMs cheap on CPU."""
    hidden, weight, labels = _production_inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    with torch.no_grad():
        old = algo.token_logprobs(h64 @ w64.T, labels).logprobs.float()       # ratios ≈ 1
    with half_gemm_plan():
        if op == "linear_logprob_loss":
            loss16 = linear_logprob_loss(h, w, labels, normalizer=float(N_TOKENS), backend=backend,
                                         chunk_size=ROWS).loss
        elif op == "linear_token_logprobs":                       # the backward scales the upstream gradients
            loss16 = -linear_token_logprobs(h, w, labels, backend=backend, chunk_size=ROWS).sum() / N_TOKENS
        else:
            loss16 = linear_ppo_loss(h, w, labels, old, torch.ones(ROWS), torch.ones(ROWS, dtype=torch.bool),
                                     normalizer=float(N_TOKENS), backend=backend, chunk_size=ROWS).loss
        (2.0 ** 16 * loss16).backward()
    # float64: d loss / d logprob ≈ −1 / n per token for both ops (PPO's: A = 1, ρ ≈ 1, unclipped).
    z = h64 @ w64.T
    z.retain_grad()
    lp = algo.token_logprobs(z, labels).logprobs
    loss = -(lp - old.double()).exp().sum() / N_TOKENS if op == "linear_ppo_loss" else -lp.sum() / N_TOKENS
    (2.0 ** 16 * loss).backward()
    terms_h = z.grad.abs() @ w64.detach().abs()                     # Σ_j |dlogit_j·W_j| per dhidden entry
    terms_w = z.grad.abs().T @ h64.detach().abs()
    u = 2.0 ** -11
    for name, got, want, terms in (("dhidden", h.grad, h64.grad, terms_h), ("dweight", w.grad, w64.grad, terms_w)):
        assert got.dtype == torch.float16
        tol = 2 * u * want.abs() + 2 * u * terms
        excess = ((got.double() - want).abs() - tol).max().item()
        assert excess <= 0, f"{name}: beyond the fp16 tolerance by {excess:.3g}"
    # Unscaled, the same dlogits flush to zero: the check above can fail.
    naive = (z.grad / 2.0 ** 16).half().double() @ w64.detach() * 2.0 ** 16
    assert (naive - h64.grad).abs().max() > 0.1 * h64.grad.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_not_read(backend):
    """Hidden rows of ignored tokens may hold anything (NaN padding): the loss and gradients do not see them."""
    hidden, weight, labels, lw = make_inputs(13, 8, 31, torch.float32, weighted=True)
    runs = []
    for fill in (0.0, float("nan")):
        h = torch.where((labels == IGNORE)[..., None], fill, hidden).requires_grad_()
        w = weight.clone().requires_grad_()
        out = linear_logprob_loss(h, w, labels, loss_weight=lw, backend=backend, chunk_size=8)
        out.loss.backward()
        runs.append((out.loss, h.grad, w.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
