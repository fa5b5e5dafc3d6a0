"""fastppo.kernels: fused ops with a Triton and a PyTorch backend (see _dispatch.py for the choice)."""

from .token_logprobs import LogprobsAndEntropy, token_logprobs
from .linear_token_logprobs import LogprobLossOutput, linear_logprob_loss, linear_token_logprobs
from .kl_penalty import kl_penalty
from .gae import AdvantagesAndReturns, gae
from .ppo_loss import PPOLossOutput, ppo_loss
from .linear_ppo_loss import LinearPPOLossOutput, linear_ppo_loss

__all__ = ["LogprobsAndEntropy", "token_logprobs"]
__all__ += ["linear_token_logprobs", "linear_logprob_loss", "LogprobLossOutput"]
__all__ += ["kl_penalty", "gae", "AdvantagesAndReturns", "ppo_loss", "PPOLossOutput"]
__all__ += ["linear_ppo_loss", "LinearPPOLossOutput"]
from .sampler import Sample, gumbel_noise, sample
__all__ += ["sample", "Sample", "gumbel_noise"]
