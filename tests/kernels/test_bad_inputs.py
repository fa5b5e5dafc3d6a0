"""Inputs a user gets wrong across the fused ops: the error names the argument, whichever backend runs.

Meta tensors (a model built on the meta device whose weights were never loaded) have a shape and no data: the
Triton backend failed deep in the launcher ("Cannot copy out of meta tensor"); now it names the argument, while
the torch backend propagates shapes as every PyTorch op does (the GPU-path tests trace with it). NumPy scalars
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


def _calls(backend):
    """op -> (its main argument, a call of the op on the inputs `x` of `_inputs`)."""
    def n(x):
        return x["flat_labels"].numel()
    return {
        "token_logprobs": ("logits", lambda x: token_logprobs(x["logits"], x["labels"], backend=backend)),
        "kl_penalty": ("logprobs", lambda x: kl_penalty(x["lp"], x["lp"], backend=backend)),
        "gae": ("rewards", lambda x: gae(x["lp"], x["lp"], x["mask"], backend=backend)),
        "ppo_loss": ("logprobs", lambda x: ppo_loss(*[x["lp"]] * 6, x["mask"], backend=backend)),
        "linear_token_logprobs": ("hidden", lambda x: linear_token_logprobs(x["hidden"], x["weight"], x["flat_labels"],
                                                                           backend=backend)),
        "linear_ppo_loss": ("hidden", lambda x: linear_ppo_loss(x["hidden"], x["weight"], x["flat_labels"],
                                                                x["lp"].reshape(n(x)), x["lp"].reshape(n(x)),
                                                                x["mask"].reshape(n(x)), backend=backend)),
        "sample": ("logits", lambda x: sample(x["logits"][:, 0], seed=0, sample_ids=x["ids"], step=0,
                                              backend=backend)),
    }


def _on_meta(x: dict) -> dict:
    return {k: v.to("meta") for k, v in x.items()}


OPS = ["token_logprobs", "kl_penalty", "gae", "ppo_loss", "linear_token_logprobs", "linear_ppo_loss", "sample"]


@pytest.mark.cpu_only("meta tensors are built on the CPU here; the check does not depend on the device")
@pytest.mark.parametrize("op", OPS)
def test_a_meta_tensor_is_named_by_the_triton_backend(op):
    x = _inputs(torch.Generator().manual_seed(0))
    arg, call = _calls("triton")[op]
    with pytest.raises(ValueError, match=rf"^{arg} is on the meta device .* backend='triton' cannot run"):
        call(_on_meta(x))
    call(x)                                             # the same call with data runs


@pytest.mark.cpu_only("meta tensors are built on the CPU here")
@pytest.mark.parametrize("op", OPS)
def test_the_torch_backend_propagates_meta_shapes_like_any_pytorch_op(op):
    x = _inputs(torch.Generator().manual_seed(0))
    _, call = _calls("torch")[op]
    meta, real = call(_on_meta(x)), call(x)
    for m, r in zip(meta if isinstance(meta, tuple) else (meta,), real if isinstance(real, tuple) else (real,)):
        assert m.is_meta and m.shape == r.shape and m.dtype == r.dtype


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


@pytest.mark.cpu_only("the Triton backend without CUDA and without the interpreter")
def test_fastppo_backend_triton_without_cuda_names_the_variable(monkeypatch):
    x = _inputs(torch.Generator().manual_seed(4))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTPPO_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"^FASTPPO_BACKEND=triton needs CUDA tensors .* got logits on cpu"):
        token_logprobs(x["logits"], x["labels"])
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors .* got logits on cpu"):
        token_logprobs(x["logits"], x["labels"], backend="triton")
