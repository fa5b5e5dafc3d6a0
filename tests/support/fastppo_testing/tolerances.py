"""Error bounds for float32 log-softmax results against a float64 oracle, from the computation (with the margin
one measurement showed it needs), not fitted to what a run happened to give.

With u = eps/2 the unit roundoff, a float32 logprob x_y − lse and entropy H = lse − Σ p·x carry:
  - the error of the logits themselves: none when they are inputs, the float32 GEMM's when they come from
    hidden @ Wᵀ, λ·√K·eps·Σ_k|h_k·w_k| (K the hidden size; λ = 8: a probabilistic bound on a sum of K rounded
    products);
  - the rounding of x_y, lse and Σ p·x. Kernels working in base 2 round x·log₂e and lse₂ (1.44× the magnitude,
    log₂e itself rounded) and scale back by ln 2: about 2u·(|x_y| + |lse|) = eps·(|x_y| + |lse|) in all. A run
    at logits ~4e4 reached 0.99 of that, so it is doubled for the roundings not modelled (exp2, the sums):
    2·eps·(|x_y| + |lse|), and 2·eps·Σ p·|x| for the entropy;
  - a logit error δ_i moves the entropy by Σ_i p_i·|log p_i + H|·|δ_i| ≤ 2·H·max|δ| (∂H/∂x_i = −p_i·(log p_i + H)),
    with δ the logits' own error and the rounding of every exponent argument, u·|x_i| (with log₂e: ≤ eps·|x_i|):
    2·H·(max|δ| + eps·max|x|);
  - a few ulps of exp/log arithmetic.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps


def gemm_error(hidden: torch.Tensor, weight: torch.Tensor, lam: float = 8.0) -> torch.Tensor:
    """(N, V) float64 bound on the float32 error of hidden @ weightᵀ."""
    h, w = hidden.detach().double(), weight.detach().double()
    return lam * math.sqrt(h.shape[-1]) * EPS32 * (h.abs() @ w.abs().T)


def logprob_entropy_tolerance(logits: torch.Tensor, labels: torch.Tensor, logit_error: torch.Tensor | None = None,
                              ulps: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float64 bounds on |logprob − oracle| and |entropy − oracle| for float64 logits (N, V) at temperature 1,
    with `logit_error` (N, V) the error of the float32 logits before the softmax (None: exact inputs)."""
    x = logits.detach().double()
    delta = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) if logit_error is None else \
        logit_error.amax(-1)
    lse = torch.logsumexp(x, -1)
    p = torch.softmax(x, -1)
    entropy = -(torch.special.xlogy(p, p)).sum(-1)
    x_y = x.gather(-1, labels[:, None]).squeeze(-1)
    lp = 2 * delta + 2 * (x_y.abs() + lse.abs()) * EPS32 + ulps * EPS32
    ent = ((2 * entropy + 2) * delta + 2 * entropy * EPS32 * x.abs().amax(-1)
           + 2 * (lse.abs() + (p * x.abs()).sum(-1)) * EPS32 + ulps * EPS32 * (1 + entropy))
    return lp, ent


def assert_within(name: str, got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor) -> None:
    err = (got.detach().double() - want.double()).abs()
    assert (err <= tol).all(), f"{name}: error {err.max().item():.3g}, {(err / tol).max().item():.3g} x its bound"
