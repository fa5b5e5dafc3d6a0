"""linear_token_logprobs against a float64 oracle, its properties, memory and errors.

On CPU the "triton" backend runs in the interpreter (on CUDA, the compiled
kernels; see tests/kernels/conftest.py), so its cases are a chosen subset (the
interpreter costs ~1 ms per program); the torch backend gets the full grid.
The matmuls are torch.mm in both.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastppo import algo
from fastppo.kernels import linear_token_logprobs
from fastppo.kernels.linear_token_logprobs import DEFAULT_CHUNK_BUDGET_BYTES, chunk_budget_bytes, chunk_rows
from fastppo_testing.devices import VALUES_CHECKED_ON_CPU_ONLY, batch_size_invariant, on_test_device
from fastppo_testing.tolerances import assert_within, gemm_error, logprob_entropy_tolerance

IGNORE = -100
BACKENDS = ["torch", "triton"]
FORWARDS = [*BACKENDS, "triton-fused"]      # the triton backend with its fused kernels


def use_forward(monkeypatch, name):
    """The backend of a FORWARDS name; "triton-fused" turns FASTPPO_LINEAR_FUSED on."""
    monkeypatch.setenv("FASTPPO_LINEAR_FUSED", "1" if name == "triton-fused" else "0")
    return name.removesuffix("-fused")


# ----------------------------------------------------------------------------
# Oracle, plain PyTorch, inputs
# ----------------------------------------------------------------------------

def oracle(hidden, weight, labels, temperature, ignore_index=IGNORE):
    """float64: hidden @ weightᵀ -> log-softmax -> gather (+ entropy)."""
    return algo.token_logprobs(hidden.double() @ weight.double().T, labels, temperature=temperature,
                               ignore_index=ignore_index)


def plain(hidden, weight, labels, temperature, ignore_index=IGNORE):
    """What a trainer writes by hand, in the input dtype: the error budget for the fused op."""
    return algo.token_logprobs(F.linear(hidden, weight).float(), labels, temperature=temperature,
                               ignore_index=ignore_index)


def fused(backend, chunk_size=None):
    def fn(hidden, weight, labels, temperature, ignore_index=IGNORE):
        return linear_token_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True,
                                     ignore_index=ignore_index, backend=backend, chunk_size=chunk_size)
    return fn


def forward_backward(fn, hidden, weight, labels, g_lp, g_ent, temperature, *, cast=None):
    """Outputs and (dhidden, dweight) of sum(g_lp·logprobs + g_ent·entropy), as float64."""
    h = hidden.detach().clone()
    w = weight.detach().clone()
    if cast is not None:
        h, w = h.to(cast), w.to(cast)
    h.requires_grad_()
    w.requires_grad_()
    lp, ent = fn(h, w, labels, temperature)
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return [t.detach().double() for t in (lp, ent, h.grad, w.grad)]


def make_inputs(n, size_h, vocab, dtype, *, scale=3.0):
    """Logits of standard deviation `scale`; one ignored row (the middle one) when n > 1."""
    hidden = torch.randn(n, size_h).to(dtype)
    weight = (torch.randn(vocab, size_h) * scale / math.sqrt(size_h)).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    if n > 1:
        labels[n // 2] = IGNORE
    return hidden, weight, labels


def gemm_error_scales(hidden, weight, labels, g_lp, g_ent, temperature):
    """Σ_v m_v·|w_v| for each dhidden entry and Σ_n m_n·|h_n| for each dW entry (float64), with m the
    magnitude of the terms that make up a dlogit: dlogit_v = (g_lp·(1[v=y] − p_v) − g_ent·p_v·(log p_v + H)) / T,
    so m_v = (|g_lp|·(1[v=y] + p_v) + |g_ent|·p_v·(|log p_v| + H)) / T.

    dhidden = dlogits @ W and dW = dlogitsᵀ @ hidden are sums of products whose terms cancel (a row of
    dlogits sums to 0, and each dlogit is itself a difference), so an entry can be far smaller than its
    terms; its float32 rounding error scales with these absolute sums, not with the entry (Higham,
    Accuracy and Stability of Numerical Algorithms, §3.1).
    """
    h, w = hidden.double(), weight.double()
    x = (h @ w.T) / temperature
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1, keepdim=True)
    valid = (labels != IGNORE)[:, None].double()
    onehot = torch.zeros_like(p).scatter_(-1, torch.where(labels != IGNORE, labels, 0)[:, None], 1.0)
    m = valid * (g_lp.double().abs()[:, None] * (onehot + p)
                 + g_ent.double().abs()[:, None] * p * (logp.abs() + ent)) / temperature
    return m @ w.abs(), m.T @ h.abs()


def dlogit_relative_error(hidden, weight, temperature, lam=8.0):
    """Bound on the relative float32 error of each dlogit, in ulps. p = exp(x/T − lse) turns the absolute
    error of its argument into a relative error of p: the rounding of x/T and lse, (|x/T| + |lse|)·eps, and
    the float32 GEMM error of the logit (and, through its softmax average, of lse), λ·√H·eps·Σ_k|h_k·w_k|/T
    each; +4 ulps for the rest of the arithmetic."""
    h, w = hidden.double(), weight.double()
    x = (h @ w.T) / temperature
    gemm = lam * math.sqrt(h.shape[-1]) * (h.abs() @ w.abs().T) / temperature
    return (x.abs() + torch.logsumexp(x, dim=-1, keepdim=True).abs() + 2 * gemm).max().item() + 4


def float32_sum_tolerance(scale, n_terms, dlogit_ulps, lam=8.0):
    """Rounding error of a float32 sum of `n_terms` products a·b with Σ|a·b| = scale, each a off by
    `dlogit_ulps` relative ulps: (λ·√K + dlogit_ulps)·eps·scale. Rounding errors of a long sum behave
    like independent zero-mean variables, so they grow as √K (the probabilistic bound of Higham & Mary,
    SIAM J. Sci. Comput. 2019), exceeded with probability below exp(−λ²/2) ≈ 1e-14 at λ = 8."""
    return (lam * math.sqrt(n_terms) + dlogit_ulps) * torch.finfo(torch.float32).eps * scale


def assert_within_budget(name, got, want, plain_value, atol):
    err = (got - want).abs().max().item()
    budget = 2 * (plain_value - want).abs().max().item() + atol
    assert err <= budget, f"{name}: max error {err:.3g} > 2 x plain error + atol = {budget:.3g}"


def check_against_oracle(backend, n, size_h, vocab, dtype, temperature, chunk_size):
    hidden, weight, labels = make_inputs(n, size_h, vocab, dtype)
    g_lp, g_ent = torch.randn(n), torch.randn(n)
    got = forward_backward(fused(backend, chunk_size), hidden, weight, labels, g_lp, g_ent, temperature)
    want = forward_backward(oracle, hidden, weight, labels, g_lp.double(), g_ent.double(), temperature,
                            cast=torch.float64)
    base = forward_backward(plain, hidden, weight, labels, g_lp, g_ent, temperature)
    for name, t in zip(("logprobs", "entropy", "dhidden", "dweight"), got):
        assert torch.isfinite(t).all(), name
    for name, g, w, b in zip(("logprobs", "entropy"), got[:2], want[:2], base[:2]):
        assert_within_budget(name, g, w, b, atol=1e-5 * (1 + w.abs().max().item()))
    # Gradients are stored in the input dtype: allow one ulp of it on top.
    for name, g, w, b in zip(("dhidden", "dweight"), got[2:], want[2:], base[2:]):
        ulp = torch.finfo(dtype).eps * w.abs().max().item()
        assert_within_budget(name, g, w, b, atol=1e-5 * w.abs().max().item() + ulp)
    # The logits are float32 whatever the input dtype (exact products of the
    # inputs, float32 sums), so even bf16 inputs give float32-accurate outputs,
    # far inside the plain bf16 budget above.
    for name, g, w in zip(("logprobs", "entropy"), got[:2], want[:2]):
        err = (g - w).abs().max().item()
        assert err <= 2e-5 * (1 + w.abs().max().item()), f"{name}: {err:.3g} is not float32-accurate"
    # dW is summed in float32 across chunks and rounded once (likewise dhidden):
    # within one ulp of the input dtype per element, plus the float32 summation
    # error (sums of V products for dhidden, of n for dW; see
    # float32_sum_tolerance). Not on
    # CUDA with half inputs: there the GEMMs take dlogits rounded to the input
    # dtype (cuBLAS float32-output path), so an entry's error is bounded by
    # eps·Σ_v |dlogit_v·w_v| instead, which only the budget above covers.
    rounded_dlogits = hidden.is_cuda and dtype != torch.float32
    scales = gemm_error_scales(hidden, weight, labels, g_lp, g_ent, temperature)
    ulps = dlogit_relative_error(hidden, weight, temperature)
    for name, g, w, scale, k in zip(("dhidden", "dweight"), got[2:], want[2:], scales, (vocab, n)) \
            if not rounded_dlogits else ():
        tol = torch.finfo(dtype).eps * w.abs() + float32_sum_tolerance(scale.to(w.device), k, ulps)
        worst = ((g - w).abs() - tol).max().item()
        assert worst <= 0, f"{name}: beyond one {dtype} ulp + float32 error by {worst:.3g}"
    if n > 1:  # the ignored row: zero outputs, no gradient
        mid = n // 2
        assert got[0][mid] == 0 and got[1][mid] == 0 and (got[2][mid] == 0).all()


# ----------------------------------------------------------------------------
# Against the float64 oracle
# ----------------------------------------------------------------------------

def _chunk(n, kind):
    """A chunk size that divides N, or one that leaves a padded last chunk."""
    return {"divides": {1: 1, 37: 37, 300: 100}[n], "pads": {1: 16, 37: 16, 300: 128}[n]}[kind]


@pytest.mark.parametrize("temperature", [1.0, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1003, 4099])
@pytest.mark.parametrize("size_h", [33, 64])
@pytest.mark.parametrize("n", [1, 37, 300])
def test_torch_backend_matches_oracle(n, size_h, vocab, dtype, temperature):
    # Both chunk kinds for every (N, V, dtype): which one alternates with (H, temperature).
    chunk_kind = "pads" if (size_h == 33) != (temperature == 0.9) else "divides"
    check_against_oracle("torch", n, size_h, vocab, dtype, temperature, _chunk(n, chunk_kind))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 37, 300])
def test_torch_backend_gpt2_vocab(n, dtype):
    check_against_oracle("torch", n, 33, 50257, dtype, 0.9, _chunk(n, "pads"))


TRITON_CASES = [
    # (N, H, V, dtype, temperature, chunk kind): the interpreter is slow, so a chosen subset.
    (1, 33, 1003, torch.float32, 1.0, "pads"),
    (37, 33, 1003, torch.float32, 0.9, "divides"),
    (37, 64, 4099, torch.bfloat16, 0.9, "pads"),
    (300, 64, 1003, torch.bfloat16, 1.0, "pads"),
    (300, 33, 4099, torch.float32, 0.9, "divides"),
    (1, 64, 50257, torch.float32, 1.0, "divides"),
    (37, 33, 50257, torch.bfloat16, 0.9, "pads"),     # odd large vocabulary
]


@pytest.mark.parametrize("n,size_h,vocab,dtype,temperature,chunk_kind", TRITON_CASES, ids=str)
def test_triton_backend_matches_oracle(n, size_h, vocab, dtype, temperature, chunk_kind):
    check_against_oracle("triton", n, size_h, vocab, dtype, temperature, _chunk(n, chunk_kind))


# The triton backend's fused kernels (GEMM tiles, the row statistics or the dlogits in the epilogue, no logits
# in memory), opt-in by FASTPPO_LINEAR_FUSED.
FUSED_CASES = [
    (1, 33, 1003, torch.float32, 1.0),
    (37, 64, 4099, torch.bfloat16, 0.9),
    (300, 33, 1003, torch.float16, 0.9),
    (37, 48, 515, torch.float32, 0.9),       # 17 tiles of 32 columns under the interpreter: 6 splits of 3
]


@pytest.mark.parametrize("n,size_h,vocab,dtype,temperature", FUSED_CASES, ids=str)
def test_fused_kernels_match_oracle(monkeypatch, n, size_h, vocab, dtype, temperature):
    monkeypatch.setenv("FASTPPO_LINEAR_FUSED", "1")
    check_against_oracle("triton", n, size_h, vocab, dtype, temperature, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_kernels_are_the_chunked_path_with_padding_rows(monkeypatch, dtype):
    """vocab_size < V (alignment padding rows of the weight): excluded from the softmax by both paths, which
    agree to float32 rounding (the same exact products, summed in another order), forward and backward; the
    padding rows get no gradient."""
    hidden, weight, labels = make_inputs(29, 40, 1000, dtype)
    labels[labels >= 997] = 5
    g_lp, g_ent = torch.randn(29), torch.randn(29)
    kw = dict(temperature=0.9, return_entropy=True, vocab_size=997, backend="triton", chunk_size=16)

    def run():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_token_logprobs(h, w, labels, **kw)
        (out.logprobs * g_lp + out.entropy * g_ent).sum().backward()
        return out.logprobs.detach(), out.entropy.detach(), h.grad.float(), w.grad.float()

    chunked = run()
    monkeypatch.setenv("FASTPPO_LINEAR_FUSED", "1")
    got = run()
    h64, w64 = hidden.double().requires_grad_(), weight[:997].double().requires_grad_()
    want_lp, want_ent = oracle(h64, w64, labels, 0.9)
    (want_lp * g_lp + want_ent * g_ent).sum().backward()
    for a, b, w in zip(got[:2], chunked[:2], (want_lp.detach(), want_ent.detach())):
        atol = 2e-5 * (1 + w.abs().max().item())          # float32 logits either way
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
        torch.testing.assert_close(a.double(), w, atol=atol, rtol=0)
    for name, grads, w in (("dhidden", (got[2], chunked[2]), h64.grad), ("dweight", (got[3][:997], chunked[3][:997]),
                                                                         w64.grad)):
        tol = torch.finfo(dtype).eps * w.abs() + 1e-5 * w.abs().max()   # one ulp of the stored dtype + float32
        for g in grads:
            assert ((g.double() - w).abs() <= tol).all(), name
    assert (got[3][997:] == 0).all() and (chunked[3][997:] == 0).all()


def test_the_backward_follows_its_forwards_switch(monkeypatch):
    """FASTPPO_LINEAR_FUSED is read when the forward runs; its backward runs the same path whatever the variable
    says by then (a benchmark or a context manager may have changed it in between)."""
    module = importlib.import_module("fastppo.kernels.linear_token_logprobs")
    calls = []
    real = module._fused_dlogits
    monkeypatch.setattr(module, "_fused_dlogits", lambda *a: calls.append(1) or real(*a))
    hidden, weight, labels = make_inputs(5, 16, 64, torch.float32)
    for on in (True, False):
        monkeypatch.setenv("FASTPPO_LINEAR_FUSED", "1" if on else "0")
        h = hidden.clone().requires_grad_()
        lp = linear_token_logprobs(h, weight, labels, backend="triton")
        monkeypatch.setenv("FASTPPO_LINEAR_FUSED", "0" if on else "1")
        calls.clear()
        lp.sum().backward()
        assert bool(calls) == on


def test_fused_switch_is_named(monkeypatch):
    hidden, weight, labels = make_inputs(3, 16, 64, torch.float32)
    monkeypatch.setenv("FASTPPO_LINEAR_FUSED", "yes please")
    with pytest.raises(ValueError, match="FASTPPO_LINEAR_FUSED must be 0 or 1"):
        linear_token_logprobs(hidden, weight, labels, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_chunk_size(backend, dtype):
    check_against_oracle(backend, 37, 64, 4099, dtype, 0.9, None)


@pytest.mark.parametrize("backend", FORWARDS)
def test_leading_dims_and_noncontiguous_inputs(monkeypatch, backend):
    """(B, T, H) hidden as a transposed view, weight as a slice of a NaN-padded buffer
    (an out-of-bounds read would show as NaN), non-contiguous labels."""
    backend = use_forward(monkeypatch, backend)
    b, t, size_h, vocab = 3, 5, 24, 1003
    hidden = torch.randn(t, b, size_h).transpose(0, 1)                      # (B, T, H), non-contiguous
    buf = torch.full((vocab, size_h + 7), float("nan"))
    weight = buf[:, 3:3 + size_h]
    weight.copy_(torch.randn(vocab, size_h))
    labels = torch.randint(0, vocab, (t, b)).T                              # (B, T), non-contiguous
    labels[1, 2] = IGNORE
    g_lp, g_ent = torch.randn(b, t), torch.randn(b, t)

    h = hidden.clone().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not h.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    w = weight.detach().requires_grad_()
    lp, ent = linear_token_logprobs(h, w, labels, temperature=0.9, return_entropy=True, backend=backend,
                                    chunk_size=4)
    assert lp.shape == ent.shape == (b, t) and lp.dtype == ent.dtype == torch.float32
    (lp * g_lp + ent * g_ent).sum().backward()
    assert h.grad.shape == (b, t, size_h) and w.grad.shape == (vocab, size_h)

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    lp64, ent64 = oracle(h64, w64, labels, 0.9)
    (lp64 * g_lp + ent64 * g_ent).sum().backward()
    torch.testing.assert_close(lp.double(), lp64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_and_grad_dtypes(backend):
    hidden = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(100, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 100, (6,))
    out = linear_token_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    assert out.logprobs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    out.logprobs.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert isinstance(linear_token_logprobs(hidden, weight, labels, backend=backend), torch.Tensor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_and_one_input_at_a_time(backend):
    """Entropy alone, logprobs alone; a frozen weight (no dW work) and a frozen hidden."""
    hidden, weight, labels = make_inputs(9, 16, 257, torch.float32)
    for which in (0, 1):
        for grad_h, grad_w in ((True, True), (True, False), (False, True)):
            h = hidden.clone().requires_grad_(grad_h)
            w = weight.clone().requires_grad_(grad_w)
            linear_token_logprobs(h, w, labels, return_entropy=True, backend=backend,
                                  chunk_size=4)[which].sum().backward()
            h64 = hidden.double().requires_grad_()
            w64 = weight.double().requires_grad_()
            oracle(h64, w64, labels, 1.0)[which].sum().backward()
            assert (h.grad is None) == (not grad_h) and (w.grad is None) == (not grad_w)
            if grad_h:
                torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
            if grad_w:
                torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradient(backend):
    """lm_head tied to the input embedding: its gradient sums both uses."""
    vocab, size_h, b, t = 1003, 32, 2, 9
    emb = torch.randn(vocab, size_h) * 0.5
    mix = torch.randn(size_h, size_h) / math.sqrt(size_h)
    tokens = torch.randint(0, vocab, (b, t + 1))
    labels = tokens[:, 1:].clone()
    labels[0, -1] = IGNORE
    g_lp, g_ent = torch.randn(b, t), torch.randn(b, t)

    def run(table, op):
        table = table.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(tokens[:, :-1], table) @ mix.to(table.dtype))   # (B, T, H)
        lp, ent = op(hidden, table, labels)
        (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
        return table.grad.double()

    got = run(emb, lambda h, w, y: linear_token_logprobs(h, w, y, return_entropy=True, backend=backend,
                                                         chunk_size=8))
    want = run(emb.double(), lambda h, w, y: oracle(h, w, y, 1.0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FORWARDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_and_all_negative_logits(monkeypatch, backend, dtype):
    backend = use_forward(monkeypatch, backend)
    n, size_h, vocab = 7, 16, 777
    labels = torch.randint(0, vocab, (n,))
    hidden_pos = torch.rand(n, size_h) + 0.5
    cases = {
        # Every logit about -1e3 (a running max started at 0 instead of -inf gives logprob > 0 here).
        "all_negative": (hidden_pos, -(torch.rand(vocab, size_h) + 0.5) * 1000 / size_h),
        "huge": (torch.randn(n, size_h) * 100, torch.randn(vocab, size_h) * 100 / math.sqrt(size_h)),
        "constant": (torch.zeros(n, size_h), torch.randn(vocab, size_h)),
    }
    for name, (hidden, weight) in cases.items():
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        lp, ent = linear_token_logprobs(h, w, labels, return_entropy=True, backend=backend, chunk_size=4)
        (lp.sum() + ent.sum()).backward()
        if name == "all_negative":
            assert (h.detach().float() @ w.detach().float().T).max() < -100
        want_lp, want_ent = oracle(h.detach(), w.detach(), labels, 1.0)
        for t in (lp, ent, h.grad, w.grad):
            assert torch.isfinite(t).all(), name
        assert (lp <= 0).all(), name
        assert (ent >= -1e-5).all() and (ent <= math.log(vocab) + 1e-5).all(), name
        # Logits up to ~1e4 ("huge"): float32 GEMM and rounding errors of ~1e-2 (fastppo_testing.tolerances).
        tol_lp, tol_ent = logprob_entropy_tolerance(h.detach().double() @ w.detach().double().T, labels,
                                                    gemm_error(h, w))
        assert_within(f"{name} logprobs", lp, want_lp, tol_lp)
        assert_within(f"{name} entropy", ent, want_ent, tol_ent)


@pytest.mark.parametrize("backend", FORWARDS)
def test_fully_ignored_batch_and_empty_batch(monkeypatch, backend):
    backend = use_forward(monkeypatch, backend)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    lp, ent = linear_token_logprobs(hidden, weight, torch.full((2, 3), IGNORE), return_entropy=True,
                                    backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (hidden.grad == 0).all() and (weight.grad == 0).all()

    # Ignored rows whose logits (~1e3) are far above exp's range, or whose hidden states are NaN (a padding
    # position's), beside a kept row: no gradient, no NaN.
    labels = torch.full((2, 3), IGNORE)
    labels[1, 2] = 4
    for bad in (hidden.detach() * 40, torch.where(labels[..., None] == IGNORE, float("nan"), hidden.detach())):
        big = bad.clone().requires_grad_()
        weight.grad = None
        lp, ent = linear_token_logprobs(big, weight, labels, return_entropy=True, backend=backend, chunk_size=4)
        (lp.sum() + ent.sum()).backward()
        assert (lp[labels == IGNORE] == 0).all() and (big.grad[labels == IGNORE] == 0).all()
        assert torch.isfinite(big.grad).all() and torch.isfinite(weight.grad).all()

    empty = torch.randn(0, 8, requires_grad=True)
    weight.grad = None
    lp, ent = linear_token_logprobs(empty, weight, torch.zeros(0, dtype=torch.long), return_entropy=True,
                                    backend=backend)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert empty.grad.shape == (0, 8) and (weight.grad == 0).all()


@pytest.mark.parametrize("backend", FORWARDS)
def test_custom_ignore_index_and_int32_labels(monkeypatch, backend):
    backend = use_forward(monkeypatch, backend)
    hidden, weight, _ = make_inputs(4, 16, 64, torch.float32)
    labels = torch.tensor([3, 7, 7, 60], dtype=torch.int32)
    lp = linear_token_logprobs(hidden, weight, labels, ignore_index=7, backend=backend)
    want, _ = oracle(hidden, weight, labels.long(), 1.0, ignore_index=7)
    torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-5)
    assert lp[1] == 0 and lp[2] == 0


@pytest.mark.parametrize("chunk_size", [16, None], ids=["chunk16", "default_chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FORWARDS)
def test_row_result_does_not_depend_on_the_batch(monkeypatch, backend, dtype, chunk_size):
    """Bitwise: logprobs, entropy and dhidden of a row are the same alone, in a prefix,
    permuted to another position, and next to different rows. (BLAS results do depend
    on the number of rows of a matmul; every matmul here has the shape of one chunk.)
    Alone and in a prefix only where the backend is batch-size invariant (not the torch
    backend on CUDA: `batch_size_invariant`)."""
    backend = use_forward(monkeypatch, backend)
    n, size_h, vocab = 45, 24, 1003
    hidden, weight, labels = make_inputs(n, size_h, vocab, dtype)
    g_lp, g_ent = torch.randn(n), torch.randn(n)

    def run(rows_hidden, rows_labels, rows_glp, rows_gent):
        h = rows_hidden.clone().requires_grad_()
        lp, ent = linear_token_logprobs(h, weight, rows_labels, temperature=0.9, return_entropy=True,
                                        backend=backend, chunk_size=chunk_size)
        (lp * rows_glp + ent * rows_gent).sum().backward()
        return lp.detach(), ent.detach(), h.grad

    full = run(hidden, labels, g_lp, g_ent)

    def same(got, index):
        for a, b in zip(got, full):
            assert torch.equal(a, b[index]), (backend, dtype, chunk_size, index)

    if batch_size_invariant(backend):
        same(run(hidden[:20], labels[:20], g_lp[:20], g_ent[:20]), slice(0, 20))      # a prefix
        for i in (0, 17, 44):                                                          # alone
            same(run(hidden[i:i + 1], labels[i:i + 1], g_lp[i:i + 1], g_ent[i:i + 1]), slice(i, i + 1))
    perm = torch.randperm(n)                                                           # moved
    same(run(hidden[perm], labels[perm], g_lp[perm], g_ent[perm]), perm)
    other = hidden.clone()                                                             # different neighbours
    other[1::2] = (torch.randn(n // 2, size_h) * 30).to(dtype)
    got = run(other, labels, g_lp, g_ent)
    same([t[0::2] for t in got], slice(0, n, 2))


def test_backends_agree():
    hidden, weight, labels = make_inputs(11, 32, 4099, torch.float32)
    a = linear_token_logprobs(hidden, weight, labels, return_entropy=True, backend="torch", chunk_size=4)
    b = linear_token_logprobs(hidden, weight, labels, return_entropy=True, backend="triton", chunk_size=4)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Chunk size from the memory budget
# ----------------------------------------------------------------------------

def test_chunk_size_follows_the_budget(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTPPO_LINEAR_CHUNK_MB", raising=False)
    assert chunk_budget_bytes(cpu) == DEFAULT_CHUNK_BUDGET_BYTES["cpu"]
    default = chunk_rows(32000, 512, torch.float32, cpu, "torch")
    # fp32 logits + the torch twin's one fp32 temporary (8 bytes per logit) fit the budget.
    assert 16 <= default and default * 8 * 32000 <= DEFAULT_CHUNK_BUDGET_BYTES["cpu"]
    monkeypatch.setenv("FASTPPO_LINEAR_CHUNK_MB", "8")
    assert chunk_budget_bytes(cpu) == 8 << 20
    small = chunk_rows(32000, 512, torch.float32, cpu, "torch")
    assert small < default and small * 8 * 32000 <= 8 << 20
    assert chunk_rows(32000, 512, torch.float32, cpu, "triton") > small           # no torch temporaries
    assert chunk_rows(10 ** 7, 512, torch.float32, cpu, "torch") == 1             # never 0
    monkeypatch.setenv("FASTPPO_LINEAR_CHUNK_MB", "lots")
    with pytest.raises(ValueError, match="FASTPPO_LINEAR_CHUNK_MB"):
        chunk_budget_bytes(cpu)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os
    import torch
    from fastppo.kernels import linear_token_logprobs
    from fastppo.memory import peak_host_extra_bytes

    n, size_h, vocab = 2048, 32, 16000
    hidden = torch.randn(n, size_h, requires_grad=True)
    weight = (torch.randn(vocab, size_h) / 8).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    g_lp, g_ent = torch.randn(n), torch.randn(n)

    def fused():
        lp, ent = linear_token_logprobs(hidden, weight, labels, return_entropy=True, backend="torch")
        (lp * g_lp + ent * g_ent).sum().backward()
        hidden.grad = weight.grad = None  # counted in the peak, gone before the next call

    def naive():
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)
        lp = logp.gather(-1, labels[:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        (lp * g_lp + ent * g_ent).sum().backward()
        hidden.grad = weight.grad = None

    out = {}
    for name, fn in (("fused", fused), ("naive", naive)):
        fn()  # warm-up: lazy initialisation allocates too
        out[name] = peak_host_extra_bytes(fn)
    print(json.dumps(out))
""")


@pytest.mark.cpu_only("peak host memory of the CPU torch backend, measured in a subprocess")
def test_peak_memory_does_not_grow_with_the_logits():
    """Forward + backward on the torch backend at N·V·4 = 131 MB of logits with a
    4 MB chunk budget: the peak extra host memory stays near the budget plus the
    (V, H) weight gradient. The naive computation in the same process is the
    control that the measurement sees a materialised (N, V)."""
    n, size_h, vocab, budget_mb = 2048, 32, 16000, 4
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPPO_POISON_OUTPUTS", "FASTPPO_BACKEND")}
    # One thread: on a small shared CPU, OpenMP threads that wait on each other make ~1000 small ops crawl.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", FASTPPO_LINEAR_CHUNK_MB=str(budget_mb), TRITON_INTERPRET="0",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_bytes = n * vocab * 4
    assert peak["naive"] >= logits_bytes, peak
    # Chunk buffers (the budget) + dW accumulator and result, dhidden, slack for BLAS workspace.
    allowed = 2 * (budget_mb << 20) + 3 * vocab * size_h * 4 + 2 * n * size_h * 4 + (8 << 20)
    assert peak["fused"] <= allowed, f"peak {peak['fused'] / 1e6:.1f} MB > {allowed / 1e6:.1f} MB: {peak}"
    assert peak["fused"] * 4 <= logits_bytes, peak


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def _args(**over):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), labels=torch.tensor([0, 1, 2]))
    over = {k: on_test_device(v) for k, v in over.items()}
    kwargs = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return args, kwargs


@pytest.mark.parametrize("over,exc,match", [
    (dict(hidden=[[1.0]]), TypeError, "hidden"),
    (dict(hidden=torch.randn(3, 4).long()), TypeError, "hidden"),
    (dict(hidden=torch.randn(())), ValueError, "hidden"),
    (dict(weight=torch.randn(5, 4).double()), TypeError, "weight"),
    (dict(weight=torch.randn(5, 4).bfloat16()), TypeError, "weight"),
    (dict(weight=torch.randn(20)), ValueError, "weight"),
    (dict(weight=torch.randn(2, 5, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(5, 3)), ValueError, "weight"),
    (dict(weight=torch.randn(0, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(5, 4, device="meta")), ValueError, "weight"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
    pytest.param(dict(labels=torch.tensor([0, 1, 5])), ValueError, "labels", marks=VALUES_CHECKED_ON_CPU_ONLY),
    pytest.param(dict(labels=torch.tensor([0, -1, 2])), ValueError, "labels", marks=VALUES_CHECKED_ON_CPU_ONLY),
    (dict(labels=torch.tensor([0, 1, 2], device="meta")), ValueError, "labels"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), TypeError, "chunk_size"),
    (dict(backend="cuda"), ValueError, "backend"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_bad_inputs(over, exc, match):
    args, kwargs = _args(**over)
    with pytest.raises(exc, match=match):
        linear_token_logprobs(args["hidden"], args["weight"], args["labels"], **kwargs)
