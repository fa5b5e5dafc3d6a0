"""fastppo.kernels: fused ops with a Triton and a PyTorch backend (see SPEC §6)."""

from .token_logprobs import LogprobsAndEntropy, token_logprobs

__all__ = ["LogprobsAndEntropy", "token_logprobs"]
