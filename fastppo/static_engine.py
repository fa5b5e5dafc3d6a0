"""The static generation engine: one KV cache of fixed slots, continuous batching, shared prompt prefixes.

`generate_static` samples the same responses as `rollout.generate` (HF
generate, the reference) for the same seed and sample ids, with the same
sampler (`rollout.draw`: counter-based noise, the float32 logprob and entropy
of every token, the pad token never drawn), EOS and `max_new_tokens`, through
the policy's own modules (LoRA adapters and an all-gathered FSDP2 model
included). What differs is the schedule:

- **one KV cache per call**, `slots` rows x (prompt width + max_new_tokens)
  columns per layer, allocated at the first prefill and freed on return;
- **continuous batching**: every decode step runs all slots; a slot whose
  response ended takes the next waiting prompt (its prefill is written into
  that slot's cache rows), so no slot decodes padding while prompts wait;
- **shared prefixes**: the rows of one call with the same prompt (a group's
  G samples) are prefilled once and their caches copied from that prefill;
- **a shrinking tail**: once no prompt waits, the slots still generating are
  gathered into a smaller batch whenever half of them have ended (not with
  a captured CUDA graph, whose shapes are fixed);
- **a decode step without host synchronisation**: state lives in
  preallocated tensors updated in place; the host looks at the slots (to
  refill them and to stop) once every `sync_every` steps. On CUDA with
  `rollout.compile` the step is captured once as a CUDA graph and replayed.

Cache layout: a ring. All slots write step t's keys and values at the same
column c = t mod L (L = prompt width + max_new_tokens); a prompt admitted at
column c occupies the W columns before it. A response spans at most
W + max_new_tokens <= L columns, so it never overwrites its own prompt. Keys
carry their position in them (RoPE) or need none (GPT-2 adds position
embeddings to the input), so attention over the ring in any column order is
attention over the sequence; a per-slot mask keeps each row to its own
columns (and, for sliding-window layers, to the window).

Different slots are at different response steps: the sampler takes each
row's own step (a tensor), so a row's noise is that of its id at its step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import ConfigError, RolloutConfig
from .data import PromptBatch
from .rollout import Rollout, draw, float32_logits, response_mask_from_tokens, sampling_seed

SERVED = ("llama", "qwen2", "mistral", "gpt2")
"""model_type of the policies the static engine serves (those its tests compare with HF generate)."""

LogitsHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""hook(scores (S, V) float32, rows (S,) int64, steps (S,) int64): edits the scores in place before the draw
(rows: each slot's row in the generate call, B for an empty slot; steps: its response step). For benchmarks that
force response lengths; device ops only."""


ATTENTION = ("sdpa", "eager")
"""Attention implementations the static engine serves (those that take its per-slot 4D masks)."""


def check_servable(policy: nn.Module) -> None:
    """Raise a ConfigError naming rollout.engine when the static engine cannot serve this policy."""
    config = getattr(policy, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SERVED:
        raise ConfigError(f"invalid config: field 'rollout.engine': static serves {', '.join(SERVED)} models; the "
                          f"policy is {model_type!r} ({type(policy).__name__}): use rollout.engine=hf")
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ATTENTION:
        raise ConfigError(f"invalid config: field 'rollout.engine': static runs attention through "
                          f"{' or '.join(ATTENTION)} (per-slot masks); the policy uses {attention!r}: set "
                          f"model.attn_implementation=sdpa or use rollout.engine=hf")


class _SlotLayer(CacheLayerMixin):
    """One layer's (S, heads, L, head_dim) keys and values; `update` writes the step's column."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.size(2), 0

    def get_seq_length(self) -> int:
        return 0    # unused: position ids and the 4D mask are always given

    def get_max_length(self) -> int:
        return self.keys.size(2)


class _Slots:
    """The decode state of `slots` rows, all in preallocated tensors updated in place (a CUDA graph's inputs)."""

    def __init__(self, policy: nn.Module, cfg: RolloutConfig, *, n_rows: int, slots: int, width: int, eos_id: int,
                 pad_id: int, vocab_size: Optional[int], seed: int, sample_ids: torch.Tensor,
                 logits_hook: Optional[LogitsHook], device: torch.device, graph: bool) -> None:
        self.policy, self.cfg, self.eos_id, self.pad_id, self.vocab_size = policy, cfg, eos_id, pad_id, vocab_size
        self.seed, self.logits_hook = seed, logits_hook
        self.S, self.L, self.N, self.B = slots, width + cfg.max_new_tokens, cfg.max_new_tokens, n_rows
        S, L, N, B = self.S, self.L, self.N, self.B
        long = dict(dtype=torch.int64, device=device)
        self.sample_ids = torch.cat([sample_ids.to(**long), torch.zeros(1, **long)])   # row B: empty slots
        self.row = torch.full((S,), B, **long)             # each slot's row in the call (B: empty)
        self.active = torch.zeros(S, dtype=torch.bool, device=device)
        self.step = torch.zeros(S, **long)                 # response step of the next token
        self.pos = torch.zeros(S, **long)                  # position id of the last token (the next input)
        self.last = torch.full((S,), pad_id, **long)       # the next input token
        self.column = torch.zeros(1, **long)               # the ring column the next step writes
        self.valid = torch.zeros(S, L, dtype=torch.bool, device=device)
        self.key_pos = torch.zeros(S, L, **long)           # position of each column's key (sliding windows)
        self.tokens = torch.full((B + 1, N), pad_id, **long)
        self.logprobs = torch.zeros(B + 1, N, dtype=torch.float32, device=device)
        self.entropy = torch.zeros(B + 1, N, dtype=torch.float32, device=device)
        config = policy.config
        # Sliding-window attention: on the layers config.layer_types names (a mask per layer type), or, without
        # layer types (Mistral), on every layer when config.sliding_window is set (one mask).
        types = getattr(config, "layer_types", None)
        self.per_type = types is not None and "sliding_attention" in types
        self.window = getattr(config, "sliding_window", None) if self.per_type or types is None else None
        self.additive_mask = config._attn_implementation == "eager"    # eager adds the mask; sdpa takes booleans
        self.cache: Optional[Cache] = None
        self.use_graph = graph
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    # -- admission: prefill a few prompts into free slots -------------------------------------------------

    def admit(self, slots: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
              source: torch.Tensor) -> None:
        """Rows `rows` (k,) start in slots `slots` (k,): their prompts ids[source] prefilled once per distinct
        prompt (source: each row's first row with the same prompt, ids/mask (n, W) those prompts)."""
        reps, which = torch.unique(source, return_inverse=True)          # distinct prompts; each row's one
        p_ids, p_mask = ids[reps], mask[reps]
        positions = (p_mask.cumsum(-1) - 1).masked_fill_(p_mask == 0, 1)   # as HF generate
        prefill = DynamicCache()                 # full layers: a sliding one would keep only the window
        logits = self.policy(input_ids=p_ids, attention_mask=p_mask, position_ids=positions, cache=prefill,
                             use_cache=True).logits[:, -1]                 # (n, V) float32
        if self.cache is None:
            self._allocate(prefill)
            if self.use_graph:
                self._capture()                 # before any slot holds a prompt: its steps touch empty slots only
        W = p_ids.size(1)
        cols = (self.column - W + torch.arange(W, device=self.column.device)) % self.L   # (W,)
        at = (slots[:, None], cols[None, :])
        for dst, src in zip(self.cache.layers, prefill.layers):
            dst.keys[slots[:, None], :, cols[None, :]] = src.keys[which].transpose(1, 2)
            dst.values[slots[:, None], :, cols[None, :]] = src.values[which].transpose(1, 2)
        self.valid[slots] = False
        self.valid[at] = p_mask[which].bool()
        self.key_pos[at] = positions[which]
        self.row[slots] = rows
        self.step[slots] = 0
        self.pos[slots] = p_mask.sum(-1)[which] - 1
        self._draw(logits[which].clone(), slots)

    def compact(self) -> None:
        """Keep only the slots still generating (once no prompt waits): later steps run fewer rows."""
        keep = self.active.nonzero().flatten()
        for name in ("row", "active", "step", "pos", "last", "valid", "key_pos"):
            setattr(self, name, getattr(self, name)[keep])
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        self.S = keep.numel()

    def _allocate(self, prefill: DynamicCache) -> None:
        layers = []
        for layer in prefill.layers:
            _, heads, _, dim = layer.keys.shape
            keys = layer.keys.new_zeros(self.S, heads, self.L, dim)
            values = layer.values.new_zeros(self.S, heads, self.L, layer.values.size(-1))
            layers.append(_SlotLayer(keys, values, self.column))
        self.cache = Cache(layers=layers)

    def _capture(self) -> None:
        """Capture `decode` as a CUDA graph (after two warm-up steps on a side stream: lazy initialisation,
        autotuning), then put the state back as it was: the three steps only wrote empty slots and row B."""
        state = [self.row, self.active, self.step, self.pos, self.last, self.column, self.valid, self.key_pos]
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.decode()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.decode()
        for t, v in zip(state, saved):
            t.copy_(v)

    # -- one decode step of every slot: device ops only ------------------------------------------------

    def _draw(self, logits: torch.Tensor, slots: torch.Tensor | slice) -> None:
        """Draw the next token of `slots` from their (k, V) float32 logits, record it, advance their state."""
        row, step = self.row[slots], self.step[slots]
        if self.logits_hook is not None:
            self.logits_hook(logits, row, step)
        drawn = draw(logits, self.cfg, seed=self.seed, sample_ids=self.sample_ids[row], step=step,
                     vocab_size=self.vocab_size, suppress_id=self.pad_id)
        at = (row, step.clamp(max=self.N - 1))                   # empty slots write row B
        self.tokens[at] = drawn.tokens
        self.logprobs[at] = drawn.logprobs
        self.entropy[at] = drawn.entropy
        going = (row < self.B) & (drawn.tokens != self.eos_id) & (step + 1 < self.N)
        self.active[slots] = going
        self.row[slots] = torch.where(going, row, self.B)
        self.step[slots] = torch.where(going, step + 1, 0)
        self.pos[slots] = torch.where(going, self.pos[slots] + 1, 0)
        self.last[slots] = drawn.tokens

    def advance(self) -> None:
        """`decode`, replayed from its CUDA graph when one was captured."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.decode()

    def decode(self) -> None:
        """One token for every slot (empty slots compute and write to row B): no host sync."""
        self.valid.index_fill_(1, self.column, True)
        self.key_pos.index_copy_(1, self.column, self.pos[:, None])
        self._draw(self.policy(input_ids=self.last[:, None], position_ids=self.pos[:, None],
                               attention_mask=self._mask(), cache=self.cache, use_cache=True).logits[:, -1],
                   slice(None))
        self.column.add_(1).remainder_(self.L)

    def _mask(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """(S, 1, 1, L) masks: each slot's own columns (and the window, on sliding layers); boolean (True: attend)
        for sdpa, additive float32 for eager attention."""
        masks = {"full_attention": self.valid}
        if self.window is not None:
            masks["sliding_attention"] = self.valid & (self.pos[:, None] - self.key_pos < self.window)
        for k, m in masks.items():
            m = m[:, None, None, :]
            masks[k] = torch.where(m, 0.0, torch.finfo(torch.float32).min) if self.additive_mask else m
        if self.per_type:
            return masks
        return masks["full_attention" if self.window is None else "sliding_attention"]


@torch.no_grad()
def generate_static(policy: nn.Module, prompts: PromptBatch, cfg: RolloutConfig, *, eos_id: int, pad_id: int,
                    slots: int, seed: int, sample_ids: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None,
                    logits_hook: Optional[LogitsHook] = None, sync_every: Optional[int] = None) -> Rollout:
    """One response per prompt row, as `rollout.generate` (same arguments, `slots` for its
    generation_batch_size): the same tokens, logprobs and entropy to rounding, generated on `slots` slots with
    continuous batching (module docstring). sync_every: decode steps between two looks of the host at the
    slots (default 1 on CPU, 8 on CUDA)."""
    device = next(policy.parameters()).device
    ids, mask = prompts.input_ids.to(device), prompts.attention_mask.to(device)
    B, P = ids.shape
    if sample_ids is None:
        sample_ids = torch.arange(B)
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 8
    # Host-side plan, once: each row's first row with the same prompt, each row's prompt length.
    keys = [tuple(r) for r in torch.where(mask.bool(), ids, -1).tolist()]
    first: dict[tuple, int] = {}
    source = torch.tensor([first.setdefault(k, i) for i, k in enumerate(keys)], device=device)
    state = _Slots(policy, cfg, n_rows=B, slots=max(1, min(slots, B)), width=P, eos_id=eos_id, pad_id=pad_id,
                   vocab_size=vocab_size, seed=sampling_seed(seed), sample_ids=sample_ids, logits_hook=logits_hook,
                   device=device, graph=cfg.compile and device.type == "cuda")
    with float32_logits(policy):
        waiting = 0
        while True:
            free = (~state.active).nonzero().flatten()                          # the host sync of the loop
            if waiting < B and free.numel():
                rows = torch.arange(waiting, min(B, waiting + free.numel()), device=device)
                free = free[:rows.numel()]
                width = int(mask[rows].sum(-1).max())                          # the admitted prompts' width
                state.admit(free, rows, ids[:, P - width:], mask[:, P - width:], source[rows])
                waiting += rows.numel()
                continue                                                        # an admitted row may end at once
            if waiting >= B:
                n_active = int(state.active.sum())
                if n_active == 0:
                    break
                if state.graph is None and n_active <= state.S // 2:
                    state.compact()
            for _ in range(sync_every):
                state.advance()
    tokens, logprobs, entropy = state.tokens[:B], state.logprobs[:B], state.entropy[:B]
    del state
    response_mask, ended = response_mask_from_tokens(tokens, eos_id)
    R = max(1, int(response_mask.sum(-1).max()))
    response_mask, tokens = response_mask[:, :R], tokens[:, :R]
    return Rollout(
        sequences=torch.cat([ids, torch.where(response_mask, tokens, pad_id)], dim=1),
        attention_mask=torch.cat([mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        lengths=response_mask.sum(-1),
        ended=ended,
        prompt_width=P,
        logprobs=torch.where(response_mask, logprobs[:, :R], 0.0),
        entropy=torch.where(response_mask, entropy[:, :R], 0.0),
    )
