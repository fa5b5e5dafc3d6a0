"""fastppo.dist's reduce helpers (one helper parametrised by the op), the masked statistics they
share with fastppo.masked, and the classification of collective failures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from fastppo import dist

from fastppo import optim
from fastppo.masked import masked_moments


def test_all_reduce_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="op must be one of"):
        dist.all_reduce(torch.ones(2), "mean")


def test_helpers_are_identities_in_one_process():
    x = torch.tensor([1.0, -2.0])
    for op in ("sum", "max", "min"):
        assert torch.equal(dist.all_reduce(x, op), x)
    assert dist.all_reduce_dict({"a": x[0]}) == {"a": x[0]}
    assert torch.equal(dist.all_gather_cat(x), x)
    assert dist.group() is None


def test_masked_moments_population_and_sample_variance():
    x = torch.tensor([1.0, 2.0, 4.0, 100.0, float("nan")])
    mask = torch.tensor([True, True, True, True, False])
    count, mean, var = masked_moments(x, mask, unbiased=False)
    valid = x[mask]
    # float32 sums of four small integers and their centred squares: a few ulps of error at most.
    torch.testing.assert_close(count, torch.tensor(4.0))
    torch.testing.assert_close(mean, valid.mean())
    torch.testing.assert_close(var, valid.var(correction=0))
    torch.testing.assert_close(masked_moments(x, mask)[2], valid.var(correction=1))


@pytest.mark.parametrize("exc, expected", [
    (tdist.DistBackendError("NCCL communicator was aborted"), True),
    (tdist.DistNetworkError("connection refused"), True),
    (tdist.DistStoreError("store timeout"), True),
    (RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 8000ms for recv operation"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("gloo"), False),
])
def test_collective_failure_classification(exc, expected):
    assert dist._is_collective_failure(exc) is expected


@pytest.mark.parametrize("max_norm", [None, 0.5, 100.0])
def test_grad_norm_returns_the_norm_and_clips_the_parameters_gradients(max_norm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)                                 # a frozen parameter: no .grad
    model(torch.randn(5, 3)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = optim.grad_norm(model, max_norm)
    full = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in before]))
    # Both sides are float32 sums of ~30 squares: a relative error of a few ulps (1.3e-6 is ~10 ulps).
    torch.testing.assert_close(norm, full, rtol=1.3e-6, atol=0.0)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    # torch scales by max_norm / (norm + 1e-6) when that is below 1 (the 1e-6 guards a zero norm).
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (float(full) + 1e-6))
    for g0, g1 in zip(before, after):
        torch.testing.assert_close(g1, g0 * scale, rtol=1.3e-6, atol=0.0)
    if max_norm == 0.5:
        assert float(full) > 0.5                                          # the case where clipping must happen
