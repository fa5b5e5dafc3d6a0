"""ppo_loss against float64 autograd of the PPO formulas (Schulman et al. 2017), its
statistics, masking and normalizer semantics, and the argument checks.

On CPU the "triton" backend runs in the interpreter; on CUDA, the compiled kernels
(see tests/kernels/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fastppo.kernels import PPOLossOutput, ppo_loss, torch_backend
from fastppo.kernels.ppo_loss import _fwd_triton

BACKENDS = ["torch", "triton"]
NAMES = ("logprobs", "old_logprobs", "advantages", "values", "old_values", "returns")


def make_batch(shape, dtype=torch.float32, *, p_valid=0.7, strided=False):
    """A micro-batch whose ratios and value moves cross the clip ranges often."""
    old_lp = -torch.rand(shape) * 3
    lp = old_lp + torch.randn(shape) * 0.3
    adv = torch.randn(shape)
    old_v = torch.randn(shape)
    v = old_v + torch.randn(shape) * 0.3
    ret = old_v + torch.randn(shape)
    mask = torch.rand(shape) < p_valid
    tensors = [x.to(dtype) for x in (lp, old_lp, adv, v, old_v, ret)]
    if strided:                      # row slices of wider NaN-padded buffers, read in place
        views = []
        for x in tensors:
            buf = torch.full((*shape[:-1], shape[-1] + 5), float("nan"), dtype=dtype)
            buf[..., 2:2 + shape[-1]] = x
            views.append(buf[..., 2:2 + shape[-1]])
        tensors = views
    return dict(zip(NAMES, tensors), mask=mask)


def oracle(batch, *, clip_eps=0.2, value_clip=0.2, vf_coef=1.0, dual_clip=None, normalizer=None):
    """float64 losses and statistics straight from the formulas; returns (dict of results, lp, v) for autograd."""
    lp = batch["logprobs"].double().requires_grad_()
    v = batch["values"].double().requires_grad_()
    old_lp, adv, old_v, ret = (batch[k].double() for k in ("old_logprobs", "advantages", "old_values", "returns"))
    m = batch["mask"].bool()
    ratio = torch.exp(lp - old_lp)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        dual = (adv < 0) & (-dual_clip * adv < pg)
        pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
        clipped = clipped | dual
    vf = (v - ret) ** 2
    vclipped = torch.zeros_like(m)
    if value_clip is not None:
        vf2 = (old_v + (v - old_v).clamp(-value_clip, value_clip) - ret) ** 2
        vclipped = vf2 > vf
        vf = torch.maximum(vf, vf2)
    n = torch.as_tensor(m.sum() if normalizer is None else normalizer, dtype=torch.float64)
    n = torch.where(n > 0, n, torch.ones((), dtype=torch.float64))

    def mean(x):
        return torch.where(m, x, torch.zeros((), dtype=x.dtype)).sum() / n

    policy_loss, value_loss = mean(pg), 0.5 * mean(vf)
    out = dict(loss=policy_loss + vf_coef * value_loss, policy_loss=policy_loss, value_loss=value_loss,
               clipfrac=mean(clipped.double()), value_clipfrac=mean(vclipped.double()),
               approx_kl=mean((ratio - 1) - (lp - old_lp)), ratio_mean=mean(ratio))
    return out, lp, v


def run(batch, backend, **kw):
    lp = batch["logprobs"].detach().clone().requires_grad_()
    v = batch["values"].detach().clone().requires_grad_()
    args = dict(batch, logprobs=lp, values=v)
    out = ppo_loss(*(args[k] for k in NAMES), args["mask"], backend=backend, **kw)
    return out, lp, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value_clip", [0.2, None])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("normalizer", [None, 150.0, "tensor"])
def test_matches_float64_autograd(backend, value_clip, dual_clip, normalizer):
    batch = make_batch((4, 37), strided=normalizer == "tensor")
    norm = torch.tensor(170) if normalizer == "tensor" else normalizer      # an int tensor is accepted too
    kw = dict(clip_eps=0.2, value_clip=value_clip, vf_coef=0.7, dual_clip=dual_clip, normalizer=norm)
    out, lp, v = run(batch, backend, **kw)
    want, lp64, v64 = oracle(batch, **kw)

    assert isinstance(out, PPOLossOutput)
    for name in PPOLossOutput._fields:
        got = getattr(out, name)
        assert got.shape == () and got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
    # The same upstream gradient through the three differentiable outputs.
    w = torch.randn(3)
    (w[0] * out.loss + w[1] * out.policy_loss + w[2] * out.value_loss).backward()
    w = w.double()
    (w[0] * want["loss"] + w[1] * want["policy_loss"] + w[2] * want["value_loss"]).backward()
    torch.testing.assert_close(lp.grad.double(), lp64.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs(backend, dtype):
    """bf16/fp16 inputs are computed in fp32; gradients come back in the inputs' dtype."""
    batch = make_batch((3, 50), dtype)
    out, lp, v = run(batch, backend, dual_clip=2.0)
    want, lp64, v64 = oracle(batch, dual_clip=2.0)
    for name in PPOLossOutput._fields:
        torch.testing.assert_close(getattr(out, name).double(), want[name].detach(), atol=1e-6, rtol=1e-5,
                                   msg=name)
    out.loss.backward()
    want["loss"].backward()
    assert lp.grad.dtype == dtype and v.grad.dtype == dtype
    for got, exp in ((lp.grad, lp64.grad), (v.grad, v64.grad)):
        ulp = torch.finfo(dtype).eps * exp.abs().max().item()
        torch.testing.assert_close(got.double(), exp, atol=1e-7 + ulp, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_micro_batch(backend):
    """No valid token (and NaN everywhere): zero loss, zero statistics, zero gradients, no NaN."""
    batch = make_batch((2, 9), p_valid=0.0)
    for k in NAMES:
        batch[k] = torch.full_like(batch[k], float("nan"))
    for normalizer in (None, 0.0, torch.tensor(0.0)):
        out, lp, v = run(batch, backend, normalizer=normalizer, dual_clip=3.0)
        (out.loss + out.policy_loss + out.value_loss).backward()
        assert all(getattr(out, name).item() == 0 for name in PPOLossOutput._fields)
        assert (lp.grad == 0).all() and (v.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 7), (3, 0), (2, 0, 5)], ids=str)
def test_empty_inputs(backend, shape):
    """No token at all is a fully masked batch: zero results, and zero (empty) gradients."""
    batch = make_batch(shape)
    for normalizer in (None, 5.0, torch.tensor(0.0)):
        out, lp, v = run(batch, backend, normalizer=normalizer, dual_clip=3.0)
        (out.loss + out.policy_loss + out.value_loss).backward()
        for name in PPOLossOutput._fields:
            got = getattr(out, name)
            assert got.shape == () and got.dtype == torch.float32 and got.item() == 0, name
        assert lp.grad.shape == shape and v.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_positions_are_ignored(backend):
    """NaN or huge garbage off the mask changes nothing; int, uint8 and float masks act as bool."""
    batch = make_batch((3, 20))
    ref_out, ref_lp, ref_v = run(batch, backend)
    ref_out.loss.backward()
    dirty = dict(batch)
    for i, k in enumerate(NAMES):
        dirty[k] = torch.where(batch["mask"], batch[k], float("nan") if i % 2 else 1e30)
    for mask in (batch["mask"], batch["mask"].long(), batch["mask"].to(torch.uint8), batch["mask"].float()):
        out, lp, v = run(dict(dirty, mask=mask), backend)
        out.loss.backward()
        for name in PPOLossOutput._fields:
            torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lp.grad, ref_lp.grad)
        torch.testing.assert_close(v.grad, ref_v.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_add_up_with_a_shared_normalizer(backend):
    """Token means over a minibatch = the sum over its micro-batches when all divide by the minibatch count."""
    batch = make_batch((6, 25))
    total = batch["mask"].sum().float()
    whole, lp, v = run(batch, backend, normalizer=total)
    whole.loss.backward()
    parts = [run({k: x[rows] for k, x in batch.items()}, backend, normalizer=total)
             for rows in (slice(0, 2), slice(2, 6))]
    for name in PPOLossOutput._fields:
        torch.testing.assert_close(sum(getattr(p[0], name) for p in parts), getattr(whole, name), atol=1e-6, rtol=1e-5)
    for p in parts:
        p[0].loss.backward()
    torch.testing.assert_close(torch.cat([p[1].grad for p in parts]), lp.grad)
    torch.testing.assert_close(torch.cat([p[2].grad for p in parts]), v.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_one_output_and_values_only(backend):
    batch = make_batch((3, 30))
    out, lp, v = run(batch, backend)
    out.value_loss.backward()
    assert (lp.grad == 0).all()
    want, _, v64 = oracle(batch)
    want["value_loss"].backward()
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=1e-7, rtol=1e-5)
    # Only values requires grad (critic warm-up), and statistics are not differentiable.
    v2 = batch["values"].clone().requires_grad_()
    out2 = ppo_loss(*(batch[k] if k != "values" else v2 for k in NAMES), batch["mask"], backend=backend)
    out2.loss.backward()
    torch.testing.assert_close(v2.grad, v.grad)
    assert not out2.clipfrac.requires_grad and not out2.approx_kl.requires_grad and not out2.ratio_mean.requires_grad


@pytest.mark.parametrize("one_program_tiles", [1, 100])
def test_kernel_two_stage_reduction(one_program_tiles):
    """Many programs writing partial sums + the reduce kernel = one program = the torch path."""
    batch = make_batch((5, 40))
    inputs = tuple(batch[k] for k in NAMES) + (batch["mask"],)
    for normalizer in (None, 77.0, torch.tensor(80.0)):
        got = _fwd_triton(inputs, normalizer, 0.2, 0.2, 0.5, 3.0, tile=16, one_program_tiles=one_program_tiles)
        want = torch_backend.ppo_loss_forward(*inputs, 0.2, 0.2, 0.5, 3.0, normalizer)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_backends_agree():
    batch = make_batch((4, 64))
    a, lp_a, v_a = run(batch, "torch", dual_clip=3.0)
    b, lp_b, v_b = run(batch, "triton", dual_clip=3.0)
    (a.loss + b.loss).backward()
    for name in PPOLossOutput._fields:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp_a.grad, lp_b.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(v_a.grad, v_b.grad, atol=1e-7, rtol=1e-5)


def _call(**overrides):
    batch = make_batch((2, 5))
    kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in NAMES and k != "mask"}
    batch.update(overrides)
    return ppo_loss(*(batch[k] for k in NAMES), batch["mask"], **kwargs)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: _call(returns=torch.randn(2, 4)), ValueError, "returns"),
    (lambda: _call(mask=torch.ones(5, 2, dtype=torch.bool)), ValueError, "mask"),
    (lambda: _call(advantages=torch.ones(2, 5, dtype=torch.long)), TypeError, "advantages"),
    (lambda: _call(old_values=torch.randn(2, 5).double()), TypeError, "old_values"),
    (lambda: _call(mask=torch.ones(2, 5, dtype=torch.complex64)), TypeError, "mask"),
    (lambda: _call(values=[[0.0] * 5] * 2), TypeError, "values"),
    (lambda: _call(old_logprobs=torch.randn(2, 5, device="meta")), ValueError, "old_logprobs"),
    (lambda: _call(mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "mask"),
    (lambda: _call(clip_eps=-0.1), ValueError, "clip_eps"),
    (lambda: _call(value_clip=-0.2), ValueError, "value_clip"),
    (lambda: _call(vf_coef=-1.0), ValueError, "vf_coef"),
    (lambda: _call(dual_clip=1.0), ValueError, "dual_clip"),
    (lambda: _call(dual_clip="3"), TypeError, "dual_clip"),
    (lambda: _call(normalizer=-1.0), ValueError, "normalizer"),
    (lambda: _call(normalizer=torch.ones(2)), ValueError, "normalizer"),
    (lambda: _call(normalizer=torch.tensor(True)), TypeError, "normalizer"),
    (lambda: _call(normalizer=torch.tensor(3.0, device="meta")), ValueError, "normalizer"),
    (lambda: _call(backend="cpu"), ValueError, "backend"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
