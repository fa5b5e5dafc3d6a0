"""fastppo: a compact, fast PPO-max RLHF trainer on fused Triton kernels."""

__version__ = "0.1.0"

# `fastppo.train(config)`: the PPO-max trainer from Python (config: Config, dict or YAML path).
# Bound after the submodule import, so the name is the function, not the module `fastppo.train`.
from .train import train  # noqa: E402

__all__ = ["train", "__version__"]
