"""Padding-free forwards: several sequences back to back in one row, and micro-batches by a token budget.

A padded batch (B, L) spends compute on padding: prompts are left-padded to
the longest prompt, responses right-padded to the longest response. A
`Packing` lays the valid tokens of such a batch (attention_mask == 1) back to
back in one row of N tokens, with position ids restarting at 0 for each
sequence, and records which packed positions a forward reads (its
"targets": the states that predict the response tokens, the EOS state of a
reward model, ...). The forward helpers of `models` take it as `pack=` and
return the same (B, ·) layout as the padded forward, with the same numbers up
to float32 summation order; the fused ops in between see only the M target
rows, never a padding row.

Attention stays inside each sequence:

- sdpa / eager: the backbone gets position_ids and no attention mask;
  transformers (`masking_utils.find_packed_sequence_indices`) then reads the
  sequence boundaries from the position ids (a position that does not follow
  its left neighbour by 1 starts a sequence) and builds a block-diagonal
  causal mask, for every architecture that builds its mask with
  `create_causal_mask` (Llama, Qwen2, Mistral, GPT-2, ...).
- flash-attention: the cumulative sequence lengths (`cu_seqlens`, computed
  once per micro-batch here) go to the backbone as the `cu_seq_lens_q/k` and
  `max_length_q/k` keyword arguments, which transformers hands to every
  attention layer and on to flash-attn's varlen kernel (no per-layer
  recomputation from the position ids).

Micro-batches (`plan`): a token budget groups sequences by first-fit
decreasing (longest first into the first micro-batch with room); a sequence
longer than the budget gets a micro-batch of its own. Under FSDP every
forward all-gathers each block's parameters and every backward
reduce-scatters its gradients, so all ranks must run the same number of
micro-batches: `plan` all-reduces the count (max) and pads a rank that has
fewer with dummy micro-batches (its shortest sequence again, `dummy=True`),
whose results the caller multiplies by 0 (update) or drops (scoring). The
loss normaliser is the minibatch's token count either way, so the gradient
does not depend on how sequences fall into micro-batches (docs/packing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dist


@dataclass(frozen=True)
class Packing:
    """The valid tokens of a padded (B, L) batch as one packed row of N tokens, and the M target states.

    index:        (N,)   int64 flat indices into the (B*L) padded batch of the valid tokens, row by row
    position_ids: (1, N) int64 positions, restarting at 0 for each sequence
    cu_seqlens:   (S+1,) int32 cumulative lengths of the S non-empty sequences (flash-attn varlen)
    max_seqlen:   longest sequence
    select:       (M,)   int64 packed positions of the target states, in row-major padded order
    target_row:   (M,)   int64 padded row of each target
    target_col:   (M,)   int64 padded column of each target
    shape:        (B, L) of the padded batch
    """
    index: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    select: torch.Tensor
    target_row: torch.Tensor
    target_col: torch.Tensor
    shape: tuple[int, int]

    @staticmethod
    def build(attention_mask: torch.Tensor, targets: torch.Tensor, device: torch.device | str) -> "Packing":
        """From host (CPU) tensors: attention_mask (B, L) and targets (B, L) bool (the states a forward reads,
        each on a valid token); the index tensors are moved to `device` (no host sync there)."""
        valid = attention_mask.detach().cpu().bool()
        targets = targets.detach().cpu().bool()
        if targets.shape != valid.shape:
            raise ValueError(f"targets must have the attention mask's shape {tuple(valid.shape)}, got {tuple(targets.shape)}")
        if (targets & ~valid).any():
            raise ValueError("targets must lie on valid tokens (attention_mask == 1): a target state on padding "
                             "has no packed position")
        B, L = valid.shape
        flat = valid.flatten()
        index = flat.nonzero().squeeze(1)                                              # (N,)
        positions = (valid.long().cumsum(1) - 1).flatten()[index]                      # (N,) restart per row
        lengths = valid.sum(1)
        lengths = lengths[lengths > 0]
        cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        cu_seqlens[1:] = lengths.cumsum(0)
        packed_of = torch.full((B * L,), -1, dtype=torch.long)                         # padded flat -> packed
        packed_of[index] = torch.arange(index.numel())
        target_flat = targets.flatten().nonzero().squeeze(1)                           # (M,)
        to = dict(device=device, non_blocking=True)
        return Packing(
            index=index.to(**to), position_ids=positions[None].to(**to), cu_seqlens=cu_seqlens.to(**to),
            max_seqlen=int(lengths.max()) if lengths.numel() else 0, select=packed_of[target_flat].to(**to),
            target_row=(target_flat // L).to(**to), target_col=(target_flat % L).to(**to), shape=(B, L))

    @property
    def n_tokens(self) -> int:
        return self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) padded -> (1, N, ...) packed."""
        return x.flatten(0, 1)[self.index][None]

    def take(self, x: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """(B, W, ...) -> (M, ...): x at each target's (row, column - col_offset), e.g. a (B, R) response
        tensor whose column t is the state at padded column P-1+t (col_offset = P-1)."""
        return x[self.target_row, self.target_col - col_offset]

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """(M, ...) target outputs -> (B, L, ...) in the padded layout, 0 off the targets (differentiable)."""
        out = y.new_zeros((*self.shape, *y.shape[1:]))
        return out.index_put((self.target_row, self.target_col), y)

    def attention_kwargs(self, model_config) -> dict:
        """Extra backbone kwargs: flash-attn's varlen lengths, computed once for every layer; none for sdpa/eager
        (they find the sequences from the position ids)."""
        if "flash" not in str(getattr(model_config, "_attn_implementation", "") or ""):
            return {}
        return dict(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)


def response_targets(response_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B, P+R) bool: the states before the response tokens (column P-1+t for response token t)."""
    B, R = response_mask.shape
    out = torch.zeros(B, prompt_width + R, dtype=torch.bool, device=response_mask.device)
    out[:, prompt_width - 1:-1] = response_mask
    return out


def index_targets(index: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: one target per row, at column index[b] (e.g. the EOS token a reward is read at)."""
    out = torch.zeros(index.numel(), width, dtype=torch.bool, device=index.device)
    return out.scatter_(1, index.view(-1, 1), True)


# ----------------------------------------------------------------------------
# Micro-batch planning
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MicroBatch:
    rows: list[int]
    """Rows of the batch, ascending."""
    dummy: bool = False
    """Padding so that every rank runs as many micro-batches (FSDP's collectives must match): run it, then
    drop its results (multiply its loss by 0)."""


def first_fit_decreasing(costs: list[int], budget: int) -> list[list[int]]:
    """Bins of indices whose costs sum to at most `budget` (an item costing more gets a bin alone):
    longest first, each into the first bin with room. Each bin's indices ascending; bins by first index."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if costs[i] <= free:
                bins[b].append(i)
                room[b] -= costs[i]
                break
        else:
            bins.append([i])
            room.append(budget - costs[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def plan(lengths: list[int], *, rows: int, tokens: int | None, padded_width: int, packed: bool,
         device: torch.device | str = "cpu") -> list[MicroBatch]:
    """Micro-batches over a batch of sequences of `lengths` (valid tokens each), the same number on every rank.

    tokens=None: consecutive groups of `rows`. Otherwise a token budget per micro-batch, costing each
    sequence its length when packed and `padded_width` (the columns a padded forward computes) when not.
    With a token budget and several processes the count is all-reduced (max, one scalar) and the shorter
    plans padded with dummies (see the module docstring).
    """
    n = len(lengths)
    if tokens is None:
        groups = [list(range(s, min(s + rows, n))) for s in range(0, n, rows)]
    else:
        groups = first_fit_decreasing(list(lengths) if packed else [padded_width] * n, tokens)
    out = [MicroBatch(g) for g in groups]
    if tokens is not None and dist.world_size() > 1:      # (row counts: every rank holds as many rows)
        count = int(dist.all_reduce(torch.tensor(float(len(out)), device=device), "max").item())
        if n:
            shortest = min(range(n), key=lambda i: (lengths[i], i))
            out += [MicroBatch([shortest], dummy=True)] * (count - len(out))
        elif count:
            raise ValueError("a rank with no rows cannot run the micro-batches of the others")
    return out


def host_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Valid tokens per row, on the host (one device-to-host copy)."""
    return attention_mask.sum(-1).tolist()


@dataclass(frozen=True)
class Planned:
    """One micro-batch, ready to run."""
    rows: torch.Tensor
    """(b,) int64 rows of the batch, on its device."""
    packs: tuple[Packing | None, ...]
    """One per frame given to `micro_batches` (None: padded forwards)."""
    dummy: bool
    """Run it, then drop its results (see `MicroBatch.dummy`)."""


def micro_batches(frames: list[tuple[torch.Tensor, torch.Tensor]], *, rows: int, tokens: int | None, packed: bool
                  ) -> list[Planned]:
    """Plan the micro-batches of a batch and build their packings, with one device-to-host copy.

    frames: (attention_mask (B, L_i), targets (B, L_i) bool) of each layout the micro-batch is run in (e.g.
    the policy's sequences and the reward model's, which has one more column); the first one's lengths
    are budgeted. rows, tokens: as in `plan`.
    """
    device = frames[0][0].device
    flat = torch.cat([x.flatten().bool() for frame in frames for x in frame]).cpu()          # host sync (1)
    host, start = [], 0
    for mask, targets in frames:
        n = mask.numel()
        host.append((flat[start:start + n].view(mask.shape), flat[start + n:start + 2 * n].view(mask.shape)))
        start += 2 * n
    mask0 = host[0][0]
    mbs = plan(mask0.sum(-1).tolist(), rows=rows, tokens=tokens, padded_width=mask0.size(1), packed=packed,
               device=device)
    all_rows = torch.tensor([i for mb in mbs for i in mb.rows], dtype=torch.long).to(device, non_blocking=True)
    out = []
    for mb, r in zip(mbs, all_rows.split([len(mb.rows) for mb in mbs])):
        packs = tuple(Packing.build(m[mb.rows], t[mb.rows], device) if packed else None for m, t in host)
        out.append(Planned(r, packs, mb.dummy))
    return out


def in_row_order(rows: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' outputs (each (b, ...), for `rows`) as one (B, ...) tensor in the batch's row order."""
    index, stacked = torch.cat(rows), torch.cat(values)
    return torch.empty_like(stacked).index_copy_(0, index, stacked)
