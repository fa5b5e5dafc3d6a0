"""Pure-PyTorch implementations of the fused ops.

These are the CPU backend (``backend="torch"``) and the readable statement of
what each Triton kernel computes. Where a function is also the CPU hot path it
works in row chunks so that its extra memory stays bounded whatever the number
of rows is; the float64 test oracles live in ``tests/``.
"""

from __future__ import annotations

import torch

# Extra memory the chunked CPU paths may use for float32 temporaries.
TORCH_CHUNK_BYTES = 64 << 20


def rows_per_chunk(width: int, temporaries: int, budget_bytes: int = TORCH_CHUNK_BYTES) -> int:
    """Rows of a (rows, width) float32 chunk such that `temporaries` copies fit the budget."""
    return max(1, budget_bytes // max(1, width * 4 * temporaries))


# ----------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------

def token_logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, V) any float dtype, labels (N,) int -> logprobs, entropy, lse, each (N,) float32.

    Ignored rows give 0 for all three. Extra memory: about three (chunk, V)
    float32 temporaries, never a full (N, V) copy.
    """
    n_rows, vocab = logits.shape
    out = torch.zeros(3, n_rows, dtype=torch.float32, device=logits.device)
    logprobs, entropy, lse = out[0], out[1], out[2]
    step = rows_per_chunk(vocab, temporaries=3)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        valid = labels[rows] != ignore_index
        x = logits[rows].float() / temperature                      # (C, V) float32
        chunk_lse = torch.logsumexp(x, dim=-1)                      # (C,)
        label_logit = x.gather(-1, torch.where(valid, labels[rows], 0).long()[:, None]).squeeze(-1)
        x.sub_(chunk_lse[:, None])                                  # x is now log p
        p = x.exp()
        # p·log p is 0 where p is 0 (including logits of -inf).
        chunk_entropy = -(p * x.masked_fill_(p == 0, 0.0)).sum(-1)
        zero = torch.zeros((), device=logits.device)
        logprobs[rows] = torch.where(valid, label_logit - chunk_lse, zero)
        entropy[rows] = torch.where(valid, chunk_entropy, zero)
        lse[rows] = torch.where(valid, chunk_lse, zero)
    return logprobs, entropy, lse


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient of sum(grad_logprobs·logprobs + grad_entropy·entropy) w.r.t. logits (N, V).

    With x = logits / T and p = softmax(x):
      d logprob / d x_j = [j = label] − p_j
      d entropy / d x_j = −p_j (log p_j + H)
    and the chain rule through the temperature divides by T. Returned in the
    dtype of logits; ignored rows get 0.
    """
    n_rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    step = rows_per_chunk(vocab, temporaries=3)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        valid = labels[rows] != ignore_index
        logp = logits[rows].float() / temperature
        logp.sub_(lse[rows, None])                                  # (C, V) log p
        p = logp.exp()
        g = torch.zeros_like(p)
        if grad_entropy is not None:
            g.addcmul_(p, logp.masked_fill_(p == 0, 0.0).add_(entropy[rows, None]), value=-1.0)
            g.mul_(grad_entropy[rows, None])
        if grad_logprobs is not None:
            g.addcmul_(p, grad_logprobs[rows, None], value=-1.0)
            safe = torch.where(valid, labels[rows], 0).long()[:, None]
            g.scatter_add_(-1, safe, grad_logprobs[rows, None].float())
        g.div_(temperature)
        g.masked_fill_(~valid[:, None], 0.0)
        grad[rows] = g
    return grad
