"""ppo_loss against float64 autograd of the PPO formulas (Schulman et al. 2017), its
statistics, masking and normalizer semantics, and the argument checks.

On CPU the "triton" backend runs in the interpreter; on CUDA, the compiled kernels
(see tests/kernels/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fastppo import algo
from fastppo.kernels import PPOLossOutput, ppo_loss
from fastppo.kernels.ppo_loss import _fwd_triton
from fastppo_testing.devices import VALUES_CHECKED_ON_CPU_ONLY, on_test_device

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


def oracle(batch, **kw):
    """float64 losses and statistics straight from the formulas; returns (dict of results, lp, v) for autograd."""
    lp = batch["logprobs"].double().requires_grad_()
    v = batch["values"].double().requires_grad_()
    args = dict({k: batch[k].double() for k in NAMES}, logprobs=lp, values=v)
    return algo.ppo_loss(*(args[k] for k in NAMES), batch["mask"], **kw)._asdict(), lp, v


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
def test_a_ratio_beyond_exps_range_is_clipped_without_nan(backend):
    """A valid token whose log ratio exceeds float32 exp's range (old logprob −100 or −inf, A > 0): the clipped
    branch wins, its gradient is 0 (not ∞·0), and the loss is the clipped one."""
    for old in (-100.0, float("-inf")):
        lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
        olds, adv = torch.tensor([[old, -1.1]]), torch.tensor([[1.0, 1.0]])
        v = torch.zeros(1, 2, requires_grad=True)
        out = ppo_loss(lp, olds, adv, v, v.detach(), v.detach(), torch.ones(1, 2, dtype=torch.bool), backend=backend)
        out.loss.backward()
        assert torch.isfinite(lp.grad).all() and lp.grad[0, 0] == 0, old
        ratio = torch.exp(torch.tensor(0.1))
        want = -(1.2 + torch.minimum(ratio, torch.tensor(1.2)).item()) / 2       # both tokens' −min(ρA, clip(ρ)A)
        torch.testing.assert_close(out.policy_loss, torch.tensor(want), atol=1e-6, rtol=1e-6)


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
    """Many programs writing partial sums + the reduce kernel = one program = the float64 formulas."""
    batch = make_batch((5, 40))
    inputs = tuple(batch[k] for k in NAMES) + (batch["mask"],)
    for normalizer in (None, 77.0, torch.tensor(80.0)):
        got = _fwd_triton(inputs, normalizer, 0.2, 0.2, 0.5, 3.0, tile=16, one_program_tiles=one_program_tiles)
        want, _, _ = oracle(batch, clip_eps=0.2, value_clip=0.2, vf_coef=0.5, dual_clip=3.0, normalizer=normalizer)
        torch.testing.assert_close(got[:7].double(), torch.stack([want[name] for name in PPOLossOutput._fields]).detach(),
                                   atol=1e-6, rtol=1e-5)
        assert got[7].item() == float(batch["mask"].sum() if normalizer is None else normalizer)   # the normalizer


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


# ----------------------------------------------------------------------------
# clip_eps_high (clip-higher) and policy_weight
# ----------------------------------------------------------------------------

def random_weight(shape, dtype=torch.float32):
    """Weights as rollout correction makes them: ratios around 1, truncated, a fifth of the tokens dropped (0)."""
    w = torch.exp(torch.randn(shape) * 0.3).clamp(max=2.0)
    return torch.where(torch.rand(shape) < 0.2, 0.0, w).to(dtype)


NEW_ARGS = {"high": dict(clip_eps_high=0.28), "weight": dict(weight=True), "both": dict(clip_eps_high=0.28,
                                                                                         weight=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float64),
                                                (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("new", list(NEW_ARGS))
def test_clip_higher_and_policy_weight_match_float64(backend, dtype, weight_dtype, dual_clip, new):
    """Forward and backward against float64 autograd of the formulas, on an odd shape, each new argument alone
    and both together, with and without dual clip, for every input dtype (the weight in another float dtype).

    The oracle reads the same (rounded) inputs, so the only error is the op's float32 arithmetic: a few
    float32 roundings per token (≤ ~1e-6 relative) and sums of ≤ 111 terms (≤ ~1e-5 relative in the worst
    case), hence rtol 1e-5 and atol 1e-6 on O(1) results; the gradients are then rounded once to the input
    dtype (one ulp: eps of the dtype, relative; the interpreter's bf16 stores truncate)."""
    kw = dict(NEW_ARGS[new])
    batch = make_batch((3, 37), dtype)
    weight = random_weight((3, 37), weight_dtype) if kw.pop("weight", False) else None
    kw.update(dual_clip=dual_clip, vf_coef=0.7)
    out, lp, v = run(batch, backend, policy_weight=weight, **kw)
    want, lp64, v64 = oracle(batch, policy_weight=weight, **kw)
    for name in PPOLossOutput._fields:
        torch.testing.assert_close(getattr(out, name).double(), want[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
    g = torch.randn(3)
    (g[0] * out.loss + g[1] * out.policy_loss + g[2] * out.value_loss).backward()
    g = g.double()
    (g[0] * want["loss"] + g[1] * want["policy_loss"] + g[2] * want["value_loss"]).backward()
    assert lp.grad.dtype == dtype and v.grad.dtype == dtype
    ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    for got, exp in ((lp.grad, lp64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), exp, atol=1e-7, rtol=1e-5 + ulp)
    if weight is not None:
        assert (lp.grad[(weight == 0) | ~batch["mask"]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_higher_by_hand(backend):
    """Ratios 0.7 (A < 0), 1.1, 1.25, 1.4 (A > 0) with ε = 0.2: ε_high = 0.28 lets 1.25 through unclipped
    (clipfrac 2/4 instead of 3/4) and clips 1.4 at 1.28: policy_loss = (0.8 − 1.1 − 1.25 − 1.28) / 4."""
    ratio = torch.tensor([[0.7, 1.1, 1.25, 1.4]])
    batch = dict(logprobs=ratio.log(), old_logprobs=torch.zeros(1, 4), advantages=torch.tensor([[-1.0, 1, 1, 1]]),
                 values=torch.zeros(1, 4), old_values=torch.zeros(1, 4), returns=torch.zeros(1, 4),
                 mask=torch.ones(1, 4, dtype=torch.bool))
    # exp(log ρ) in float32 is ρ within a few ulps (~1e-7 relative): atol 1e-6 on O(1) means.
    out, lp, _ = run(batch, backend, clip_eps_high=0.28)
    torch.testing.assert_close(out.policy_loss.item(), (0.8 - 1.1 - 1.25 - 1.28) / 4, atol=1e-6, rtol=0)
    assert out.clipfrac.item() == 0.5
    out.policy_loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -1.1, -1.25, 0.0]]) / 4, atol=1e-6, rtol=0)
    symmetric, _, _ = run(batch, backend)
    assert symmetric.clipfrac.item() == 0.75


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_means_the_symmetric_range_and_unit_weights(backend):
    """clip_eps_high=None is clip_eps and policy_weight=None is w = 1, to the bit (x·1 = x exactly in IEEE
    arithmetic, and ε_high = ε is the same float)."""
    batch = make_batch((4, 33))
    base, lp0, v0 = run(batch, backend, dual_clip=3.0)
    same, lp1, v1 = run(batch, backend, dual_clip=3.0, clip_eps_high=0.2, policy_weight=torch.ones(4, 33))
    (base.loss + base.policy_loss).backward()
    (same.loss + same.policy_loss).backward()
    for name in PPOLossOutput._fields:
        assert torch.equal(getattr(base, name), getattr(same, name)), name
    assert torch.equal(lp0.grad, lp1.grad) and torch.equal(v0.grad, v1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_drops_tokens_but_keeps_the_normalizer(backend):
    """w_t = 0 gives the policy loss and gradient of the surrogate without those tokens, still divided by the
    count of all valid tokens; the value loss and the statistics are not weighted. Both runs add the same
    nonzero terms in the same order (the dropped ones add 0), so they agree to float32 rounding of the final
    division (rtol 1e-6)."""
    batch = make_batch((5, 29))
    weight = random_weight((5, 29))
    dropped = weight == 0
    assert (dropped & batch["mask"]).any()
    full, lp, v = run(batch, backend, policy_weight=weight, clip_eps_high=0.3)
    kept, lp_k, _ = run(dict(batch, mask=batch["mask"] & ~dropped), backend, policy_weight=weight, clip_eps_high=0.3,
                        normalizer=batch["mask"].sum().float())
    full.policy_loss.backward()
    kept.policy_loss.backward()
    torch.testing.assert_close(full.policy_loss, kept.policy_loss, atol=0, rtol=1e-6)
    torch.testing.assert_close(lp.grad, lp_k.grad, atol=0, rtol=1e-6)
    unweighted, _, _ = run(batch, backend, clip_eps_high=0.3)
    for name in ("value_loss", "clipfrac", "value_clipfrac", "approx_kl", "ratio_mean"):
        assert torch.equal(getattr(full, name), getattr(unweighted, name)), name


def test_new_arguments_backends_agree():
    batch = make_batch((4, 64))
    weight = random_weight((4, 64), torch.bfloat16)
    a, lp_a, v_a = run(batch, "torch", dual_clip=3.0, clip_eps_high=0.25, policy_weight=weight)
    b, lp_b, v_b = run(batch, "triton", dual_clip=3.0, clip_eps_high=0.25, policy_weight=weight)
    (a.loss + b.loss).backward()
    for name in PPOLossOutput._fields:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp_a.grad, lp_b.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(v_a.grad, v_b.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_weight_off_the_mask_is_not_read(backend):
    batch = make_batch((3, 20))
    weight = random_weight((3, 20))
    ref_out, _, _ = run(batch, backend, policy_weight=weight)
    dirty = torch.where(batch["mask"], weight, float("nan"))
    out, _, _ = run(batch, backend, policy_weight=dirty)
    torch.testing.assert_close(out.policy_loss, ref_out.policy_loss, atol=0, rtol=0)


@pytest.mark.parametrize("over,exc,match", [
    (dict(clip_eps_high=-0.1), ValueError, "clip_eps_high"),
    (dict(clip_eps_high="0.3"), TypeError, "clip_eps_high"),
    (dict(policy_weight=torch.ones(2, 4)), ValueError, "policy_weight"),
    (dict(policy_weight=torch.ones(2, 5, dtype=torch.long)), TypeError, "policy_weight"),
    (dict(policy_weight=[[1.0] * 5] * 2), TypeError, "policy_weight"),
    (dict(policy_weight=torch.ones(2, 5, device="meta")), ValueError, "policy_weight"),
    *(pytest.param(dict(policy_weight=torch.full((2, 5), bad)), ValueError, "policy_weight must be finite and >= 0",
                   marks=VALUES_CHECKED_ON_CPU_ONLY) for bad in (-0.5, float("nan"), float("inf"))),
])
def test_bad_new_arguments(over, exc, match):
    batch = make_batch((2, 5), p_valid=1.0)
    with pytest.raises(exc, match=match):
        ppo_loss(*(batch[k] for k in NAMES), batch["mask"], **{k: on_test_device(v) for k, v in over.items()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_weight_gets_no_gradient(backend):
    """A weight computed with autograd on (e.g. from logprobs that require grad) is used as a constant."""
    batch = make_batch((2, 11))
    weight = random_weight((2, 11)).requires_grad_()
    out, lp, _ = run(batch, backend, policy_weight=weight)
    out.loss.backward()
    assert weight.grad is None and lp.grad is not None


# ----------------------------------------------------------------------------
# ratio_level="sequence" (GSPO) and policy_loss="cispo"
# ----------------------------------------------------------------------------

# Each row's mean log-ratio, away from the clip points log(1 − 0.1), log(1 + 0.15) by ≥ 0.04 (far beyond the
# float32 error of a mean), on both sides of them and beyond the dual clip c = 3 (log 4).
ROW_LOG_RATIOS = [-0.5, -0.15, -0.02, 0.03, 0.2, 0.6, 1.3863, 0.0]
KINDS = {"gspo": dict(ratio_level="sequence"), "cispo": dict(policy_loss="cispo"),
         "gspo_cispo": dict(ratio_level="sequence", policy_loss="cispo")}
EXTRAS = {"plain": {}, "dual": dict(dual_clip=3.0), "high_weight": dict(clip_eps_high=0.15, weight=True)}


def sequence_batch(dtype, rows=8, cols=37):
    """A padded (rows, cols) batch whose rows' mean log-ratios are ROW_LOG_RATIOS (the last row fully masked)."""
    batch = make_batch((rows, cols))
    mask = batch["mask"]
    mask[-1] = False
    noise = (batch["logprobs"] - batch["old_logprobs"]) * mask
    mean = noise.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    batch["logprobs"] = batch["old_logprobs"] + noise - mean + torch.tensor(ROW_LOG_RATIOS[:rows])[:, None]
    return {k: v.to(dtype) if k != "mask" else v for k, v in batch.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind,extra", [(k, e) for k in KINDS for e in EXTRAS
                                         if not (KINDS[k].get("policy_loss") == "cispo" and e == "dual")])
def test_sequence_ratio_and_cispo_match_float64(backend, dtype, kind, extra):
    """GSPO's sequence ratio and CISPO's truncated weight against `algo.ppo_loss` (float64 autograd), forward and
    backward, on an odd padded shape with a fully masked row, every input dtype, with the dual clip (PPO only)
    or clip-higher and a policy weight. The same error budget as the token-level tests: a few float32
    roundings per token and sums of ≤ 37 terms per row mean and ≤ 296 per result (rtol 1e-5, atol 1e-6), the
    gradients rounded once to the input dtype (the GSPO row sums stay in float32 until then)."""
    kw = dict(KINDS[kind], **EXTRAS[extra])
    batch = sequence_batch(dtype)
    weight = random_weight(batch["mask"].shape) if kw.pop("weight", False) else None
    kw.update(clip_eps=0.1, vf_coef=0.7)
    out, lp, v = run(batch, backend, policy_weight=weight, **kw)
    want, lp64, v64 = oracle(batch, policy_weight=weight, **kw)
    for name in PPOLossOutput._fields:
        torch.testing.assert_close(getattr(out, name).double(), want[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
    assert 0 < want["clipfrac"].item() < 1                     # both branches taken
    g = torch.randn(3)
    (g[0] * out.loss + g[1] * out.policy_loss + g[2] * out.value_loss).backward()
    g = g.double()
    (g[0] * want["loss"] + g[1] * want["policy_loss"] + g[2] * want["value_loss"]).backward()
    assert lp.grad.dtype == dtype and v.grad.dtype == dtype
    ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    for got, exp in ((lp.grad, lp64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), exp, atol=1e-7, rtol=1e-5 + ulp)
    assert (lp.grad[~batch["mask"]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_ratio_by_hand(backend):
    """Two rows with token ratios (2, 0.5) and (1.21, 1): sequence ratios exp(mean log) = 1 and 1.1. With
    A = 1, ε = 0.05: row 0 unclipped, each token's loss −1, row 1 clipped at 1.05 (no gradient):
    policy_loss = (−1 − 1 − 1.05 − 1.05) / 4. The row-0 tokens share d/d log s = −1 − 1, and d log s / d lp_t
    = 1/2: gradient −1 / 4 each, the same for both although their own ratios differ."""
    lp = torch.tensor([[2.0, 0.5], [1.21, 1.0]]).log()
    zeros = torch.zeros(2, 2)
    batch = dict(logprobs=lp, old_logprobs=zeros, advantages=torch.ones(2, 2), values=zeros, old_values=zeros,
                 returns=zeros, mask=torch.ones(2, 2, dtype=torch.bool))
    out, lp_, _ = run(batch, backend, clip_eps=0.05, ratio_level="sequence")
    torch.testing.assert_close(out.policy_loss.item(), (-2 - 2.1) / 4, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.ratio_mean.item(), (2 + 2.2) / 4, atol=1e-6, rtol=0)
    assert out.clipfrac.item() == 0.5
    out.policy_loss.backward()
    torch.testing.assert_close(lp_.grad, torch.tensor([[-1.0, -1.0], [0.0, 0.0]]) / 4, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_by_hand(backend):
    """Token ratios 0.5, 1.1, 2 with A = (1, −1, 1), ε_high = 0.2: weights 0.5, 1.1, 1.2 (the last truncated), so
    the gradients are −w·A / 3 even where PPO's clip would cut them (ratio 2, A > 0)."""
    lp = torch.tensor([[0.5, 1.1, 2.0]]).log()
    zeros = torch.zeros(1, 3)
    batch = dict(logprobs=lp, old_logprobs=zeros, advantages=torch.tensor([[1.0, -1.0, 1.0]]), values=zeros,
                 old_values=zeros, returns=zeros, mask=torch.ones(1, 3, dtype=torch.bool))
    out, lp_, _ = run(batch, backend, clip_eps=0.2, policy_loss="cispo")
    want = -(0.5 * lp[0, 0] - 1.1 * lp[0, 1] + 1.2 * lp[0, 2]).item() / 3
    torch.testing.assert_close(out.policy_loss.item(), want, atol=1e-6, rtol=0)
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    out.policy_loss.backward()
    torch.testing.assert_close(lp_.grad, torch.tensor([[-0.5, 1.1, -1.2]]) / 3, atol=1e-6, rtol=0)


@pytest.mark.parametrize("over,match", [
    (dict(ratio_level="seq"), "ratio_level must be one of"),
    (dict(policy_loss="grpo"), "policy_loss must be one of"),
    (dict(policy_loss="cispo", dual_clip=3.0), "dual_clip"),
])
def test_bad_ratio_level_and_policy_loss(over, match):
    batch = make_batch((2, 5))
    with pytest.raises(ValueError, match=match):
        ppo_loss(*(batch[k] for k in NAMES), batch["mask"], **over)
