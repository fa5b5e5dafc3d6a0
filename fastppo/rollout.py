"""Rollout generation: small pure functions, no hidden state.

Layout of a rollout batch (B rows, prompt width P, response width R):

    sequences       [pad pad p p p | y y y EOS pad pad]
    attention_mask  [ 0   0  1 1 1 | 1 1 1  1   0   0 ]
    response_mask                  [ 1 1 1  1   0   0 ]

Prompts are left-padded to a common P, responses right-padded to a common R
(the longest response of the batch). A response that reaches
max_new_tokens without EOS is "truncated": it is scored with EOS appended
(`with_eos_for_scoring`), but the policy is trained on the tokens it
actually generated.

Sampling is counter-based (`CounterSampler`, on the fused op
`fastppo.kernels.sample`): the token drawn for a sample at step t is a
three-level Gumbel-max over logits/T, top-k/top-p filtered (a chunk of the
vocabulary, a group in it, then a token: docs/rollout.md), the noise a hash
of (seed, sample id, t, chunk, group or token id). A sample's response depends on its prompt,
the policy, the seed and its id only: not on the rest of its batch, on
generation_batch_size or on which rank generates it. The trainer numbers
samples by their place in the global rollout batch, so each rank draws its
own reproducible noise, and one process and N processes sample the same
responses. Each drawn token comes with its logprob and the entropy under
softmax(logits/T) before top-k/top-p (π_rollout, see docs/rollout.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional

import torch
from torch import nn
from transformers import CompileConfig, GenerationConfig, LogitsProcessorList

from .config import RolloutConfig
from .data import PromptBatch
from .kernels import Sample, sample
from .kernels.sampler import mix32


@dataclass
class Rollout:
    """B sampled responses to left-padded prompts.

    sequences:      (B, P+R) int64   prompt + response, pad after EOS
    attention_mask: (B, P+R) int64   1 on prompt and response tokens (EOS included)
    response_mask:  (B, R)   bool    response tokens up to and including EOS
    lengths:        (B,)     int64   response lengths (EOS counted)
    ended:          (B,)     bool    the response ends with EOS (False: cut at max_new_tokens)
    prompt_width:   P
    logprobs:       (B, R)   float32 each response token's logprob under the sampler's softmax(logits/T),
                                     before top-k/top-p (π_rollout); 0 past the response. None: not recorded
    entropy:        (B, R)   float32 the entropy of that distribution at each response token; 0 past the response
    With an environment (`fastppo.envs`) the response holds several policy turns with the environment's
    observations between them: response_mask marks the sampled tokens only (observations are context, with
    attention_mask 1), lengths counts every response column up to the last token, ended is whether the last
    turn ended with EOS, and
    step_rewards:   (B, R)   float32 the reward each turn earned, at its last sampled token; 0 elsewhere
    turn_index:     (B, R)   int64   the policy turn of each sampled token (0, 1, ...); -1 elsewhere
    turns:          (B,)     int64   policy turns
    truncated:      (B,)     bool    the trajectory was cut by env.max_turns or env.max_tokens
    """
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    lengths: torch.Tensor
    ended: torch.Tensor
    prompt_width: int
    logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    step_rewards: Optional[torch.Tensor] = None
    turn_index: Optional[torch.Tensor] = None
    turns: Optional[torch.Tensor] = None
    truncated: Optional[torch.Tensor] = None

    PER_TOKEN: ClassVar[dict[str, float]] = {"logprobs": 0.0, "entropy": 0.0, "step_rewards": 0.0, "turn_index": -1}
    """The optional (B, R) fields and the value a response is right-padded with."""

    @property
    def responses(self) -> torch.Tensor:
        """(B, R) int64."""
        return self.sequences[:, self.prompt_width:]

    def take(self, rows: torch.Tensor) -> "Rollout":
        """The rollout's rows `rows` (k,) int64, every per-row field included."""
        fields = [f.name for f in dataclasses.fields(self) if f.name != "prompt_width"]
        return dataclasses.replace(self, **{k: None if getattr(self, k) is None else getattr(self, k)[rows]
                                            for k in fields})


def generation_kwargs(cfg: RolloutConfig, *, eos_id: int, pad_id: int) -> dict:
    """HF generation settings. HF decodes greedily over the scores of `CounterSampler`, which draws the token
    and leaves it the only finite score; do_sample, temperature and top-p are set explicitly so that a model's
    own generation_config cannot switch HF's sampling back on. With cfg.compile: a static KV cache and HF's
    compiled decode step (the prefill runs eagerly)."""
    compiled = {}
    if cfg.compile:
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
        compile_config._compile_all_devices = True    # also off CUDA (HF compiles on CUDA only, by default)
        compiled = dict(cache_implementation="static", compile_config=compile_config)
    return dict(
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        repetition_penalty=cfg.repetition_penalty,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        **compiled,
    )


# ----------------------------------------------------------------------------
# Counter-based sampling
# ----------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def sampling_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (e.g. run.seed and the iteration)."""
    h = 0x9E3779B9
    for p in parts:
        h = mix32(h ^ mix32((int(p) & _M32) ^ mix32((int(p) >> 32) & _M32)))
    return h


class CounterSampler:
    """HF logits processor that draws each token with `fastppo.kernels.sample` (softmax(logits / T), top-k and
    top-p filtered, counter-based Gumbel-max) and makes it HF's greedy choice: the scores it returns are -inf
    but at the drawn token. It records every step's logprob and entropy (`logprobs`, `entropy`: lists of (B,)
    float32, one per step) under softmax(scores / T) over every token of the vocabulary, before top-k/top-p:
    the policy's distribution, the one the score phase recomputes, with the repetition penalty when it is on
    (HF applies it to the scores first). `suppress_id` (the added pad token) is never drawn, but keeps its
    probability in the recorded logprob and entropy: the op draws from the scores without it, and its
    logprob and entropy are renormalised to the whole vocabulary in O(B) (`_with_token_back`).

    Token ids >= vocab_size (rows an embedding resize padded on, beyond the
    tokenizer's vocabulary) are never sampled. A decode step makes no host
    sync and no host-to-device copy (sample_ids move to the scores' device
    once, at the first step); the scores are overwritten in place (HF hands
    each step a fresh float32 copy).
    """

    def __init__(self, cfg: RolloutConfig, *, seed: int, sample_ids: torch.Tensor, prompt_width: int,
                 vocab_size: int | None = None, suppress_id: int | None = None) -> None:
        self.cfg = cfg
        self.seed, self.sample_ids, self.prompt_width = seed, sample_ids, prompt_width
        self.vocab_size, self.suppress_id = vocab_size, suppress_id
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.sample_ids.device != scores.device:
            self.sample_ids = self.sample_ids.to(scores.device)                        # once
        drawn = draw(scores, self.cfg, seed=self.seed, sample_ids=self.sample_ids,
                     step=input_ids.size(1) - self.prompt_width, vocab_size=self.vocab_size,
                     suppress_id=self.suppress_id)
        self.logprobs.append(drawn.logprobs)
        self.entropy.append(drawn.entropy)
        return scores.fill_(float("-inf")).scatter_(1, drawn.tokens[:, None], 0.0)

    def per_token(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, entropy), each (B, width) float32: the recorded steps, zero-padded on the right."""
        B = self.sample_ids.size(0)
        out = []
        for steps in (self.logprobs, self.entropy):
            x = torch.stack(steps, 1) if steps else torch.zeros(B, 0, device=self.sample_ids.device)
            out.append(nn.functional.pad(x, (0, width - x.size(1))))
        return out[0], out[1]


def draw(scores: torch.Tensor, cfg: RolloutConfig, *, seed: int, sample_ids: torch.Tensor,
         step: int | torch.Tensor, vocab_size: int | None, suppress_id: int | None) -> Sample:
    """One decode step's draw from (B, V) float32 scores (`CounterSampler`'s, with its rules): the token, its
    logprob and the entropy under softmax(scores / T) over the whole vocabulary, `suppress_id` never drawn but
    keeping its probability. The scores' column `suppress_id` is set to -inf in place."""
    suppressed = None
    if suppress_id is not None:
        suppressed = scores[:, suppress_id].clone()                                      # (B,) its logit
        scores[:, suppress_id] = float("-inf")
    drawn = sample(scores, seed=seed, sample_ids=sample_ids, step=step, temperature=cfg.temperature,
                   top_k=cfg.top_k, top_p=cfg.top_p, vocab_size=vocab_size)
    if suppressed is None:
        return drawn
    chosen = scores.gather(1, drawn.tokens[:, None]).squeeze(1)
    lp, ent = _with_token_back(drawn.logprobs, drawn.entropy, chosen / cfg.temperature, suppressed / cfg.temperature)
    return Sample(drawn.tokens, lp, ent)




def _with_token_back(logprob: torch.Tensor, entropy: torch.Tensor, z_chosen: torch.Tensor, z_back: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob and entropy of a drawn token under a softmax that gets one token back, (B,) each.

    From logp_r(y) = z_y − lse_r and H_r over the tokens without the one left out (scaled logit z_back), with
    lse = logaddexp(lse_r, z_back) and its probability q = exp(z_back − lse): the whole softmax has
    p(y) = (1 − q) r(y), so logp(y) = z_y − lse and H = (1 − q)·H_r − (1 − q)·log(1 − q) − q·log q.
    """
    lse_r = z_chosen - logprob
    lse = torch.logaddexp(lse_r, z_back)
    log_q, log_rest = z_back - lse, lse_r - lse                                   # log q, log(1 - q)
    q, rest = log_q.exp(), log_rest.exp()
    q_log_q = torch.where(q > 0, q * log_q, 0.0)
    return z_chosen - lse, rest * entropy - rest * log_rest - q_log_q


@contextlib.contextmanager
def float32_logits(model: nn.Module) -> Iterator[None]:
    """While active, the model's lm_head computes the logits of the last position only, in float32.

    Generation reads only the last position, and the sampler must see the
    distribution the score phase computes (float32 logits from the same
    hidden state and weight, `linear_token_logprobs`), not bf16-rounded
    logits: those move per-token probabilities by several percent. The head
    computes hidden[:, -1:] @ W^T with both operands in float32, outside any
    autocast; a 16-bit weight is converted once per generation (V x H x 4
    bytes held while it runs). A head that is not an nn.Linear is left as is.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        yield
        return
    cast: dict[str, torch.Tensor] = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:                                  # (B, T, H) -> (B, 1, V)
        weight = head.weight
        if cast.get("source") is not weight:                                           # once per generation
            cast["source"], cast["weight"] = weight, weight.float()
            cast["bias"] = None if head.bias is None else head.bias.float()
        with torch.autocast(hidden.device.type, enabled=False):
            return nn.functional.linear(hidden[:, -1:].float(), cast["weight"], cast["bias"])

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def pad_responses(rollout: "Rollout", width: int, pad_id: int) -> "Rollout":
    """The rollout with responses right-padded to `width` columns (e.g. the widest response on any rank)."""
    extra = width - rollout.response_mask.size(1)
    if extra <= 0:
        return rollout
    pad = nn.functional.pad
    return dataclasses.replace(
        rollout,
        sequences=pad(rollout.sequences, (0, extra), value=pad_id),
        attention_mask=pad(rollout.attention_mask, (0, extra), value=0),
        response_mask=pad(rollout.response_mask, (0, extra), value=False),
        **{k: None if getattr(rollout, k) is None else pad(getattr(rollout, k), (0, extra), value=v)
           for k, v in Rollout.PER_TOKEN.items()},
    )


def cat_rollouts(rollouts: list["Rollout"], pad_id: int, *, prompt_width: int = 0, response_width: int = 0) -> "Rollout":
    """Rows of several rollouts in one (e.g. the generation rounds of dynamic sampling): prompts left-padded to
    the widest prompt (at least prompt_width), responses right-padded to the widest response (at least
    response_width)."""
    P = max(prompt_width, *(r.prompt_width for r in rollouts))
    R = max(response_width, *(r.response_mask.size(1) for r in rollouts))
    pad = nn.functional.pad
    parts = []
    for r in rollouts:
        r = pad_responses(r, R, pad_id)
        left = P - r.prompt_width
        parts.append(dataclasses.replace(r, sequences=pad(r.sequences, (left, 0), value=pad_id),
                                         attention_mask=pad(r.attention_mask, (left, 0), value=0), prompt_width=P))
    # An optional field when every part has it (the per-token ones are per response token: no shift).
    fields = [f.name for f in dataclasses.fields(Rollout) if f.name != "prompt_width"]
    return Rollout(prompt_width=P, **{k: torch.cat([getattr(r, k) for r in parts])
                                      if all(getattr(r, k) is not None for r in parts) else None for k in fields})


def response_mask_from_tokens(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, R) bool up to and including the first EOS, ended (B,) bool)."""
    is_eos = responses == eos_id
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
    return eos_before == 0, is_eos.any(-1)


@torch.no_grad()
def generate(policy: nn.Module, prompts: PromptBatch, cfg: RolloutConfig, *, eos_id: int, pad_id: int,
             generation_batch_size: int, seed: int | None = None, sample_ids: torch.Tensor | None = None,
             vocab_size: int | None = None) -> Rollout:
    """Sample one response per prompt with HF generate (KV cache), in chunks of generation_batch_size.

    seed and sample_ids (B,) fix the sampling noise (`CounterSampler`); a
    sample's response does not depend on the other rows. seed=None draws one
    from torch's global RNG; sample_ids=None numbers the rows 0..B-1.
    vocab_size: the tokenizer's vocabulary (len(tokenizer)); ids at or
    above it (embedding rows padded on for alignment) are never sampled.
    The sampler sees float32 logits (`float32_logits`). The rollout carries
    each response token's logprob and entropy (`Rollout.logprobs`, `.entropy`).
    cfg.compile: static KV cache, compiled decode step.
    """
    gen_cfg = GenerationConfig(**generation_kwargs(cfg, eos_id=eos_id, pad_id=pad_id))
    device = next(policy.parameters()).device
    ids, mask = prompts.input_ids.to(device), prompts.attention_mask.to(device)
    P = ids.size(1)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if sample_ids is None:
        sample_ids = torch.arange(ids.size(0))
    sample_ids = sample_ids.to(device)
    chunks, samplers = [], []
    with float32_logits(policy):
        for start in range(0, ids.size(0), generation_batch_size):
            rows = slice(start, start + generation_batch_size)
            sampler = CounterSampler(cfg, seed=sampling_seed(seed), sample_ids=sample_ids[rows], prompt_width=P,
                                     vocab_size=vocab_size, suppress_id=pad_id)
            out = policy.generate(input_ids=ids[rows], attention_mask=mask[rows], generation_config=gen_cfg,
                                  logits_processor=LogitsProcessorList([sampler]))
            chunks.append(out[:, P:])                                                 # (b, R_chunk)
            samplers.append(sampler)
    R = max(c.size(1) for c in chunks)
    responses = torch.cat([nn.functional.pad(c, (0, R - c.size(1)), value=pad_id) for c in chunks])  # (B, R)
    response_mask, ended = response_mask_from_tokens(responses, eos_id)
    responses = torch.where(response_mask, responses, pad_id)
    logprobs, entropy = (torch.cat(parts) for parts in zip(*(s.per_token(R) for s in samplers)))  # (B, R) each
    return Rollout(
        sequences=torch.cat([ids, responses], dim=1),
        attention_mask=torch.cat([mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        lengths=response_mask.sum(-1),
        ended=ended,
        prompt_width=P,
        logprobs=torch.where(response_mask, logprobs, 0.0),
        entropy=torch.where(response_mask, entropy, 0.0),
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
    # Written on every row, unchanged where the response ended (no boolean indexing: that would sync the host).
    ids[rows, end] = torch.where(rollout.ended, ids[rows, end], eos_id)
    mask[rows, end] = torch.where(rollout.ended, mask[rows, end], 1)
    eos_index = torch.where(rollout.ended, end - 1, end)
    return ids, mask, eos_index
