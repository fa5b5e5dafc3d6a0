"""fastppo: a compact, fast PPO-max RLHF trainer on fused Triton kernels.

The Python API lives in the submodules, one function per stage:

    from fastppo.train import train                 # PPO-max (config: Config, dict or YAML path)
    from fastppo.sft import sft                     # supervised fine-tuning
    from fastppo.reward_training import train_rm    # reward model

The package binds no name of its own over a submodule's: `import fastppo.train as t` gives the module.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
