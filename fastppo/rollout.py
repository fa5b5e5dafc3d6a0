"""Rollout generation (SPEC §2.1): small pure functions, no hidden state.

Layout of a rollout batch (B rows, prompt width P, response width R):

    sequences       [pad pad p p p | y y y EOS pad pad]
    attention_mask  [ 0   0  1 1 1 | 1 1 1  1   0   0 ]
    response_mask                  [ 1 1 1  1   0   0 ]

Prompts are left-padded to a common P, responses right-padded to a common R
(the longest response of the batch). A response that reaches
max_new_tokens without EOS is "truncated": it is scored with EOS appended
(`with_eos_for_scoring`), but the policy is trained on the tokens it
actually generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import RolloutConfig
from .data import PromptBatch


@dataclass
class Rollout:
    """B sampled responses to left-padded prompts.

    sequences:      (B, P+R) int64   prompt + response, pad after EOS
    attention_mask: (B, P+R) int64   1 on prompt and response tokens (EOS included)
    response_mask:  (B, R)   bool    response tokens up to and including EOS
    lengths:        (B,)     int64   response lengths (EOS counted)
    ended:          (B,)     bool    the response ends with EOS (False: cut at max_new_tokens)
    prompt_width:   P
    """
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    ended: torch.Tensor
    prompt_width: int

    @property
    def responses(self) -> torch.Tensor:
        """(B, R) int64."""
        return self.sequences[:, self.prompt_width:]


def generation_kwargs(cfg: RolloutConfig, *, eos_id: int, pad_id: int) -> dict:
    return dict(
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k if cfg.top_k > 0 else None,
        repetition_penalty=cfg.repetition_penalty,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        suppress_tokens=[pad_id],  # the added pad token must never be sampled
        use_cache=True,
    )


def response_mask_from_tokens(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, R) bool up to and including the first EOS, ended (B,) bool)."""
    is_eos = responses == eos_id
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
    return eos_before == 0, is_eos.any(-1)


@torch.no_grad()
def generate(policy: nn.Module, prompts: PromptBatch, cfg: RolloutConfig, *, eos_id: int, pad_id: int,
             generation_batch_size: int) -> Rollout:
    """Sample one response per prompt with HF generate (KV cache), in chunks of generation_batch_size."""
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(**generation_kwargs(cfg, eos_id=eos_id, pad_id=pad_id))
    device = next(policy.parameters()).device
    ids, mask = prompts.input_ids.to(device), prompts.attention_mask.to(device)
    P = ids.size(1)
    chunks = []
    for start in range(0, ids.size(0), generation_batch_size):
        out = policy.generate(input_ids=ids[start:start + generation_batch_size],
                              attention_mask=mask[start:start + generation_batch_size],
                              generation_config=gen_cfg)
        chunks.append(out[:, P:])                                                     # (b, R_chunk)
    R = max(c.size(1) for c in chunks)
    responses = torch.cat([nn.functional.pad(c, (0, R - c.size(1)), value=pad_id) for c in chunks])  # (B, R)
    response_mask, ended = response_mask_from_tokens(responses, eos_id)
    responses = torch.where(response_mask, responses, pad_id)
    return Rollout(
        sequences=torch.cat([ids, responses], dim=1),
        attention_mask=torch.cat([mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        lengths=response_mask.sum(-1),
        ended=ended,
        prompt_width=P,
    )


def with_eos_for_scoring(rollout: Rollout, *, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences for the reward model: EOS appended to truncated responses.

    Returns input_ids (B, P+R+1), attention_mask (B, P+R+1) and the column of
    the EOS token in each row (B,), where the score is read.
    """
    B, L = rollout.sequences.shape
    extra = torch.full((B, 1), pad_id, dtype=rollout.sequences.dtype, device=rollout.sequences.device)
    ids = torch.cat([rollout.sequences, extra], dim=1)                                  # (B, L+1)
    mask = torch.cat([rollout.attention_mask, torch.zeros_like(extra)], dim=1)
    end = rollout.prompt_width + rollout.lengths                                        # first column after the response
    rows = torch.arange(B, device=ids.device)
    append = ~rollout.ended
    ids[rows[append], end[append]] = eos_id
    mask[rows[append], end[append]] = 1
    eos_index = torch.where(rollout.ended, end - 1, end)
    return ids, mask, eos_index
