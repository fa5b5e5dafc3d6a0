"""Response lengths for bench/trainer.py's `--lengths longtail`, the same in fastppo and TRL.

TRL's PPOTrainer stops a response only at a stop token, and a random model
emits EOS at random, so the two frameworks would generate different lengths.
Instead each prompt gets a response length drawn once (seeded, from a
long-tailed distribution), and `ForcedLengths`, a logits processor appended
to both frameworks' generate calls, makes every response exactly that long:
EOS and the pad token are masked out before the drawn step, EOS is the only
choice at it, and the pad token the only one after it (for a generate call
that does not stop rows at EOS). Both frameworks then process the same
tokens; what differs is how much padding their forwards compute. fastppo's
static engine gets the same rule (`force_lengths`) as its logits hook.

Imports only torch: TRL's worker loads this file by path.
"""

from __future__ import annotations

import math

import torch

MEDIAN, SIGMA = 4.0, 1.0
"""Log-normal response lengths: median 4 tokens, log-space std 1 (about 1 in 12 reach 16 tokens, 1 in 40 reach 27),
clamped to [1, max_new_tokens]."""


def prompt_key(ids) -> str:
    return ",".join(str(int(i)) for i in ids)


def draw_lengths(prompts: list[list[int]], max_new_tokens: int, seed: int) -> dict[str, int]:
    """{prompt_key(prompt ids): response length (EOS included)}, one seeded draw per prompt, in file order."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(prompts), generator=g, dtype=torch.float64)
    lengths = (math.log(MEDIAN) + SIGMA * z).exp().ceil().clamp(1, max_new_tokens).long().tolist()
    return {prompt_key(p): n for p, n in zip(prompts, lengths)}


class ForcedLengths:
    """A logits processor: the response to a prompt ends with EOS at its drawn length, then pad tokens.

    prompt_len: the prompts' width in the generate call (every prompt of the workload has exactly this many
    tokens, so the prompt is input_ids[:, :prompt_len] and the step is the number of columns after it).
    """

    def __init__(self, lengths: dict[str, int], *, prompt_len: int, eos_id: int, pad_id: int) -> None:
        self.lengths, self.prompt_len, self.eos_id, self.pad_id = lengths, prompt_len, eos_id, pad_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.size(1) - self.prompt_len                     # tokens generated so far
        target = torch.tensor([self.lengths[prompt_key(row)] for row in input_ids[:, :self.prompt_len].tolist()],
                              device=scores.device)
        return force_lengths(scores.clone(), target, step, eos_id=self.eos_id, pad_id=self.pad_id)


def force_lengths(scores: torch.Tensor, target: torch.Tensor, step, *, eos_id: int, pad_id: int) -> torch.Tensor:
    """scores (B, V) edited in place and returned: row b's response ends with EOS at length target[b]: EOS and
    pad masked out before it, EOS the only choice at it, pad after it. step: the tokens generated so far, an
    int or (B,) per row; device ops only (no host sync)."""
    step = torch.as_tensor(step, device=scores.device)
    for token, rows in ((eos_id, step + 1 == target), (pad_id, step + 1 > target)):
        scores.masked_fill_(rows[:, None], float("-inf"))
        scores[:, token].masked_fill_(rows, 0.0)
    before = step + 1 < target
    scores[:, eos_id].masked_fill_(before, float("-inf"))
    scores[:, pad_id].masked_fill_(before, float("-inf"))
    return scores
