"""Generation engines: what the training loop needs from whatever samples the rollouts.

The loop (`fastppo.train`) talks to an engine through two calls:

    with engine.policy_loaded():                      # the engine samples from the policy's current weights
        rollout = engine.generate(prompts, seed=..., sample_ids=...)

`HFEngine` (`rollout.engine: hf`) is the reference engine: Hugging Face
`generate` on the training policy itself. `StaticEngine` (`rollout.engine:
static`) samples the same tokens with its own decode loop on the policy's
modules (`fastppo.static_engine`: one KV cache of fixed slots, continuous
batching, shared prompt prefixes). `make_engine` builds the configured one.
An engine in another process or library (vLLM, SGLang) would implement the
same two calls; docs/engines.md says what such an adapter must
do (weight sync from FSDP2 shards, logprob semantics).
"""

from __future__ import annotations

import abc
from typing import ContextManager

import torch
from torch import nn

from . import parallel
from .config import RolloutConfig
from .data import PromptBatch
from .rollout import Rollout, generate
from .static_engine import LogitsHook, check_servable, generate_static


class Engine(abc.ABC):
    """Samples rollouts from the current policy.

    A Rollout from `generate` holds, besides the tokens, the generator's own
    logprob of every sampled token under softmax(logits / T) before top-k/top-p
    filtering, in float32, and the entropy of that distribution (`Rollout.logprobs`,
    `Rollout.entropy`): `rollout.old_logprobs=reuse` takes them as pi_old, and
    `recompute` measures the score phase's logprobs against them.
    """

    @abc.abstractmethod
    def policy_loaded(self) -> ContextManager[None]:
        """A context inside which `generate` samples from the policy's weights as they are now.

        Entered once per rollout, after the previous update. An engine that holds its own copy of the
        weights refreshes it on entry and may free its memory (KV cache, weights) on exit.
        """

    @abc.abstractmethod
    def generate(self, prompts: PromptBatch, *, seed: int, sample_ids: torch.Tensor) -> Rollout:
        """One response per prompt (B rows, left-padded prompts), sampled with noise fixed by
        (seed, sample id) where the engine can; only inside `policy_loaded()`."""


class HFEngine(Engine):
    """Hugging Face generate on the training policy (KV cache, counter-based sampling: `rollout.generate`).

    Under FSDP2 `policy_loaded` all-gathers the policy once for the whole
    generation (`parallel.unsharded`), instead of once per block per token.
    """

    def __init__(self, policy: nn.Module, cfg: RolloutConfig, *, eos_id: int, pad_id: int, vocab_size: int,
                 generation_batch_size: int, unshard: bool = True) -> None:
        self.policy, self.cfg = policy, cfg
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
        self.generation_batch_size, self.unshard = generation_batch_size, unshard

    def policy_loaded(self) -> ContextManager[None]:
        # The generator is the trained module itself: its weights are always current; only FSDP's
        # all-gather is needed.
        return parallel.unsharded(self.policy, enabled=self.unshard)

    def generate(self, prompts: PromptBatch, *, seed: int, sample_ids: torch.Tensor) -> Rollout:
        return generate(self.policy, prompts, self.cfg, eos_id=self.eos_id, pad_id=self.pad_id,
                        generation_batch_size=self.generation_batch_size, seed=seed, sample_ids=sample_ids,
                        vocab_size=self.vocab_size)


class StaticEngine(HFEngine):
    """The static engine (`fastppo.static_engine`) on the training policy: the same tokens, logprobs and entropy
    as `HFEngine` for a seed and sample ids, generation_batch_size slots of one KV cache with continuous batching.

    Under FSDP2 `policy_loaded` all-gathers the policy once per rollout, as HFEngine's. logits_hook: see
    `static_engine.LogitsHook` (benchmarks).
    """

    def __init__(self, policy: nn.Module, cfg: RolloutConfig, *, eos_id: int, pad_id: int, vocab_size: int,
                 generation_batch_size: int, unshard: bool = True, logits_hook: LogitsHook | None = None) -> None:
        check_servable(policy)
        super().__init__(policy, cfg, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size,
                         generation_batch_size=generation_batch_size, unshard=unshard)
        self.logits_hook = logits_hook

    def generate(self, prompts: PromptBatch, *, seed: int, sample_ids: torch.Tensor) -> Rollout:
        return generate_static(self.policy, prompts, self.cfg, eos_id=self.eos_id, pad_id=self.pad_id,
                               slots=self.generation_batch_size, seed=seed, sample_ids=sample_ids,
                               vocab_size=self.vocab_size, logits_hook=self.logits_hook)


def make_engine(policy: nn.Module, cfg: RolloutConfig, **kwargs) -> Engine:
    """The engine `cfg.engine` names (`HFEngine` or `StaticEngine`), with HFEngine's arguments."""
    return (StaticEngine if cfg.engine == "static" else HFEngine)(policy, cfg, **kwargs)
