"""kl_penalty: the four estimators and the clamp against float64, forward and
backward in both inputs; properties; argument checks.

On CPU the "triton" backend runs in the interpreter; on CUDA, the compiled kernels
(see tests/kernels/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fastppo import algo
from fastppo.kernels import kl_penalty

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ESTIMATORS = ["k1", "k2", "k3", "abs"]


def make_inputs(shape, dtype, *, strided=False):
    """Log-probabilities of sampled tokens (≤ 0, policy and reference close); optionally row
    slices of wider NaN-padded buffers, so an out-of-bounds read shows up as NaN."""
    lp = -torch.rand(shape) * 3
    ref = lp + torch.randn(shape) * 0.5
    if not strided:
        return lp.to(dtype), ref.to(dtype)
    out = []
    for x in (lp, ref):
        buf = torch.full((*shape[:-1], shape[-1] + 9), float("nan"), dtype=dtype)
        view = buf[..., 4:4 + shape[-1]]
        view.copy_(x.to(dtype))
        out.append(view)
    return tuple(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", [None, 0.4])
def test_matches_float64(backend, dtype, estimator, clamp):
    shape = (2, 3, 37) if dtype == torch.float32 else (5, 129)
    lp, ref = make_inputs(shape, dtype, strided=dtype == torch.float32)
    grad_out = torch.randn(shape)
    x, y = lp.detach().clone().requires_grad_(), ref.detach().clone().requires_grad_()
    kl = kl_penalty(x, y, estimator=estimator, clamp=clamp, backend=backend)
    (kl * grad_out).sum().backward()
    x64, y64 = lp.double().requires_grad_(), ref.double().requires_grad_()
    want = algo.kl_penalty(x64, y64, estimator=estimator, clamp=clamp)     # float64, Schulman 2020
    (want * grad_out.double()).sum().backward()

    assert kl.dtype == torch.float32 and kl.shape == shape
    assert x.grad.dtype == dtype and y.grad.dtype == dtype
    torch.testing.assert_close(kl.double(), want.detach(), atol=1e-6, rtol=2e-6)
    # Gradients are stored in the input dtype: one ulp of it on top of fp32's error (the interpreter
    # truncates the store, a GPU rounds to nearest: both within one ulp).
    for got, exp in ((x.grad, x64.grad), (y.grad, y64.grad)):
        ulp = torch.finfo(dtype).eps * exp.abs().max().item()
        torch.testing.assert_close(got.double(), exp, atol=1e-6 + ulp, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend):
    lp, ref = make_inputs((4, 300), torch.float32)
    k1, k2, k3, ab = (kl_penalty(lp, ref, estimator=e, backend=backend) for e in ESTIMATORS)
    assert (k2 >= 0).all() and (k3 >= 0).all() and (ab >= 0).all()
    torch.testing.assert_close(ab, k1.abs())
    torch.testing.assert_close(k2, 0.5 * k1 * k1)
    same = kl_penalty(lp, lp, estimator="k3", backend=backend)
    assert (same == 0).all()
    clamped = kl_penalty(lp, ref, estimator="k1", clamp=0.1, backend=backend)
    assert clamped.abs().max() <= 0.1 and (clamped == k1.clamp(-0.1, 0.1)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_clamped_estimates_far_from_the_reference_have_finite_gradients(backend, estimator):
    """Log ratios beyond exp's float32 range (lp − ref = ±100): a clamped estimate gets gradient 0 there (the
    clamp's), not the NaN of an infinite slope times 0; inside the clamp, the float64 slope."""
    lp = torch.tensor([-100.0, 100.0, -1.0], requires_grad=True)
    ref = torch.tensor([0.0, 0.0, -1.2])
    kl = kl_penalty(lp, ref, estimator=estimator, clamp=10.0, backend=backend)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(lp.grad).all()
    lp64 = lp.detach().double().requires_grad_()
    want = algo.kl_penalty(lp64, ref.double(), estimator=estimator, clamp=10.0)
    want.sum().backward()
    torch.testing.assert_close(kl.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lp.grad[2].double(), lp64.grad[2], atol=1e-6, rtol=1e-6)
    assert (lp.grad[:2] == 0).all()                      # every estimate is clamped there


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_sum_and_one_input(backend):
    """The upstream gradient of .sum() is an expanded (stride-0) tensor; only logprobs needs a gradient."""
    lp, ref = make_inputs((3, 50), torch.float32)
    x = lp.clone().requires_grad_()
    kl_penalty(x, ref, estimator="k3", backend=backend).sum().backward()
    torch.testing.assert_close(x.grad, -torch.expm1(-(lp - ref)), atol=1e-6, rtol=1e-5)
    y = ref.clone().requires_grad_()
    kl_penalty(lp, y, estimator="k2", backend=backend).mean().backward()
    torch.testing.assert_close(y.grad, -(lp - ref) / lp.numel(), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_scalar(backend):
    lp, ref = make_inputs((4, 9), torch.float32)
    out = kl_penalty(lp, ref.bfloat16(), estimator="k1", backend=backend)
    torch.testing.assert_close(out.double(), lp.double() - ref.bfloat16().double(), atol=1e-6, rtol=1e-6)
    scalar = kl_penalty(torch.tensor(-1.0), torch.tensor(-1.5), estimator="abs", backend=backend)
    assert scalar.shape == () and scalar.item() == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0), (2, 0, 5), (3, 2, 0)], ids=str)
def test_empty_inputs(backend, shape):
    """No token: an empty float32 estimate of the inputs' shape, empty gradients in the inputs' dtypes."""
    x = torch.zeros(shape, dtype=torch.bfloat16, requires_grad=True)
    y = torch.zeros(shape, requires_grad=True)
    out = kl_penalty(x, y, estimator="k3", clamp=1.0, backend=backend)
    assert out.shape == shape and out.dtype == torch.float32 and out.device == x.device
    out.sum().backward()
    assert x.grad.shape == shape and x.grad.dtype == torch.bfloat16
    assert y.grad.shape == shape and y.grad.dtype == torch.float32


def test_backends_agree():
    lp, ref = make_inputs((6, 70), torch.float32)
    for estimator in ESTIMATORS:
        a = kl_penalty(lp, ref, estimator=estimator, backend="torch")
        b = kl_penalty(lp, ref, estimator=estimator, backend="triton")
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


_LP, _REF = torch.randn(2, 5), torch.randn(2, 5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: kl_penalty(_LP, _REF, estimator="k4"), ValueError, "estimator"),
    (lambda: kl_penalty(_LP, _REF, estimator=None), ValueError, "estimator"),
    (lambda: kl_penalty(_LP, _REF, clamp=-1.0), ValueError, "clamp"),
    (lambda: kl_penalty(_LP, _REF, clamp=0), ValueError, "clamp"),
    (lambda: kl_penalty(_LP, _REF, clamp="1"), TypeError, "clamp"),
    (lambda: kl_penalty(_LP.long(), _REF), TypeError, "logprobs"),
    (lambda: kl_penalty(_LP, _REF.double()), TypeError, "ref_logprobs"),
    (lambda: kl_penalty(_LP, [[0.0]]), TypeError, "ref_logprobs"),
    (lambda: kl_penalty(_LP, _REF[:, :3]), ValueError, "ref_logprobs"),
    (lambda: kl_penalty(_LP, _REF.to("meta")), ValueError, "ref_logprobs"),
    (lambda: kl_penalty(_LP, _REF, backend="gpu"), ValueError, "backend"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_inputs(backend):
    """Inputs strided along the last dimension (copied to unit stride) give the same estimate and gradient."""
    lp, ref = make_inputs((40, 6), torch.float32)
    x = lp.t().requires_grad_()                      # (6, 40) with stride (1, 6)
    out = kl_penalty(x, ref.t(), estimator="k2", backend=backend)
    out.sum().backward()
    torch.testing.assert_close(out, 0.5 * (lp.t() - ref.t()) ** 2)
    torch.testing.assert_close(x.grad, lp.t() - ref.t())
