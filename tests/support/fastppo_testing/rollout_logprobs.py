"""Rollout logprobs for tests, until generation returns its own: the policy's teacher-forced logprobs.

`with_teacher_forced_logprobs(generate)` wraps `HFEngine.generate`: a rollout that comes back without
logprobs gets those of a teacher-forced forward of the policy over the sampled tokens (`response_logprobs`,
logits / T in float32) and their entropy. On CPU in float32 these differ from the sampler's own by rounding
(~1e-6 per token), so a test written against them holds with the sampler's.

    python run_with_rollout_logprobs.py ARGS...   is `fastppo ARGS...` with the wrapper installed
                                                  (`SCRIPT`, for torchrun workers)
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from fastppo.models import response_logprobs

SCRIPT = """import sys
from fastppo_testing.rollout_logprobs import install
install()
from fastppo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def with_teacher_forced_logprobs(generate):
    @functools.wraps(generate)
    def wrapped(self, prompts, **kw):
        rollout = generate(self, prompts, **kw)
        if rollout.logprobs is not None:
            return rollout
        with torch.no_grad():
            lp = response_logprobs(self.policy, rollout.sequences, rollout.attention_mask, rollout.response_mask,
                                   prompt_width=rollout.prompt_width, temperature=self.cfg.temperature,
                                   return_entropy=True, vocab_size=self.vocab_size)
        return dataclasses.replace(rollout, logprobs=lp.logprobs, entropy=lp.entropy)
    return wrapped


def install() -> None:
    """Wrap HFEngine.generate for the rest of this process (a torchrun worker)."""
    from fastppo.engine import HFEngine

    HFEngine.generate = with_teacher_forced_logprobs(HFEngine.generate)
