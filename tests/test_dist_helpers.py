"""fastppo.dist's reduce helpers (one helper parametrised by the op), the masked statistics they
share with fastppo.masked, and the classification of collective failures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from fastppo import dist
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
