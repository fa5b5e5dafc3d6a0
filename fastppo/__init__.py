"""fastppo: a compact, fast PPO-max RLHF trainer on fused Triton kernels."""

__version__ = "0.1.0"
