"""linear_ppo_loss against a float64 oracle and against the composed ops, its properties, memory and errors.

On CPU the "triton" backend runs in the interpreter (on CUDA, the compiled
kernels; see tests/kernels/conftest.py), on a chosen subset of cases (the
interpreter costs ~1 ms per program); the torch backend gets the grid. The
matmuls are torch.mm in both.

The clipped surrogate's gradient jumps where ρ crosses 1 ± ε (or the dual-clip
bound c): inputs keep every token's ratio at least MARGIN away from those
points in log space, so that float32 and float64 take the same branch.
"""

from __future__ import annotations

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
from fastppo.kernels import kl_penalty, linear_ppo_loss, linear_token_logprobs, ppo_loss
from fastppo_testing.devices import VALUES_CHECKED_ON_CPU_ONLY, batch_size_invariant, on_test_device
from fastppo_testing.tolerances import assert_within, gemm_error, logprob_entropy_tolerance

BACKENDS = ["torch", "triton"]
STATS = ("loss", "policy_loss", "entropy", "kl", "clipfrac", "approx_kl", "ratio_mean")
MARGIN = 2e-3
CLIP_EPS, DUAL_CLIP = 0.2, 3.0


# ----------------------------------------------------------------------------
# Oracle, plain PyTorch, inputs
# ----------------------------------------------------------------------------

def composed(hidden, weight, labels, old, adv, mask, *, ref=None, acc=torch.float64, **kw):
    """The formulas written out with autograd: logits in `hidden`'s dtype, then `acc` (float64: the oracle)."""
    return algo.policy_loss_from_logits(F.linear(hidden, weight).to(acc), labels, old, adv, mask, ref_logprobs=ref,
                                        **kw)._asdict()


def fused(backend, chunk_size=None):
    def fn(hidden, weight, labels, old, adv, mask, **kw):
        return linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend=backend, chunk_size=chunk_size,
                               **kw)._asdict()
    return fn


def run(fn, hidden, weight, labels, old, adv, mask, *, cast=None, grad=0.7, **kw):
    """Results (float64) and (dhidden, dweight) of grad·loss."""
    h, w = hidden.detach().clone(), weight.detach().clone()
    if cast is not None:
        h, w = h.to(cast), w.to(cast)
    h.requires_grad_()
    w.requires_grad_()
    out = fn(h, w, labels, old, adv, mask, **kw)
    (grad * out["loss"]).backward()
    res = {k: out[k].detach().double() for k in (*STATS, "logprobs")}
    res["dhidden"], res["dweight"] = h.grad.double(), w.grad.double()
    return res


def _away_from(r, points, margin=MARGIN):
    """Move each entry of r at least `margin` away from every point."""
    for p in points:
        near = (r - p).abs() < margin
        r = torch.where(near, p + margin * torch.where(r >= p, 1.0, -1.0), r)
    return r


def _exact_logprobs(hidden, weight, labels, temperature):
    with torch.no_grad():
        return algo.token_logprobs(F.linear(hidden.double(), weight.double()), labels.clamp(min=0),
                                   temperature=temperature).logprobs


def old_logprobs_for(hidden, weight, labels, temperature=1.0):
    """old = lp − r, lp the exact logprob at `temperature`, log-ratios r ~ N(0, 0.25), a quarter of them
    N(0, 1) (so that some ratios pass the dual-clip bound c = 3), kept MARGIN away from log(1 ± ε) and log c."""
    wide = torch.rand(labels.shape) < 0.25
    r = torch.randn(labels.shape).double() * torch.where(wide, 1.0, 0.25).double()
    r = _away_from(r, [math.log(1 - CLIP_EPS), math.log(1 + CLIP_EPS), math.log(DUAL_CLIP)])
    return (_exact_logprobs(hidden, weight, labels, temperature) - r).float()


def make_inputs(shape, size_h, vocab, dtype, *, temperature=1.0, scale=3.0, holes=True):
    """hidden (*shape, H), weight (V, H) in dtype; labels, old/ref logprobs, advantages, mask (float32).

    Old logprobs from old_logprobs_for at `temperature`; ref = lp − d with d
    kept MARGIN away from 0 (the kink of "abs"). About a quarter of the tokens
    are masked out, with labels −100 there (never read).
    """
    hidden = torch.randn(*shape, size_h).to(dtype)
    weight = (torch.randn(vocab, size_h) * scale / math.sqrt(size_h)).to(dtype)
    labels = torch.randint(0, vocab, shape)
    old = old_logprobs_for(hidden, weight, labels, temperature)
    d = _away_from(torch.randn(shape).double() * 0.5, [0.0])
    ref = (_exact_logprobs(hidden, weight, labels, temperature) - d).float()
    adv = torch.randn(shape)
    mask = torch.rand(shape) > 0.25 if holes else torch.ones(shape, dtype=torch.bool)
    if holes and mask.numel() > 1:
        mask.view(-1)[0] = True
        mask.view(-1)[-1] = False
    labels = torch.where(mask, labels, -100)
    return hidden, weight, labels, old, adv, mask, ref


def assert_within_budget(name, got, want, plain_value, atol):
    err = (got - want).abs().max().item()
    budget = 2 * (plain_value - want).abs().max().item() + atol
    assert err <= budget, f"{name}: max error {err:.3g} > 2 x plain error + atol = {budget:.3g}"


TERMS = {
    # name: keyword arguments of linear_ppo_loss (and of `composed`)
    "plain": dict(),
    "all": dict(temperature=1.0, dual_clip=DUAL_CLIP, ent_coef=0.01, kl_coef=0.05, kl_estimator="k3"),
    "temperature": dict(temperature=0.9, ent_coef=0.02, kl_coef=0.1, kl_estimator="k1"),
}


def check_against_oracle(backend, shape, size_h, vocab, dtype, terms, chunk_size):
    kw = dict(TERMS[terms])
    hidden, weight, labels, old, adv, mask, ref = make_inputs(shape, size_h, vocab, dtype,
                                                              temperature=kw.get("temperature", 1.0))
    if kw.get("kl_coef", 0) > 0:
        kw["ref_logprobs"] = ref
    oracle_kw = {("ref" if k == "ref_logprobs" else k): v for k, v in kw.items()}

    got = run(fused(backend, chunk_size), hidden, weight, labels, old, adv, mask, **kw)
    want = run(composed, hidden, weight, labels, old, adv, mask, cast=torch.float64, **oracle_kw)
    base = run(lambda *a, **k: composed(*a, acc=torch.float32, **k), hidden, weight, labels, old, adv, mask,
               **oracle_kw)
    for name, t in got.items():
        assert torch.isfinite(t).all(), name
    for name in (*STATS, "logprobs"):
        g, w = got[name], want[name]
        assert_within_budget(name, g, w, base[name], atol=2e-5 * (1 + w.abs().max().item()))
        # Logits are float32 whatever the input dtype: float32-accurate even for bf16 inputs.
        err = (g - w).abs().max().item()
        assert err <= 2e-5 * (1 + w.abs().max().item()), f"{name}: {err:.3g} is not float32-accurate"
    for name in ("dhidden", "dweight"):
        g, w = got[name], want[name]
        ulp = torch.finfo(dtype).eps * w.abs().max().item()
        assert_within_budget(name, g, w, base[name], atol=1e-5 * w.abs().max().item() + ulp)
        # Accumulated in float32 and rounded once (then scaled by the upstream 0.7: one more rounding).
        # float32 error relative to the largest entry: up to ~1e-5 seen where the terms of a row cancel.
        # Not on CUDA with half inputs: the GEMMs take dlogits rounded to the input dtype there (see
        # test_linear_token_logprobs.check_against_oracle), bounded by the budget above only.
        if hidden.is_cuda and dtype != torch.float32:
            continue
        tol = 2 * torch.finfo(dtype).eps * w.abs() + 4e-5 * w.abs().max()
        excess = (g - w).abs() - tol
        worst, at = excess.max().item(), excess.argmax()
        assert worst <= 0, (f"{name}: beyond two {dtype} ulps + float32 error by {worst:.3g} "
                            f"(got {g.flatten()[at].item():.6g}, want {w.flatten()[at].item():.6g})")
    invalid = ~mask.reshape(-1)
    assert (got["logprobs"].reshape(-1)[invalid] == 0).all()
    assert (got["dhidden"].reshape(-1, size_h)[invalid] == 0).all()


# ----------------------------------------------------------------------------
# Against the float64 oracle
# ----------------------------------------------------------------------------

def _chunk(n, kind):
    """A chunk size that divides the number of valid tokens' upper bound N, or one that does not."""
    return {"divides": {1: 1, 37: 37, 300: 100}[n], "pads": {1: 16, 37: 16, 300: 128}[n]}[kind]


@pytest.mark.parametrize("terms", ["plain", "all", "temperature"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size_h", [33, 64])
@pytest.mark.parametrize("n", [1, 37, 300])
def test_torch_backend_matches_oracle(n, size_h, dtype, terms):
    chunk_kind = "pads" if (size_h == 33) != (terms == "all") else "divides"
    check_against_oracle("torch", (n,), size_h, 1003, dtype, terms, _chunk(n, chunk_kind))


@pytest.mark.parametrize("n,dtype,terms", [(1, torch.float32, "all"), (37, torch.bfloat16, "temperature"),
                                           (300, torch.float32, "all"), (300, torch.bfloat16, "plain")], ids=str)
def test_torch_backend_gpt2_vocab(n, dtype, terms):
    check_against_oracle("torch", (n,), 33, 50257, dtype, terms, _chunk(n, "pads"))


TRITON_CASES = [
    # (N, H, V, dtype, terms, chunk kind): the interpreter is slow, so a chosen subset.
    (1, 33, 1003, torch.float32, "plain", "pads"),
    (37, 64, 1003, torch.bfloat16, "all", "divides"),
    (37, 33, 1003, torch.float32, "temperature", "pads"),
    (300, 33, 1003, torch.float32, "all", "pads"),
    (300, 64, 1003, torch.bfloat16, "temperature", "divides"),
    (37, 33, 50257, torch.bfloat16, "all", "pads"),
    (1, 64, 50257, torch.float32, "temperature", "divides"),
]


@pytest.mark.parametrize("n,size_h,vocab,dtype,terms,chunk_kind", TRITON_CASES, ids=str)
def test_triton_backend_matches_oracle(n, size_h, vocab, dtype, terms, chunk_kind):
    check_against_oracle("triton", (n,), size_h, vocab, dtype, terms, _chunk(n, chunk_kind))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_estimators(backend, estimator):
    hidden, weight, labels, old, adv, mask, ref = make_inputs((29,), 16, 257, torch.float32)
    kw = dict(ent_coef=0.05, kl_coef=0.3, kl_estimator=estimator)
    got = run(fused(backend, 8), hidden, weight, labels, old, adv, mask, ref_logprobs=ref, **kw)
    want = run(composed, hidden, weight, labels, old, adv, mask, cast=torch.float64, ref=ref, **kw)
    for name in (*STATS, "dhidden", "dweight"):
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    # k3's gradient is not zero: the KL term moves the weights.
    no_kl = run(fused(backend, 8), hidden, weight, labels, old, adv, mask, ent_coef=0.05)
    assert (got["dweight"] - no_kl["dweight"]).abs().max() > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip_by_hand(backend):
    """ρ = e² > c = 3 with every advantage negative: each token's term is the dual bound −c·A, constant in
    the logprob, so the loss is c·mean|A|, clipfrac 1 and the gradient 0; without the dual clip, mean |A|·ρ."""
    hidden, weight, labels, _, adv, mask, _ = make_inputs((8,), 16, 257, torch.float32, holes=False)
    old = (_exact_logprobs(hidden, weight, labels, 1.0) - 2.0).float()
    adv = -adv.abs() - 0.1
    h = hidden.clone().requires_grad_()
    out = linear_ppo_loss(h, weight, labels, old, adv, mask, dual_clip=DUAL_CLIP, backend=backend)
    out.loss.backward()
    torch.testing.assert_close(out.policy_loss, DUAL_CLIP * adv.abs().mean(), rtol=1e-6, atol=1e-6)
    assert out.clipfrac == 1 and (h.grad == 0).all()
    plain = linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend=backend)
    torch.testing.assert_close(plain.policy_loss, (adv.abs() * math.exp(2.0)).mean(), rtol=1e-5, atol=1e-5)
    assert plain.clipfrac == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_numbers_as_the_composed_ops(backend):
    """linear_token_logprobs + ppo_loss (policy part) + entropy and kl_penalty terms, all fastppo ops."""
    b, t, size_h, vocab = 3, 11, 24, 1003
    hidden, weight, labels, old, adv, mask, ref = make_inputs((b, t), size_h, vocab, torch.float32, temperature=0.9)
    kw = dict(temperature=0.9, dual_clip=DUAL_CLIP, ent_coef=0.01, kl_coef=0.1, kl_estimator="k3")

    def ops(h, w, labels, old, adv, mask, *, temperature, dual_clip, ent_coef, kl_coef, kl_estimator):
        lp, ent = linear_token_logprobs(h, w, torch.where(mask, labels, -100), temperature=temperature,
                                        return_entropy=True, backend=backend, chunk_size=8)
        zeros = torch.zeros_like(lp)
        out = ppo_loss(lp, old, adv, zeros, zeros, zeros, mask, clip_eps=CLIP_EPS, dual_clip=dual_clip,
                       vf_coef=0.0, backend=backend)
        n = mask.sum()
        entropy = (ent * mask).sum() / n
        kl = (kl_penalty(lp, ref, estimator=kl_estimator, backend=backend) * mask).sum() / n
        return {"loss": out.policy_loss - ent_coef * entropy + kl_coef * kl, "policy_loss": out.policy_loss,
                "entropy": entropy, "kl": kl, "clipfrac": out.clipfrac, "approx_kl": out.approx_kl,
                "ratio_mean": out.ratio_mean, "logprobs": lp}

    got = run(fused(backend, 8), hidden, weight, labels, old, adv, mask, ref_logprobs=ref, **kw)
    want = run(ops, hidden, weight, labels, old, adv, mask, **kw)
    for name in (*STATS, "logprobs", "dhidden", "dweight"):
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_micro_batches_with_a_normalizer_equal_one_batch(backend):
    """Micro-batch losses with the minibatch's token count as normalizer (a number, or a tensor) add up,
    in value and in gradients, to the loss of the whole minibatch."""
    b, t, size_h, vocab = 4, 9, 16, 1003
    hidden, weight, labels, old, adv, mask, ref = make_inputs((b, t), size_h, vocab, torch.float32, temperature=0.9)
    kw = dict(temperature=0.9, ent_coef=0.02, ref_logprobs=ref, kl_coef=0.1, backend=backend, chunk_size=8)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    whole = linear_ppo_loss(h, w, labels, old, adv, mask, **kw)
    whole.loss.backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    for normalizer in (float(mask.sum()), mask.sum()):
        h.grad = w.grad = None
        parts = []
        for rows in (slice(0, 1), slice(1, b)):                         # unequal halves
            sub = {k: v[rows] for k, v in kw.items() if isinstance(v, torch.Tensor)}
            out = linear_ppo_loss(h[rows], w, labels[rows], old[rows], adv[rows], mask[rows],
                                  normalizer=normalizer, **{**kw, **sub})
            out.loss.backward()
            parts.append(out)
        for name in STATS:
            torch.testing.assert_close(sum(getattr(p, name) for p in parts), getattr(whole, name), atol=1e-6,
                                       rtol=1e-5, msg=name)
        torch.testing.assert_close(h.grad, dh, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(w.grad, dw, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------
# Gradients: which inputs, tied embeddings, the upstream gradient, no grad
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous_inputs(backend):
    """(B, T, H) hidden as the trainer takes it (a slice of the backbone's output), weight as a slice of a
    NaN-padded buffer (an out-of-bounds read would show as NaN), transposed per-token inputs."""
    b, t, size_h, vocab = 3, 6, 24, 1003
    full = torch.randn(b, t + 3, size_h)
    weight_buf = torch.full((vocab, size_h + 7), float("nan"))
    weight = weight_buf[:, 3:3 + size_h]
    weight.copy_(torch.randn(vocab, size_h))
    _, _, labels, _, adv, mask, _ = make_inputs((b, t), size_h, vocab, torch.float32)
    old = old_logprobs_for(full[:, 2:-1], weight, labels, 0.9)
    labels, old, adv, mask = (x.T.contiguous().T for x in (labels, old, adv, mask))
    h_leaf = full.clone().requires_grad_()
    w = weight.detach().requires_grad_()
    hidden = h_leaf[:, 2:-1]                                             # (B, T, H), not viewable as rows
    assert not hidden.is_contiguous() and not labels.is_contiguous() and not weight.is_contiguous()
    out = linear_ppo_loss(hidden, w, labels, old, adv, mask, temperature=0.9, ent_coef=0.1, backend=backend,
                          chunk_size=4)
    assert out.logprobs.shape == (b, t) and out.logprobs.dtype == torch.float32 and not out.logprobs.requires_grad
    assert all(getattr(out, k).shape == () and getattr(out, k).dtype == torch.float32 for k in STATS)
    out.loss.backward()

    h64 = full.double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    want = composed(h64[:, 2:-1], w64, labels, old, adv, mask, temperature=0.9, ent_coef=0.1)
    want["loss"].backward()
    torch.testing.assert_close(out.logprobs.double(), want["logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_leaf.grad.double(), h64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-6, rtol=1e-4)


def assert_gemm_close(name, got, want, scale, n_terms, dlogit_ulps, lam=8.0):
    """Within the float32 rounding error of a sum of n_terms products a·b whose magnitudes sum to `scale`,
    each a (a dlogit) off by `dlogit_ulps` relative ulps: (λ·√K + dlogit_ulps)·eps·scale (the probabilistic
    bound of Higham & Mary, SIAM J. Sci. Comput. 2019, exceeded with probability below exp(−λ²/2)), plus
    one float32 ulp of the result."""
    eps = torch.finfo(torch.float32).eps
    tol = (lam * math.sqrt(n_terms) + dlogit_ulps) * eps * scale + eps * want.abs()
    worst = ((got.double() - want).abs() - tol).max().item()
    assert worst <= 0, f"{name}: beyond the float32 summation bound by {worst:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_input_at_a_time_and_the_upstream_gradient(backend):
    """A frozen weight (no dW work), a frozen hidden; the loss inside a larger expression."""
    hidden, weight, labels, old, adv, mask, _ = make_inputs((13,), 16, 257, torch.float32)
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    want = composed(h64, w64, labels, old, adv, mask, ent_coef=0.1)
    (3.0 * want["loss"] + 1.0).backward()
    # The float64 gradient of the loss in the logits: composed() through an identity lm_head (exact in float64).
    x64 = F.linear(h64, w64).detach().requires_grad_()
    (3.0 * composed(x64, torch.eye(257, dtype=torch.float64, device=x64.device), labels, old, adv, mask,
                    ent_coef=0.1)["loss"]).backward()
    scale_h, scale_w = x64.grad.abs() @ w64.detach().abs(), x64.grad.abs().T @ h64.detach().abs()
    # p = exp(x − lse) turns the absolute error of its argument into a relative error of each float32 dlogit:
    # the rounding of x and lse, (|x| + |lse|)·eps, and the float32 GEMM error of the logit (and through its
    # softmax average of lse), λ·√H·eps·Σ_k|h_k·w_k| each (λ = 8); +4 ulps for the rest of the arithmetic.
    x = x64.detach()
    gemm = 8.0 * math.sqrt(16) * (h64.detach().abs() @ w64.detach().abs().T)
    ulps = (x.abs() + torch.logsumexp(x, dim=-1, keepdim=True).abs() + 2 * gemm).max().item() + 4
    for grad_h, grad_w in ((True, True), (True, False), (False, True)):
        h = hidden.clone().requires_grad_(grad_h)
        w = weight.clone().requires_grad_(grad_w)
        out = linear_ppo_loss(h, w, labels, old, adv, mask, ent_coef=0.1, backend=backend, chunk_size=4)
        (out.loss * 3.0 + 1.0).backward()
        assert (h.grad is None) == (not grad_h) and (w.grad is None) == (not grad_w)
        # dhidden and dW are float32 sums of products whose terms cancel: their error scales with the sum of
        # the terms' magnitudes (|dlogits| @ |W|, |dlogits|ᵀ @ |hidden|), not with the entry itself.
        if grad_h:
            assert_gemm_close("dhidden", h.grad, h64.grad, scale_h, n_terms=257, dlogit_ulps=ulps)
        if grad_w:
            assert_gemm_close("dweight", w.grad, w64.grad, scale_w, n_terms=13, dlogit_ulps=ulps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradient(backend):
    """lm_head tied to the input embedding: its gradient sums both uses."""
    vocab, size_h, b, t = 1003, 32, 2, 9
    emb = torch.randn(vocab, size_h) * 0.5
    mix = torch.randn(size_h, size_h) / math.sqrt(size_h)
    tokens = torch.randint(0, vocab, (b, t + 1))
    _, _, _, _, adv, mask, _ = make_inputs((b, t), size_h, vocab, torch.float32)
    labels = tokens[:, 1:]
    hidden_of = lambda table: torch.tanh(F.embedding(tokens[:, :-1], table) @ mix.to(table.dtype))  # noqa: E731
    old = old_logprobs_for(hidden_of(emb), emb, labels)

    def grad_of_table(table, op):
        table = table.clone().requires_grad_()
        op(hidden_of(table), table)["loss"].backward()                    # hidden (B, T, H)
        return table.grad.double()

    got = grad_of_table(emb, lambda h, w: linear_ppo_loss(h, w, labels, old, adv, mask, ent_coef=0.1,
                                                          backend=backend, chunk_size=8)._asdict())
    want = grad_of_table(emb.double(), lambda h, w: composed(h, w, labels, old, adv, mask, ent_coef=0.1))
    torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradients_keep_their_dtype_and_no_grad_mode(backend):
    hidden, weight, labels, old, adv, mask, _ = make_inputs((6,), 16, 100, torch.bfloat16)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    out = linear_ppo_loss(h, w, labels, old, adv, mask, backend=backend)
    assert out.loss.requires_grad and not out.policy_loss.requires_grad and not out.logprobs.requires_grad
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    with torch.no_grad():
        again = linear_ppo_loss(h, w, labels, old, adv, mask, backend=backend)
    assert not again.loss.requires_grad
    torch.testing.assert_close(again.loss, out.loss, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_runs_once(backend):
    hidden, weight, labels, old, adv, mask, _ = make_inputs((5,), 8, 50, torch.float32)
    h = hidden.requires_grad_()
    out = linear_ppo_loss(h, weight, labels, old, adv, mask, backend=backend)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_and_empty_batches(backend):
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    z = torch.zeros(2, 3)
    labels = torch.full((2, 3), -100)                                     # never read
    out = linear_ppo_loss(hidden, weight, labels, z, z, torch.zeros(2, 3, dtype=torch.bool), backend=backend)
    out.loss.backward()
    assert all(getattr(out, k) == 0 for k in STATS) and (out.logprobs == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()

    empty = torch.randn(0, 8, requires_grad=True)
    weight.grad = None
    z = torch.zeros(0)
    out = linear_ppo_loss(empty, weight, torch.zeros(0, dtype=torch.long), z, z, z, backend=backend)
    out.loss.backward()
    assert out.logprobs.shape == (0,) and out.loss == 0
    assert empty.grad.shape == (0, 8) and (weight.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_and_all_negative_logits(backend):
    n, size_h, vocab = 7, 16, 777
    labels = torch.randint(0, vocab, (n,))
    cases = {
        "all_negative": (torch.rand(n, size_h) + 0.5, -(torch.rand(vocab, size_h) + 0.5) * 1000 / size_h),
        "huge": (torch.randn(n, size_h) * 100, torch.randn(vocab, size_h) * 100 / math.sqrt(size_h)),
    }
    for name, (hidden, weight) in cases.items():
        h = hidden.requires_grad_()
        w = weight.requires_grad_()
        old, adv, mask = torch.full((n,), -1.0), torch.randn(n), torch.ones(n, dtype=torch.bool)
        out = linear_ppo_loss(h, w, labels, old, adv, mask, ent_coef=0.1, backend=backend, chunk_size=4)
        out.loss.backward()
        want = composed(h.detach().double(), w.detach().double(), labels, old, adv, mask, ent_coef=0.1)
        for t in (out.loss, out.entropy, out.logprobs, h.grad, w.grad):
            assert torch.isfinite(t).all(), name
        assert (out.logprobs <= 0).all(), name
        assert 0 <= out.entropy <= math.log(vocab) + 1e-5, name
        # The huge case's logits reach ~1e4: their float32 GEMM and rounding errors are ~1e-2, not a fixed 1e-3.
        x = F.linear(h.detach().double(), w.detach().double())
        tol_lp, _ = logprob_entropy_tolerance(x, labels, gemm_error(h, w))
        assert_within(name, out.logprobs, want["logprobs"], tol_lp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_result_does_not_depend_on_the_batch(backend):
    """Bitwise, at a fixed normalizer: a token's logprob and dhidden row are the same alone, in a prefix, with
    other tokens masked around it (only valid tokens enter the chunks; every GEMM has the chunk's shape) and next
    to tokens of other values. All but the last only where the backend is batch-size invariant (not the torch
    backend on CUDA: `batch_size_invariant`)."""
    n, size_h, vocab = 40, 24, 1003
    hidden, weight, labels, old, adv, mask, _ = make_inputs((n,), size_h, vocab, torch.float32)
    labels = torch.randint(0, vocab, (n,))

    def go(sel, mask_sel):
        h = hidden[sel].clone().requires_grad_()
        out = linear_ppo_loss(h, weight, labels[sel], old[sel], adv[sel], mask_sel, normalizer=10.0,
                              temperature=0.9, ent_coef=0.1, backend=backend, chunk_size=16)
        out.loss.backward()
        return out.logprobs, h.grad

    ones = torch.ones(n, dtype=torch.bool)
    full_lp, full_dh = go(slice(None), ones)
    if batch_size_invariant(backend):
        for sel in (slice(0, 20), slice(17, 18), slice(39, 40)):
            lp, dh = go(sel, ones[sel])
            assert torch.equal(lp, full_lp[sel]) and torch.equal(dh, full_dh[sel]), sel
        lp, dh = go(slice(None), mask)
        assert torch.equal(lp[mask], full_lp[mask]) and torch.equal(dh[mask], full_dh[mask])
    hidden[1::2] = torch.randn(n // 2, size_h) * 30                    # the same shapes, other neighbours
    lp, dh = go(slice(None), ones)
    assert torch.equal(lp[0::2], full_lp[0::2]) and torch.equal(dh[0::2], full_dh[0::2])


def test_backends_agree():
    hidden, weight, labels, old, adv, mask, ref = make_inputs((23,), 32, 4099, torch.float32, temperature=0.9)
    kw = dict(temperature=0.9, dual_clip=DUAL_CLIP, ent_coef=0.01, ref_logprobs=ref, kl_coef=0.1, chunk_size=8)
    a = linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="torch", **kw)
    b = linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="triton", **kw)
    for name in (*STATS, "logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from fastppo.kernels import linear_ppo_loss
    from fastppo.memory import peak_host_extra_bytes

    n, size_h, vocab = 2048, 32, 16000
    hidden = torch.randn(n, size_h, requires_grad=True)
    weight = (torch.randn(vocab, size_h) / 8).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    old, adv, mask = torch.randn(n) - 10, torch.randn(n), torch.ones(n, dtype=torch.bool)

    def fused():
        linear_ppo_loss(hidden, weight, labels, old, adv, mask, ent_coef=0.01, backend="torch").loss.backward()
        hidden.grad = weight.grad = None  # counted in the peak, gone before the next call

    def naive():
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)
        lp = logp.gather(-1, labels[:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        ratio = torch.exp(lp - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        (pg.mean() - 0.01 * ent.mean()).backward()
        hidden.grad = weight.grad = None

    out = {}
    for name, fn in (("fused", fused), ("naive", naive)):
        fn()  # warm-up: lazy initialisation allocates too
        out[name] = peak_host_extra_bytes(fn)
    print(json.dumps(out))
""")


@pytest.mark.cpu_only("peak host memory of the CPU torch backend, measured in a subprocess")
def test_peak_memory_does_not_grow_with_the_logits():
    """Forward + backward on the torch backend at N·V·4 = 131 MB of logits with a 4 MB chunk budget: the
    peak extra host memory stays near the budget plus dW and dhidden. The naive computation in the same
    process is the control that the measurement sees a materialised (N, V)."""
    n, size_h, vocab, budget_mb = 2048, 32, 16000, 4
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPPO_POISON_OUTPUTS", "FASTPPO_BACKEND")}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", FASTPPO_LINEAR_CHUNK_MB=str(budget_mb), TRITON_INTERPRET="0",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_bytes = n * vocab * 4
    assert peak["naive"] >= logits_bytes, peak
    # Chunk buffers (the budget) + dW accumulator and result, dhidden, per-token vectors, BLAS slack.
    allowed = 2 * (budget_mb << 20) + 3 * vocab * size_h * 4 + 2 * n * size_h * 4 + (8 << 20)
    assert peak["fused"] <= allowed, f"peak {peak['fused'] / 1e6:.1f} MB > {allowed / 1e6:.1f} MB: {peak}"
    assert peak["fused"] * 4 <= logits_bytes, peak


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def _args(**over):
    n = 3
    args = dict(hidden=torch.randn(n, 4), weight=torch.randn(5, 4), labels=torch.tensor([0, 1, 2]),
                old_logprobs=torch.zeros(n), advantages=torch.zeros(n), mask=torch.ones(n, dtype=torch.bool))
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
    (dict(weight=torch.randn(2, 5, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(5, 3)), ValueError, "weight"),
    (dict(weight=torch.randn(0, 4)), ValueError, "weight"),
    (dict(weight=torch.randn(5, 4, device="meta")), ValueError, "weight"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
    (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
    pytest.param(dict(labels=torch.tensor([0, 1, 5])), ValueError, "labels", marks=VALUES_CHECKED_ON_CPU_ONLY),
    pytest.param(dict(labels=torch.tensor([0, -100, 2])), ValueError, "labels", marks=VALUES_CHECKED_ON_CPU_ONLY),
    (dict(old_logprobs=torch.zeros(3).long()), TypeError, "old_logprobs"),
    (dict(old_logprobs=torch.zeros(4)), ValueError, "old_logprobs"),
    (dict(advantages=torch.zeros(3, device="meta")), ValueError, "advantages"),
    (dict(advantages=torch.zeros(3).double()), TypeError, "advantages"),
    (dict(mask=torch.ones(2, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(3, dtype=torch.complex64)), TypeError, "mask"),
    (dict(ref_logprobs=torch.zeros(2)), ValueError, "ref_logprobs"),
    (dict(kl_coef=0.1), ValueError, "ref_logprobs"),
    (dict(kl_coef=-0.1, ref_logprobs=torch.zeros(3)), ValueError, "kl_coef"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(clip_eps=-0.1), ValueError, "clip_eps"),
    (dict(dual_clip=1.0), ValueError, "dual_clip"),
    (dict(dual_clip="3"), TypeError, "dual_clip"),
    (dict(ent_coef=-1.0), ValueError, "ent_coef"),
    (dict(normalizer=-1.0), ValueError, "normalizer"),
    (dict(normalizer=torch.ones(2)), ValueError, "normalizer"),
    (dict(normalizer=torch.ones((), dtype=torch.bool)), TypeError, "normalizer"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), TypeError, "chunk_size"),
    (dict(backend="cuda"), ValueError, "backend"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_bad_inputs(over, exc, match):
    args, kwargs = _args(**over)
    with pytest.raises(exc, match=match):
        linear_ppo_loss(*args.values(), **kwargs)


def test_labels_off_the_mask_are_not_read():
    args, _ = _args()
    args["labels"] = torch.tensor([0, 10 ** 9, -5])
    args["mask"] = torch.tensor([True, False, False])
    out = linear_ppo_loss(*args.values())
    assert torch.isfinite(out.loss) and out.logprobs[1] == 0 and out.logprobs[2] == 0


# ----------------------------------------------------------------------------
# clip_eps_high (clip-higher) and policy_weight
# ----------------------------------------------------------------------------

CLIP_EPS_HIGH = 0.28


def weighted_oracle(hidden, weight, labels, old, adv, mask, policy_weight, **kw):
    """float64 autograd of `algo.policy_loss_from_logits` (ratio clipped to [1 − ε, 1 + ε_high], the policy term
    of token t times w_t) on logits = h·Wᵀ.

    Returns (policy_loss, loss, clipfrac, dhidden, dweight, terms), the gradients those of 0.7·loss, and
    terms = (Σ_v |dlogit_v·w_v| for each dhidden entry, Σ_n |dlogit_n·h_n| for each dweight entry): the
    magnitude of the products each gradient entry sums."""
    h = hidden.detach().double().requires_grad_()
    wt = weight.detach().double().requires_grad_()
    z = h @ wt.T
    z.retain_grad()
    ref = kw.pop("ref_logprobs", None)
    out = algo.policy_loss_from_logits(z, labels, old.double(), adv.double(), mask, clip_eps=CLIP_EPS,
                                       policy_weight=policy_weight,
                                       ref_logprobs=None if ref is None else ref.double(), **kw)
    (0.7 * out.loss).backward()
    dlogits = z.grad.abs()
    terms = (dlogits @ wt.detach().abs(), dlogits.flatten(0, -2).T @ h.detach().abs().flatten(0, -2))
    return out.policy_loss.detach(), out.loss.detach(), out.clipfrac.detach(), h.grad, wt.grad, terms


def weighted_inputs(n, size_h, vocab, dtype, weight_dtype=torch.float32):
    """As make_inputs, with the log-ratios also MARGIN away from log(1 + CLIP_EPS_HIGH), and a policy weight
    (ratios around 1, truncated, a fifth of them 0)."""
    hidden = torch.randn(n, size_h).to(dtype)
    weight = (torch.randn(vocab, size_h) * 3 / math.sqrt(size_h)).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    r = _away_from(torch.randn(n).double() * 0.4, [math.log(1 - CLIP_EPS), math.log(1 + CLIP_EPS),
                                                   math.log(1 + CLIP_EPS_HIGH), math.log(DUAL_CLIP)])
    old = (_exact_logprobs(hidden, weight, labels, 1.0) - r).float()
    mask = torch.rand(n) > 0.25
    mask[0] = True
    w = torch.exp(torch.randn(n) * 0.3).clamp(max=2.0)
    w = torch.where(torch.rand(n) < 0.2, 0.0, w).to(weight_dtype)
    return hidden, weight, torch.where(mask, labels, -100), old, torch.randn(n), mask, w


NEW_ARGS = {"high": dict(clip_eps_high=CLIP_EPS_HIGH), "weight": dict(weight=True),
            "both": dict(clip_eps_high=CLIP_EPS_HIGH, weight=True)}
NEW_ARG_CASES = [(backend, dtype, wdtype, dual, new)
                 for backend in BACKENDS
                 for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float64),
                                       (torch.float16, torch.bfloat16))
                 for dual in (None, DUAL_CLIP) for new in NEW_ARGS
                 # the interpreter costs ~1 ms per program: every switch once, not every combination
                 if backend == "torch" or (dual is None) == (dtype != torch.float32)]


@pytest.mark.parametrize("backend,dtype,weight_dtype,dual_clip,new", NEW_ARG_CASES, ids=str)
def test_clip_higher_and_policy_weight_match_float64(backend, dtype, weight_dtype, dual_clip, new):
    """Loss, policy loss, clipfrac, dhidden and dweight against float64 autograd, each new argument alone and
    both together, on an odd shape (37 tokens, H = 33, V = 101), for every input dtype, entropy bonus and KL on.
    Tolerances as in check_against_oracle: float32 logits make the scalars float32-accurate (2e-5 relative to
    their scale), and the gradients carry two ulps of their dtype plus float32 accumulation error (plus, on CUDA
    with half inputs, the rounding of dlogits to the input dtype: see below)."""
    kw = dict(NEW_ARGS[new])
    hidden, weight, labels, old, adv, mask, w = weighted_inputs(37, 33, 101, dtype, weight_dtype)
    pw = w if kw.pop("weight", False) else None
    ref = old + 0.05
    kw.update(dual_clip=dual_clip, ent_coef=0.01, ref_logprobs=ref, kl_coef=0.05)
    h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_ppo_loss(h, wt, labels, old, adv, mask, backend=backend, chunk_size=16, policy_weight=pw, **kw)
    (0.7 * out.loss).backward()
    policy_loss, loss, clipfrac, dh, dw, terms = weighted_oracle(hidden, weight, labels, old, adv, mask, pw, **kw)
    for name, got, want in (("policy_loss", out.policy_loss, policy_loss), ("loss", out.loss, loss),
                            ("clipfrac", out.clipfrac, clipfrac)):
        torch.testing.assert_close(got.double(), want, atol=2e-5 * (1 + want.abs().item()), rtol=0, msg=name)
    assert h.grad.dtype == dtype and wt.grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    # On CUDA with half inputs both backends' backward GEMMs take dlogits rounded to the input dtype (cuBLAS's
    # and tl.dot's half operands; see test_linear_token_logprobs.check_against_oracle). Each dlogit then carries
    # a relative error up to u = eps/2, so an entry of dhidden = Σ_v dlogit_v·w_v moves by up to u·Σ_v|dlogit_v·w_v|
    # (of dweight = Σ_n dlogit_n·h_n, by u·Σ_n|dlogit_n·h_n|): the `terms` of the oracle, which cancellation can
    # make far larger than the entry. cuBLAS's half GEMMs may also reduce split-K partial sums in the half dtype
    # (torch's default allow_*_reduced_precision_reduction), each partial sum rounded once: at most u·Σ|terms|
    # more. Hence eps·terms on top of the two ulps of the result and the float32 accumulation error.
    rounded_dlogits = hidden.is_cuda and dtype != torch.float32
    for name, got, want, scale in (("dhidden", h.grad, dh, terms[0]), ("dweight", wt.grad, dw, terms[1])):
        tol = 2 * eps * want.abs() + 4e-5 * want.abs().max() + (eps * scale if rounded_dlogits else 0)
        excess = ((got.double() - want).abs() - tol).max().item()
        assert excess <= 0, f"{name}: beyond the tolerance by {excess:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_means_the_symmetric_range_and_unit_weights(backend):
    """clip_eps_high=None is clip_eps and policy_weight=None is w = 1, to the bit (x·1 = x exactly)."""
    hidden, weight, labels, old, adv, mask, _ = weighted_inputs(29, 16, 67, torch.float32)
    kw = dict(dual_clip=DUAL_CLIP, ent_coef=0.01, backend=backend, chunk_size=8)
    results = []
    for extra in (dict(), dict(clip_eps_high=CLIP_EPS, policy_weight=torch.ones(29))):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_ppo_loss(h, w, labels, old, adv, mask, **kw, **extra)
        out.loss.backward()
        results.append((*out, h.grad, w.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_drops_tokens_but_keeps_the_normalizer(backend):
    """w_t = 0 (no entropy bonus or KL, which are not weighted) gives the loss and gradients of the surrogate
    without those tokens, divided by the count of all valid tokens. The same nonzero float32 terms enter both
    runs, but in other chunk positions and sum groupings: float32 rounding of sums of ≤ 40 terms (rtol 1e-5)."""
    hidden, weight, labels, old, adv, mask, w = weighted_inputs(40, 16, 67, torch.float32)
    dropped = (w == 0) & mask
    assert dropped.any()
    runs = []
    for m, norm in ((mask, None), (mask & ~dropped, mask.sum().float())):
        h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_ppo_loss(h, wt, labels, old, adv, m, policy_weight=w, clip_eps_high=CLIP_EPS_HIGH,
                              normalizer=norm, backend=backend, chunk_size=8)
        out.loss.backward()
        runs.append((out.policy_loss, h.grad, wt.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert (runs[0][1][dropped] == 0).all()


def test_new_arguments_backends_agree():
    hidden, weight, labels, old, adv, mask, w = weighted_inputs(23, 32, 515, torch.float32, torch.bfloat16)
    kw = dict(dual_clip=DUAL_CLIP, ent_coef=0.01, clip_eps_high=CLIP_EPS_HIGH, policy_weight=w, chunk_size=8)
    a = linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="torch", **kw)
    b = linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="triton", **kw)
    for name in (*STATS, "logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("over,exc,match", [
    (dict(clip_eps_high=-0.1), ValueError, "clip_eps_high"),
    (dict(clip_eps_high="0.3"), TypeError, "clip_eps_high"),
    (dict(policy_weight=torch.ones(2)), ValueError, "policy_weight"),
    (dict(policy_weight=torch.ones(3, dtype=torch.long)), TypeError, "policy_weight"),
    (dict(policy_weight=torch.ones(3, device="meta")), ValueError, "policy_weight"),
    pytest.param(dict(policy_weight=torch.tensor([1.0, -1.0, 1.0])), ValueError,
                 "policy_weight must be finite and >= 0", marks=VALUES_CHECKED_ON_CPU_ONLY),
    pytest.param(dict(policy_weight=torch.tensor([1.0, float("nan"), 1.0])), ValueError,
                 "policy_weight must be finite", marks=VALUES_CHECKED_ON_CPU_ONLY),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_bad_new_arguments(over, exc, match):
    args, kwargs = _args(**over)
    with pytest.raises(exc, match=match):
        linear_ppo_loss(*args.values(), **kwargs)


def test_policy_weight_off_the_mask_is_not_read():
    args, _ = _args()
    args["mask"] = torch.tensor([True, True, False])
    outs = [linear_ppo_loss(*args.values(), policy_weight=torch.tensor([0.5, 2.0, bad]))
            for bad in (1.0, float("nan"), -3.0)]
    assert all(torch.equal(o.loss, outs[0].loss) for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_weight_gets_no_gradient(backend):
    """A weight computed with autograd on is used as a constant."""
    args, _ = _args()
    args["hidden"].requires_grad_()
    weight = torch.tensor([0.5, 2.0, 1.0], requires_grad=True)
    linear_ppo_loss(*args.values(), policy_weight=weight, backend=backend).loss.backward()
    assert weight.grad is None and args["hidden"].grad is not None


# ----------------------------------------------------------------------------
# ratio_level="sequence" (GSPO) and policy_loss="cispo"
# ----------------------------------------------------------------------------

# Each sequence's mean log-ratio: ≥ 0.03 from log(1 − ε), log(1 + ε), log(1 + ε_high) and log c, both sides.
SEQ_LOG_RATIOS = [-0.5, -0.1, 0.05, 0.215, 0.6, 1.3]
SEQ_KINDS = {"gspo": dict(ratio_level="sequence"), "cispo": dict(policy_loss="cispo"),
             "gspo_cispo": dict(ratio_level="sequence", policy_loss="cispo")}
SEQ_EXTRAS = {"plain": {}, "dual": dict(dual_clip=DUAL_CLIP),
              "high_weight": dict(clip_eps_high=CLIP_EPS_HIGH, weight=True)}


def sequence_inputs(dtype, rows=6, cols=13):
    """Padded (rows, cols) inputs: right-padded sequences of 13, 12, ..., 8 tokens with a few holes, whose mean
    log-ratios over their valid tokens are SEQ_LOG_RATIOS, each token's own log-ratio MARGIN away from the
    clip points too (CISPO's token-level truncation); a policy weight as in weighted_inputs."""
    hidden = torch.randn(rows, cols, 33).to(dtype)
    weight = (torch.randn(101, 33) * 3 / math.sqrt(33)).to(dtype)
    labels = torch.randint(0, 101, (rows, cols))
    lengths = torch.arange(cols, cols - rows, -1)
    mask = (torch.arange(cols) < lengths[:, None]) & (torch.rand(rows, cols) > 0.15)
    mask[:, 0] = True
    noise = torch.randn(rows, cols).double() * 0.3 * mask
    r = noise - noise.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True) + torch.tensor(SEQ_LOG_RATIOS)[:, None]
    r = _away_from(r, [math.log(1 - CLIP_EPS), math.log(1 + CLIP_EPS), math.log(1 + CLIP_EPS_HIGH),
                       math.log(DUAL_CLIP)])
    old = (_exact_logprobs(hidden, weight, labels, 1.0) - r).float()
    w = torch.exp(torch.randn(rows, cols) * 0.3).clamp(max=2.0)
    w = torch.where(torch.rand(rows, cols) < 0.2, 0.0, w)
    return hidden, weight, torch.where(mask, labels, -100), old, torch.randn(rows, cols), mask, w, lengths


SEQ_CASES = [(backend, dtype, kind, extra, layout)
             for backend in BACKENDS
             for i, (kind, extra) in enumerate((k, e) for k in SEQ_KINDS for e in SEQ_EXTRAS
                                               if not (SEQ_KINDS[k].get("policy_loss") == "cispo" and e == "dual"))
             for dtype in (torch.float32, torch.bfloat16, torch.float16)
             for layout in ("padded", "packed")
             # the interpreter: each (kind, extra) once per layout, the dtypes in turn
             if backend == "torch" or dtype == (torch.float32, torch.bfloat16, torch.float16)[i % 3]]


@pytest.mark.parametrize("backend,dtype,kind,extra,layout", SEQ_CASES, ids=str)
def test_sequence_ratio_and_cispo_match_float64(backend, dtype, kind, extra, layout):
    """GSPO and CISPO against float64 autograd of `algo.policy_loss_from_logits` on the padded (6, 13) batch:
    the op reads it padded (each row a sequence) or packed (its in-sequence positions back to back, (M,), with
    each token's row as sequence_ids, as the update passes them), with chunks of 8 rows (sequences of 8-13
    tokens: longer ones take the two-pass path, shorter ones share chunks with their neighbours), entropy bonus
    and KL on. Tolerances as test_clip_higher_and_policy_weight_match_float64 (float32 logits; GSPO's row
    means add ≤ 13 float32 terms more, well inside 2e-5 relative)."""
    kw = dict(SEQ_KINDS[kind], **SEQ_EXTRAS[extra])
    hidden, weight, labels, old, adv, mask, w, lengths = sequence_inputs(dtype)
    pw = w if kw.pop("weight", False) else None
    ref = old + 0.05
    kw.update(ent_coef=0.01, ref_logprobs=ref, kl_coef=0.05)
    policy_loss, loss, clipfrac, dh, dw, terms = weighted_oracle(hidden, weight, labels, old, adv, mask, pw, **kw)
    assert 0 < clipfrac.item() < 1
    h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if layout == "padded":
        out = linear_ppo_loss(h, wt, labels, old, adv, mask, backend=backend, chunk_size=8, policy_weight=pw, **kw)
    else:
        inside = torch.arange(mask.shape[1]) < lengths[:, None]                  # (row, col) of each packed token
        rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[inside]
        take = [x[inside] if x is not None else None for x in (labels, old, adv, mask, pw, ref)]
        out = linear_ppo_loss(h[inside], wt, *take[:4], backend=backend, chunk_size=8, policy_weight=take[4],
                              **dict(kw, ref_logprobs=take[5]),
                              sequence_ids=rows if kw.get("ratio_level") == "sequence" else None)
    (0.7 * out.loss).backward()
    for name, got, want in (("policy_loss", out.policy_loss, policy_loss), ("loss", out.loss, loss),
                            ("clipfrac", out.clipfrac, clipfrac)):
        torch.testing.assert_close(got.double(), want, atol=2e-5 * (1 + want.abs().item()), rtol=0, msg=name)
    assert h.grad.dtype == dtype and wt.grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    rounded_dlogits = hidden.is_cuda and dtype != torch.float32           # see the test named above
    for name, got, want, scale in (("dhidden", h.grad, dh, terms[0]), ("dweight", wt.grad, dw, terms[1])):
        tol = 2 * eps * want.abs() + 4e-5 * want.abs().max() + (eps * scale if rounded_dlogits else 0)
        excess = ((got.double() - want).abs() - tol).max().item()
        assert excess <= 0, f"{name}: beyond the tolerance by {excess:.3g}"
    assert (h.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(SEQ_KINDS))
def test_sequence_results_do_not_depend_on_the_chunking(backend, kind):
    """The same sequences through chunks of 4 (every sequence split: two passes), 16 and 128 rows (whole
    sequences per chunk, one pass): the statistics agree to float32 rounding, the gradients too."""
    hidden, weight, labels, old, adv, mask, _, _ = sequence_inputs(torch.float32)
    runs = []
    for chunk in (4, 16, 128):
        h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_ppo_loss(h, wt, labels, old, adv, mask, backend=backend, chunk_size=chunk, ent_coef=0.01,
                              **SEQ_KINDS[kind])
        out.loss.backward()
        runs.append((*out, h.grad, wt.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_sequence_ratio_backends_agree():
    hidden, weight, labels, old, adv, mask, w, _ = sequence_inputs(torch.float32)
    kw = dict(ent_coef=0.01, clip_eps_high=CLIP_EPS_HIGH, policy_weight=w, chunk_size=8, ratio_level="sequence")
    a = linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="torch", **kw)
    b = linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="triton", **kw)
    for name in (*STATS, "logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("over,exc,match", [
    (dict(ratio_level="seq"), ValueError, "ratio_level"),
    (dict(policy_loss="gspo"), ValueError, "policy_loss"),
    (dict(policy_loss="cispo", dual_clip=3.0), ValueError, "dual_clip"),
    (dict(sequence_ids=torch.zeros(3, dtype=torch.long)), ValueError, "sequence_ids"),
    (dict(ratio_level="sequence", sequence_ids=torch.zeros(3)), TypeError, "sequence_ids"),
    (dict(ratio_level="sequence", sequence_ids=torch.zeros(2, dtype=torch.long)), ValueError, "sequence_ids"),
    (dict(ratio_level="sequence", sequence_ids=torch.tensor([0, 1, 0])), ValueError, "contiguous"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_bad_sequence_arguments(over, exc, match):
    args, kwargs = _args(**over)
    with pytest.raises(exc, match=match):
        linear_ppo_loss(*args.values(), **kwargs)


def test_sequence_ids_off_the_mask_are_not_read():
    """Only the valid tokens' ids delimit the sequences: a masked token between two runs of one id is ignored."""
    args, _ = _args()
    args["mask"] = torch.tensor([True, False, True])
    outs = [linear_ppo_loss(*args.values(), ratio_level="sequence", sequence_ids=torch.tensor([0, bad, 0]))
            for bad in (0, 7)]
    assert torch.equal(outs[0].loss, outs[1].loss)
