"""Inputs a user gets wrong across the fused ops: the error names the argument, whichever backend runs.

Meta tensors (a model built on the meta device whose weights were never loaded) have a shape and no data: the
Triton backend failed deep in the launcher and the torch backend returned meta results. NumPy scalars
(a value read from a NumPy array or a config computed with NumPy) are numbers like Python's; a non-finite
temperature makes every probability NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastppo.kernels import gae, kl_penalty, linear_ppo_loss, linear_token_logprobs, ppo_loss, sample, token_logprobs

BACKENDS = ["torch", "triton"]


def _inputs(gen):
    B, T, V, H = 2, 5, 11, 8
    return dict(
        logits=torch.randn(B, T, V, generator=gen), labels=torch.randint(0, V, (B, T), generator=gen),
        lp=torch.randn(B, T, generator=gen) - 2, mask=torch.ones(B, T), hidden=torch.randn(B * T, H, generator=gen),
        weight=torch.randn(V, H, generator=gen), flat_labels=torch.randint(0, V, (B * T,), generator=gen),
        ids=torch.arange(B),
    )


def _calls(x, backend):
    """(argument made meta, call) for every op; `m` turns the named argument into a meta tensor."""
    lp, mask = x["lp"], x["mask"]
    n = x["flat_labels"].numel()
    return {
        "token_logprobs": ("logits", lambda m: token_logprobs(m(x["logits"]), x["labels"], backend=backend)),
        "kl_penalty": ("logprobs", lambda m: kl_penalty(m(lp), lp, backend=backend)),
        "gae": ("rewards", lambda m: gae(m(lp), lp, mask, backend=backend)),
        "ppo_loss": ("logprobs", lambda m: ppo_loss(m(lp), lp, lp, lp, lp, lp, mask, backend=backend)),
        "linear_token_logprobs": ("hidden", lambda m: linear_token_logprobs(m(x["hidden"]), x["weight"],
                                                                           x["flat_labels"], backend=backend)),
        "linear_ppo_loss": ("hidden", lambda m: linear_ppo_loss(m(x["hidden"]), x["weight"], x["flat_labels"],
                                                                lp.reshape(n), lp.reshape(n), mask.reshape(n),
                                                                backend=backend)),
        "sample": ("logits", lambda m: sample(m(x["logits"][:, 0]), seed=0, sample_ids=x["ids"], step=0,
                                              backend=backend)),
    }


@pytest.mark.cpu_only("meta tensors are built on the CPU here; the check does not depend on the device")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "kl_penalty", "gae", "ppo_loss", "linear_token_logprobs",
                                "linear_ppo_loss", "sample"])
def test_a_meta_tensor_is_named(op, backend):
    arg, call = _calls(_inputs(torch.Generator().manual_seed(0)), backend)[op]
    with pytest.raises(ValueError, match=rf"^{arg} is on the meta device"):
        call(lambda t: t.to("meta"))
    call(lambda t: t)                                   # the same call with data runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_numbers(backend):
    x = _inputs(torch.Generator().manual_seed(1))
    for np_t in (np.float32(0.7), np.float64(0.7)):
        got = token_logprobs(x["logits"], x["labels"], temperature=np_t, backend=backend)
        want = token_logprobs(x["logits"], x["labels"], temperature=float(np_t), backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    lp, mask = x["lp"], x["mask"]
    got = ppo_loss(lp, lp - 0.1, lp, lp, lp, lp, mask, clip_eps=np.float64(0.2), dual_clip=np.float32(3.0),
                   backend=backend).loss
    want = ppo_loss(lp, lp - 0.1, lp, lp, lp, lp, mask, clip_eps=0.2, dual_clip=float(np.float32(3.0)),
                    backend=backend).loss
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, np.bool_(True), "0.7"])
def test_a_temperature_that_is_not_a_finite_number_is_named(bad, backend):
    x = _inputs(torch.Generator().manual_seed(2))
    with pytest.raises((TypeError, ValueError), match="^temperature must be"):
        token_logprobs(x["logits"], x["labels"], temperature=bad, backend=backend)
    with pytest.raises((TypeError, ValueError), match="^temperature must be"):
        linear_token_logprobs(x["hidden"], x["weight"], x["flat_labels"], temperature=bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sampler_takes_numpy_scalars(backend):
    x = _inputs(torch.Generator().manual_seed(3))
    logits, ids = x["logits"][:, 0], x["ids"]
    want = sample(logits, seed=5, sample_ids=ids, step=2, temperature=0.75, top_k=4, top_p=0.9, backend=backend)
    got = sample(logits, seed=np.uint32(5), sample_ids=ids, step=np.int64(2), temperature=np.float32(0.75),
                 top_k=np.int64(4), top_p=np.float64(0.9), backend=backend)
    torch.testing.assert_close(tuple(got), tuple(want), rtol=0, atol=0)
    with pytest.raises(TypeError, match="^top_k must be an integer"):
        sample(logits, seed=5, sample_ids=ids, step=2, top_k=4.0, backend=backend)
