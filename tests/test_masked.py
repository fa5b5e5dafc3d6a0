"""fastppo.masked: masked mean / variance / whitening against float64 over the
valid entries, and global whitening over a 2-process gloo group equal to
whitening the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from fastppo import algo
from fastppo.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten
from fastppo_testing.masked_dist import masked_stats_worker


def reference_stats(x, mask):
    """float64 mean and unbiased variance of the valid entries."""
    v = x[mask.bool()].double()
    return v.mean(), v.var(unbiased=True)


def with_garbage(x, mask):
    """NaN at every invalid position: masked ops must never read them."""
    return torch.where(mask.bool(), x, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_mean_var_sum(dtype):
    x = (torch.randn(6, 40) * 3 + 100).to(dtype)                  # a large mean must not cancel the variance
    mask = torch.rand(6, 40) < 0.6
    xg = with_garbage(x, mask)
    mean, var = reference_stats(x, mask)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_mean(xg, mask).double(), mean, **tol)
    torch.testing.assert_close(masked_var(xg, mask).double(), var, **tol)
    n = mask.sum()
    torch.testing.assert_close(masked_var(xg, mask, unbiased=False).double(), var * (n - 1) / n, **tol)
    torch.testing.assert_close(masked_sum(xg, mask).double(), x[mask].double().sum(), atol=1e-3, rtol=1e-5)
    assert masked_count(mask).item() == mask.sum().item()
    assert masked_mean(x, mask).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Along a dimension: per-row means.
    rows = masked_mean(xg, mask, dim=1)
    want = torch.stack([x[i][mask[i]].double().mean() for i in range(6)])
    torch.testing.assert_close(rows.double(), want, **tol)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    x = torch.randn(5, 33) * 2 + 3
    mask = torch.rand(5, 33) < 0.5
    out = masked_whiten(with_garbage(x, mask), mask, shift_mean=shift_mean)
    want = algo.masked_whiten(x.double(), mask, shift_mean=shift_mean)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    if shift_mean:
        assert abs(out[mask].double().mean().item()) < 1e-5
        assert out[mask].double().std().item() == pytest.approx(1.0, abs=1e-4)


def test_mask_dtypes_and_empty():
    x = torch.randn(4, 10)
    mask = torch.rand(4, 10) < 0.5
    ref = masked_whiten(x, mask)
    for m in (mask.long(), mask.float(), mask.to(torch.uint8)):
        torch.testing.assert_close(masked_whiten(x, m), ref)
    none = torch.zeros(4, 10, dtype=torch.bool)
    nan_x = torch.full((4, 10), float("nan"))
    assert masked_mean(nan_x, none).item() == 0 and masked_var(nan_x, none).item() == 0
    assert (masked_whiten(nan_x, none) == 0).all()
    one = none.clone()
    one[1, 3] = True
    assert masked_var(x, one).item() == 0 and torch.isfinite(masked_whiten(x, one)).all()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: masked_mean(torch.randn(3), torch.ones(4, dtype=torch.bool)), ValueError, "mask"),
    (lambda: masked_mean(torch.arange(3), torch.ones(3, dtype=torch.bool)), TypeError, "x"),
    (lambda: masked_whiten([1.0], torch.ones(1, dtype=torch.bool)), TypeError, "x"),
    (lambda: masked_whiten(torch.randn(3), torch.ones(3, dtype=torch.bool, device="meta")), ValueError, "mask"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_global_whitening_equals_whitening_the_concatenated_batch(tmp_path):
    """Two gloo ranks with shards of different shapes: every global statistic equals the one
    of the concatenation, and each rank's whitened shard equals its slice of the whitened whole."""
    shards = []
    for shape in ((3, 7), (5, 4)):
        x = torch.randn(shape) * 2 + 5
        mask = torch.rand(shape) < 0.7
        shards.append((with_garbage(x, mask), mask))
    mp.spawn(masked_stats_worker, args=(2, str(tmp_path / "init"), shards, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    flat_x = torch.cat([x.reshape(-1) for x, _ in shards])
    flat_m = torch.cat([m.reshape(-1) for _, m in shards])
    whole = masked_whiten(flat_x, flat_m)
    whole_no_shift = masked_whiten(flat_x, flat_m, shift_mean=False)
    offset = 0
    for rank, ((x, mask), res) in enumerate(zip(shards, results)):
        n = x.numel()
        torch.testing.assert_close(res["whiten"], whole[offset:offset + n].view(x.shape), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["whiten_no_shift"], whole_no_shift[offset:offset + n].view(x.shape),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["mean"], masked_mean(flat_x, flat_m), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["var"], masked_var(flat_x, flat_m), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["sum"], masked_sum(flat_x, flat_m), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(res["local_mean"], masked_mean(x, mask))          # group=None: no communication
        offset += n
