"""Padding-free forwards: several sequences back to back in a row, and micro-batches by a token budget.

A padded batch (B, L) spends compute on padding: prompts are left-padded to
the longest prompt, responses right-padded to the longest response. A
`Packing` lays the valid tokens of such a batch (attention_mask == 1) back to
back in rows, with position ids restarting at 0 for each sequence, and
records which packed positions a forward reads (its "targets": the states
that predict the response tokens, the EOS state of a reward model, ...).

The layout depends on the attention kernel. flash-attn's varlen kernel costs
each sequence its own length squared, so everything goes in one row. sdpa and
eager attend through a dense mask over the whole row, quadratic in the row's
length: one row of a whole micro-batch (128 sequences of 5-64 tokens) ran at
0.54x the padded forward + backward's speed on CPU (docs/packing.md). For
them the sequences are binned (first fit decreasing) into rows as wide as the
longest sequence, so no row costs more attention than a padded row, and
there are fewer rows. A row's unused tail is filler: copies of a token at
positions restarting from 0, a block of its own that no target reads. A
token budget counts the sequences' tokens; the rows compute their full
width (at most twice the tokens, ~1.1x in the benchmark).

A padded batch is the trivial packing (`Packing.padded`: each row as it is,
positions from the attention mask, the mask itself passed to the backbone),
so the forward helpers of `models` have one code path: they take a
`Packing` as `pack=`, run the backbone on its rows, read its M target states,
and return the same (B, ·) layout either way, with the same numbers up to
float32 summation order; the fused ops in between see only the M target
rows, never a padding row. The micro-batch planner (`micro_batches`) builds
every packing, padded or packed.

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
micro-batches: `equalize` all-reduces the counts (max) and pads a rank that
has fewer with dummy micro-batches (its shortest sequence again, `dummy=True`),
whose results the caller multiplies by 0 (update) or drops (scoring). The
loss normaliser is the minibatch's token count either way, so the gradient
does not depend on how sequences fall into micro-batches (docs/packing.md).
`micro_batches` plans every minibatch of an update (or the whole score
phase) at once: one copy of the masks to the host, one of the index tensors
back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dist


def _flash(config) -> bool:
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def varlen_attention(model) -> bool:
    """Whether the model attends with flash-attn (its varlen kernel: a packed row costs each sequence's own
    length squared) rather than sdpa or eager (a dense mask over the whole row): whether to pack one row.
    Either layout gives the same numbers with any kernel; a model without a config counts as sdpa."""
    return _flash(getattr(model, "config", None))


@dataclass(frozen=True)
class Packing:
    """The valid tokens of a padded (B, L) batch packed into R rows of W positions, and the M target states.

    index:        (R*W,) int64 flat index into the (B*L) padded batch of each packed position (filler: 0)
    position_ids: (R, W) int64 positions, restarting at 0 for each sequence and each row's filler
    cu_seqlens:   (S+1,) int32 cumulative lengths of the S blocks (sequences and fillers) of the flattened
                  rows (flash-attn varlen)
    max_seqlen:   longest block
    select:       (M,)   int64 flat packed positions of the target states, in row-major padded order
    target_row:   (M,)   int64 padded row of each target
    target_col:   (M,)   int64 padded column of each target
    shape:        (B, L) of the padded batch
    n_tokens:     the valid tokens packed (R*W less the filler)
    padded:       the trivial packing of the padded batch (`padded`): the backbone attends through its
                  attention mask
    """
    index: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    select: torch.Tensor
    target_row: torch.Tensor
    target_col: torch.Tensor
    shape: tuple[int, int]
    n_tokens: int
    padded: bool = False

    @staticmethod
    def padded_batch(attention_mask: torch.Tensor, targets: torch.Tensor) -> "Packing":
        """The trivial packing of a padded batch (B, L), on the masks' device: B rows of L positions as they are
        (identity index), position ids counting the attended tokens (0 on left padding, as HF generate does),
        and the targets (B, L) bool, which may lie on padding (their outputs are then the op's for an ignored
        label, or a value the caller masks)."""
        B, L = attention_mask.shape
        device = attention_mask.device
        flat = targets.flatten().nonzero().squeeze(1)
        return Packing(index=torch.arange(B * L, device=device),
                       position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
                       cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device), max_seqlen=L, select=flat,
                       target_row=flat // L, target_col=flat % L, shape=(B, L), n_tokens=int(B * L), padded=True)

    @staticmethod
    def build(attention_mask: torch.Tensor, targets: torch.Tensor, device: torch.device | str = "cpu", *,
              one_row: bool = False) -> "Packing":
        """From attention_mask (B, L) and targets (B, L) bool (the states a forward reads, each on a valid
        token), built on the host (a device-to-host copy of the masks when they are on a device) and moved
        to `device`. one_row: every sequence in one row (for flash-attn, `varlen_attention`); else rows as wide
        as the longest sequence. `micro_batches` builds many at once with one copy each way."""
        valid = attention_mask.detach().cpu().bool()
        targets = targets.detach().cpu().bool()
        if targets.shape != valid.shape:
            raise ValueError(f"targets must have the attention mask's shape {tuple(valid.shape)}, got {tuple(targets.shape)}")
        if (targets & ~valid).any():
            raise ValueError("targets must lie on valid tokens (attention_mask == 1): a target state on padding "
                             "has no packed position")
        B, L = valid.shape
        lengths = valid.sum(1).tolist()
        seqs = [b for b in range(B) if lengths[b]]
        if one_row or not seqs:
            rows = [seqs]
        else:
            cost = [lengths[b] for b in seqs]
            rows = [[seqs[i] for i in r] for r in first_fit_decreasing(cost, max(cost))]
        fill = [sum(lengths[b] for b in r) for r in rows]
        W = max(fill)
        row_of, start_of, blocks = [0] * B, [0] * B, []                # each sequence's row and first column
        for r, members in enumerate(rows):
            col = 0
            for b in members:
                row_of[b], start_of[b] = r, col
                col += lengths[b]
                blocks.append(lengths[b])
            if W > col:
                blocks.append(W - col)                                 # the filler, a block of its own
        flat = valid.flatten().nonzero().squeeze(1)                    # (N,) valid padded positions
        seq = flat // L
        pos = (valid.long().cumsum(1) - 1).flatten()[flat]            # (N,) restart per sequence
        dest = torch.tensor(row_of)[seq] * W + torch.tensor(start_of)[seq] + pos
        column = torch.arange(len(rows) * W) % W                      # filler: positions from 0 after the fill
        positions = column - torch.tensor(fill).repeat_interleave(W)
        positions[dest] = pos
        index = torch.zeros(len(rows) * W, dtype=torch.long)
        index[dest] = flat
        packed_of = torch.full((B * L,), -1, dtype=torch.long)                         # padded flat -> packed
        packed_of[flat] = dest
        cu_seqlens = torch.zeros(len(blocks) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.tensor(blocks, dtype=torch.int32).cumsum(0)
        target_flat = targets.flatten().nonzero().squeeze(1)                           # (M,)
        host = Packing(index=index, position_ids=positions.view(len(rows), W), cu_seqlens=cu_seqlens,
                       max_seqlen=max(blocks, default=0), select=packed_of[target_flat],
                       target_row=target_flat // L, target_col=target_flat % L, shape=(B, L), n_tokens=flat.numel())
        if torch.device(device).type == "cpu":
            return host
        return host._from_tensors([t.to(device, non_blocking=True) for t in host._tensors()])

    def _tensors(self) -> list[torch.Tensor]:
        return [self.index, self.position_ids.flatten(), self.cu_seqlens.long(), self.select, self.target_row,
                self.target_col]

    def _from_tensors(self, ts: list[torch.Tensor]) -> "Packing":
        index, positions, cu, select, row, col = ts
        return Packing(index=index, position_ids=positions.view(self.position_ids.shape), cu_seqlens=cu.int(),
                       max_seqlen=self.max_seqlen, select=select, target_row=row, target_col=col, shape=self.shape,
                       n_tokens=self.n_tokens, padded=self.padded)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) padded -> (R, W, ...) packed."""
        return x.flatten(0, 1)[self.index].view(*self.position_ids.shape, *x.shape[2:])

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """(R, W, ...) outputs of a packed forward -> (M, ...) at the target states."""
        return y.flatten(0, 1)[self.select]

    def take(self, x: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """(B, W, ...) -> (M, ...): x at each target's (row, column - col_offset), e.g. a (B, R) response
        tensor whose column t is the state at padded column P-1+t (col_offset = P-1)."""
        return x[self.target_row, self.target_col - col_offset]

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """(M, ...) target outputs -> (B, L, ...) in the padded layout, 0 off the targets (differentiable)."""
        out = y.new_zeros((*self.shape, *y.shape[1:]))
        return out.index_put((self.target_row, self.target_col), y)

    def attention_kwargs(self, model_config, attention_mask: torch.Tensor | None = None) -> dict:
        """Extra backbone kwargs: for a padded batch its attention mask; packed, flash-attn's varlen lengths,
        computed once for every layer, and nothing for sdpa/eager (they find the sequences from the position ids)."""
        if self.padded:
            return {"attention_mask": attention_mask}
        if not _flash(model_config):
            return {}
        return dict(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)


def whole_batch(attention_mask: torch.Tensor, targets: torch.Tensor, *, packed: bool, one_row: bool = False) -> Packing:
    """A whole batch as one micro-batch, on the masks' device: packed (`Packing.build`) or padded."""
    if not packed:
        return Packing.padded_batch(attention_mask, targets)
    return Packing.build(attention_mask, targets, attention_mask.device, one_row=one_row)


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
    """Positions in the planned sequences (`plan`'s lengths), ascending."""
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


def plan(lengths: list[int], *, rows: int, tokens: int | None, padded_width: int, packed: bool) -> list[MicroBatch]:
    """Micro-batches over a batch of sequences of `lengths` (valid tokens each), on this rank.

    tokens=None: consecutive groups of `rows`. Otherwise a token budget per micro-batch, costing each
    sequence its length when packed and `padded_width` (the columns a padded forward computes) when not.
    """
    n = len(lengths)
    if tokens is None:
        return [MicroBatch(list(range(s, min(s + rows, n)))) for s in range(0, n, rows)]
    return [MicroBatch(b) for b in first_fit_decreasing(list(lengths) if packed else [padded_width] * n, tokens)]


def equalize(plans: list[list[MicroBatch]], lengths: list[list[int]], device: torch.device | str) -> list[list[MicroBatch]]:
    """Each plan padded with dummies (its shortest sequence) to the largest count any rank has for it:
    one all-reduce (max) of every plan's count. Identity in one process."""
    if dist.world_size() == 1 or not plans:
        return plans
    counts = dist.all_reduce(torch.tensor([float(len(p)) for p in plans], device=device), "max").tolist()
    out = []
    for p, ls, count in zip(plans, lengths, counts):
        if len(p) < count and not ls:
            raise ValueError("a rank with no rows cannot run the micro-batches of the others")
        shortest = min(range(len(ls)), key=lambda i: (ls[i], i)) if ls else 0
        out.append(p + [MicroBatch([shortest], dummy=True)] * (int(count) - len(p)))
    return out


@dataclass(frozen=True)
class Planned:
    """One micro-batch, ready to run."""
    rows: torch.Tensor
    """(b,) int64 positions in its group (see `micro_batches`), on the batch's device."""
    packs: tuple[Packing, ...]
    """One per frame given to `micro_batches` (padded forwards: `Packing.padded_batch`)."""
    dummy: bool
    """Run it, then drop its results (see `MicroBatch.dummy`)."""


@dataclass(frozen=True)
class Group:
    """The micro-batches of one group of rows (e.g. an update's minibatch on this rank)."""
    rows: torch.Tensor
    """(n,) int64 rows of the batch, on its device."""
    micro: list[Planned]


def micro_batches(frames: list[tuple[torch.Tensor, torch.Tensor]], *, rows: int, tokens: int | None, packed: bool,
                  groups: list[list[int]] | None = None, one_row: bool = False) -> list[Group]:
    """Plan the micro-batches of each group of rows and build their packings.

    frames: (attention_mask (B, L_i), targets (B, L_i) bool) of each layout the micro-batches run in (e.g. the
    policy's sequences and the reward model's, which has one more column); the first one's lengths are
    budgeted. groups: lists of rows of the batch (default: one group of every row). rows, tokens: as in
    `plan`. With a token budget the counts are made equal across ranks (`equalize`). one_row: as in
    `Packing.build`.

    All groups together cost one device-to-host copy (the masks), at most one all-reduce (the counts)
    and one host-to-device copy (every index tensor).
    """
    device = frames[0][0].device
    flat = torch.cat([x.flatten().bool() for frame in frames for x in frame]).cpu()          # the one host sync
    host, start = [], 0
    for mask, _ in frames:
        n = mask.numel()
        host.append((flat[start:start + n].view(mask.shape), flat[start + n:start + 2 * n].view(mask.shape)))
        start += 2 * n
    mask0 = host[0][0]
    all_lengths = mask0.sum(-1).tolist()
    groups = [list(range(mask0.size(0)))] if groups is None else [list(g) for g in groups]
    lengths = [[all_lengths[i] for i in g] for g in groups]
    plans = [plan(ls, rows=rows, tokens=tokens, padded_width=mask0.size(1), packed=packed) for ls in lengths]
    if tokens is not None:                                 # (row counts: every rank holds as many rows)
        plans = equalize(plans, lengths, device)
    built = [[(mb, tuple(Packing.build(m[rows], t[rows], one_row=one_row) if packed else Packing.padded_batch(m[rows], t[rows])
                         for m, t in host for rows in [[g[i] for i in mb.rows]])) for mb in p]
             for g, p in zip(groups, plans)]
    return _to_device(built, groups, device)


def _to_device(built: list[list[tuple[MicroBatch, tuple]]], groups: list[list[int]], device) -> list[Group]:
    """The plan's host tensors (group rows, micro-batch rows, packings) moved in one host-to-device copy."""
    parts = []
    for g, pairs in zip(groups, built):
        parts.append(torch.tensor(g, dtype=torch.long))
        for mb, packs in pairs:
            parts.append(torch.tensor(mb.rows, dtype=torch.long))
            parts += [t for p in packs for t in p._tensors()]
    views = iter(torch.cat(parts).to(device, non_blocking=True).split([t.numel() for t in parts]))
    out = []
    for pairs in built:
        group_rows = next(views)
        micro = [Planned(next(views), tuple(p._from_tensors([next(views) for _ in range(6)]) for p in packs), mb.dummy)
                 for mb, packs in pairs]
        out.append(Group(group_rows, micro))
    return out


def minibatch_shares(orders: torch.Tensor, minibatch_size: int) -> list[list[int]]:
    """This rank's rows of every minibatch, epoch after epoch: orders (E, B) are host permutations of the
    global batch (the same on every rank), cut into minibatches, each split evenly over the ranks."""
    share, rank = minibatch_size // dist.world_size(), dist.rank()
    return [order[start:start + minibatch_size][rank * share:(rank + 1) * share]
            for order in orders.tolist() for start in range(0, len(order), minibatch_size)]


def in_row_order(rows: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' outputs (each (b, ...), for `rows`) as one (B, ...) tensor in the batch's row order."""
    index, stacked = torch.cat(rows), torch.cat(values)
    return torch.empty_like(stacked).index_copy_(0, index, stacked)


def padded_again(bad: torch.Tensor, batch_size: int, forward, outs: list[torch.Tensor]) -> None:
    """Rows `bad` (B,) bool of a packed pass, computed again padded, in place in `outs` (each (B, ...)).

    In a packed row the sequences share the attention's matmuls, and a NaN or inf in one sequence's states
    reaches the others through 0 x NaN (a masked-out attention weight times a NaN value); a padded batch keeps
    it in its own row. The non-finite rows of a packed pass are such a row and its neighbours: computed again
    padded (`forward(rows)`: the outputs of those rows, padded), only the rows that are non-finite on their
    own stay so, and packed and padded passes drop the same rows. Under FSDP every rank runs as many forwards
    (a rank with fewer bad rows repeats its row 0 and drops the result). Host sync: one nonzero.
    """
    idx = bad.nonzero().flatten()
    n = int(dist.all_reduce(torch.tensor(idx.numel(), device=bad.device), "max"))
    for start in range(0, n, batch_size):
        rows = idx[start:start + batch_size]
        results = forward(rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=bad.device))
        if rows.numel():
            for out, res in zip(outs, results):
                out[rows] = res


def nonfinite_rows(*xs: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: rows with a NaN or inf in any of the (B, ...) tensors."""
    bad = None
    for x in xs:
        if x is not None:
            row = ~torch.isfinite(x).flatten(1).all(1) if x.dim() > 1 else ~torch.isfinite(x)
            bad = row if bad is None else bad | row
    return bad
