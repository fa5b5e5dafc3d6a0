"""The models across processes: FSDP2 sharding, mixed precision, loading on the meta device, unsharding.

`parallelize` is the one entry point: how `models.load_models` prepares each
of the four models right after loading it. FSDP2 (`apply_fsdp`: `fully_shard`
on each transformer block, then on the root) over a 1-D mesh (FSDP) or a 2-D
(replicate, shard) mesh (HSDP, `parallel.replicate_degree`). Gradients are
summed across ranks, never averaged: every loss is already divided by a
global token count (`fastppo.masked.masked_count` over `dist.group()`), so
the sum is the global gradient.

Precision on GPU: float32 master weights and optimizer state, bfloat16
compute, float32 gradient reduction. With FSDP (the default on CUDA, also in
one process) MixedPrecisionPolicy does it; without (`parallel.shard=never`)
`Autocast` runs the transformer blocks under torch.autocast.

Loading with several processes (`from_pretrained`, `Sharder`): rank 0 reads
each model; the other ranks build it on the meta device and receive their
shards from rank 0, so no rank but 0 ever holds a full model on the host.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from typing import Callable, Iterator

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor

from . import dist
from .config import ParallelConfig
from .dist import DistributedError, rank, world_size

log = logging.getLogger("fastppo")

# Name of the method `Sharder` registers on each root as an FSDP forward (see `run_as_forward`).
FORWARD_METHOD = "fastppo_forward"



def build_mesh(replicate_degree: int, device: torch.device):
    """1-D ("shard",) mesh over all ranks, or 2-D ("replicate", "shard") for HSDP (replicate_degree > 1)."""
    world = world_size()
    if world % replicate_degree:
        raise DistributedError(f"parallel.replicate_degree={replicate_degree} must divide the number of processes ({world})")
    if replicate_degree == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate_degree, world // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model: the classes its `_no_split_modules` names, else the
    children of its longest nn.ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to shard")
    return list(max(lists, key=len))


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def plain_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 wraps it in a generated FSDP<Name> subclass)."""
    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def _call(self: nn.Module, fn: Callable, *args, **kwargs):
    return fn(self, *args, **kwargs)


def run_as_forward(model: nn.Module, fn: Callable, *args, **kwargs):
    """fn(model, *args, **kwargs), run as a forward of the root FSDP module.

    Code that calls the backbone and then uses the root's own parameters
    (lm_head weight in `linear_token_logprobs`, the scalar head) must run
    inside the root's forward: there FSDP has all-gathered them, and the
    gradient of the full lm_head weight flows back to the shards. Unsharded
    models just call fn.
    """
    runner = getattr(model, FORWARD_METHOD, None)
    if runner is None:
        return fn(model, *args, **kwargs)
    return runner(fn, *args, **kwargs)


def compute_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """parallel.param_dtype: auto = bfloat16 on CUDA, the storage dtype (None: no cast) on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return getattr(torch, name)


def parallelize(parallel: ParallelConfig, device: torch.device,
                compute_dtype: torch.dtype | None) -> "Sharder | Autocast":
    """The one entry point of the models' parallelism and precision: how `models.load_models` prepares each
    of the four models right after loading it (`prepare(model, role, trained=...)`).

    parallel: the run's `parallel` config section; compute_dtype: parallel.param_dtype resolved (None: compute
    in the storage dtype). When the models are sharded (`wants_sharding`: several processes, or CUDA, or
    shard=always) a `Sharder`: FSDP2 over a (replicate, shard) mesh (`build_mesh`), each model wrapped by
    `apply_fsdp` with MixedPrecisionPolicy(compute_dtype, reduce_dtype), the frozen ones optionally offloaded,
    every rank's shards filled from rank 0 (which alone reads the weights, `from_pretrained`). Otherwise an
    `Autocast`: one process, weights moved to `device`, transformer blocks under torch.autocast(compute_dtype).
    """
    if dist.wants_sharding(parallel.shard, device):
        return Sharder(build_mesh(parallel.replicate_degree, device), device=device, param_dtype=compute_dtype,
                       reduce_dtype=getattr(torch, parallel.reduce_dtype), offload_frozen=parallel.offload_frozen,
                       reshard_after_forward=parallel.reshard_after_forward)
    return Autocast(device, compute_dtype)


def apply_fsdp(model: nn.Module, mesh, *, mp_policy: MixedPrecisionPolicy, offload_policy: OffloadPolicy,
               reshard_after_forward: bool) -> nn.Module:
    """FSDP2 as torchtitan applies it: `fully_shard` each transformer block, then the root.

    Gradients are summed over ranks, never averaged (every loss is already divided by a global token count).
    The root gets a forward method that runs any function as a forward of the root (`run_as_forward`).
    """
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                    reshard_after_forward=reshard_after_forward)
        block._fastppo_reshard_after_forward = reshard_after_forward                 # restored after `unsharded`
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    setattr(model, FORWARD_METHOD, types.MethodType(_call, model))
    register_fsdp_forward_method(model, FORWARD_METHOD)
    return model


class Sharder:
    """`parallelize`'s preparation of a model under FSDP2 (`apply_fsdp`; torchtitan's recipe).

    Trained models (policy, critic): stored in their load dtype (the optimizer
    updates these shards), computed in `param_dtype` (MixedPrecisionPolicy),
    gradients reduce-scattered in `reduce_dtype` and summed over ranks.
    Frozen models (reference, reward): cast to `param_dtype` before sharding
    (their forward computes in it anyway), optionally offloaded to CPU.
    With several processes every rank's shards are filled from rank 0's
    weights (the other ranks may pass meta-device models, `from_pretrained`).
    """

    def __init__(self, mesh, *, device: torch.device, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
                 offload_frozen: bool, reshard_after_forward: bool) -> None:
        self.mesh, self.device = mesh, device
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.offload_frozen, self.reshard_after_forward = offload_frozen, reshard_after_forward

    def __call__(self, model: nn.Module, role: str, *, trained: bool) -> nn.Module:
        if trained:
            mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
            if self.param_dtype is not None:
                # Parameters no optimizer updates (a LoRA model's base weights) are stored like a frozen model's.
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(self.param_dtype)
        else:
            if self.param_dtype is not None:
                model.to(self.param_dtype)
            mp = MixedPrecisionPolicy()
        offload = OffloadPolicy()
        if not trained and self.offload_frozen:
            if self.device.type == "cuda":
                offload = CPUOffloadPolicy(pin_memory=True)
            else:
                log.info("%s: parallel.offload_frozen has no effect on %s", role, self.device)
        # With several processes the weights come from rank 0 (`from_pretrained` built the model on the
        # meta device elsewhere): rank 0's full tensors are kept until they are broadcast into the shards.
        from_rank0 = world_size() > 1
        full = model.state_dict() if from_rank0 and rank() == 0 else {}
        n_blocks = len(transformer_blocks(model))                  # before fully_shard renames the block classes
        # Blocks of the frozen models are only used in no-grad forwards: always reshard after them.
        apply_fsdp(model, self.mesh, mp_policy=mp, offload_policy=offload,
                   reshard_after_forward=self.reshard_after_forward if trained else True)
        if from_rank0:
            _fill_from_rank0(model, full, torch.device("cpu") if isinstance(offload, CPUOffloadPolicy) else self.device,
                             self.device)
            del full
        local, total = shard_numel(model)
        log.info("%s: fully_shard over mesh %s, %d blocks + root; this rank holds %d of %d parameters (%.1f%%)%s",
                 role, tuple(self.mesh.shape), n_blocks, local, total,
                 100.0 * local / max(total, 1), ", offloaded to CPU" if isinstance(offload, CPUOffloadPolicy) else "")
        return model


class Autocast:
    """`parallelize`'s preparation of a model for one process without FSDP (parallel.shard=never, or one CPU
    process with shard=auto), the counterpart of `Sharder`.

    The weights stay in their load dtype (model.dtype: float32 master
    weights, and AdamW state in float32) and move to `device`; each
    transformer block runs under torch.autocast(dtype), so its matmuls and
    attention compute in `dtype` (bfloat16) while norms, softmax and the
    residual stream stay float32. Embeddings, the final norm and the heads
    run outside autocast: the fused lm_head ops get float32 hidden states
    and weight and accumulate in float32. The frozen models get the same
    treatment (their numbers then match the policy's at the first step).
    dtype None (or the load dtype) changes nothing.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype | None) -> None:
        # param_dtype: the compute dtype, under the name `Sharder` gives it (load_models reads either's).
        self.device, self.param_dtype = device, dtype

    def __call__(self, model: nn.Module, role: str, *, trained: bool) -> nn.Module:
        model.to(self.device)
        storage = next(model.parameters()).dtype
        if self.param_dtype is None or self.param_dtype == storage:
            return model
        blocks = transformer_blocks(model)
        for block in blocks:
            _run_under_autocast(block, self.device.type, self.param_dtype)
        log.info("%s: %s weights, %d blocks under torch.autocast(%s)", role, str(storage).removeprefix("torch."),
                 len(blocks), str(self.param_dtype).removeprefix("torch."))
        return model


def _run_under_autocast(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Make module.forward run under torch.autocast (an instance attribute: the class and other instances keep
    theirs; activation checkpointing recomputes through it, so the recompute sees the same dtypes)."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return inner(*args, **kwargs)

    module.forward = forward
    module._fastppo_autocast = dtype


def autocast_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype `Autocast` runs this module's forward under (None: not wrapped)."""
    return getattr(module, "_fastppo_autocast", None)


def from_pretrained(cls, path: str, shard, *, config, **kwargs) -> tuple[nn.Module, dict | None]:
    """(cls.from_pretrained(path, config=config, **kwargs), its loading info), read on rank 0 only when
    `shard` is a Sharder over several processes (the loading info is None on the other ranks).

    The other ranks build the same architecture from `config` on the
    meta device (no file read, no memory); `Sharder` then broadcasts rank 0's
    weights into every rank's shards. Code between this call and the
    Sharder must not read weight values (they are meta on ranks > 0); shape
    changes (resize_token_embeddings) are fine. Host memory of a 7B model:
    rank 0 reads it (and copies the reference from it), the other ranks only
    ever hold their shards, instead of ~54 GB per rank.
    """
    if not (isinstance(shard, Sharder) and world_size() > 1 and rank() != 0):
        return cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    with torch.device("meta"):
        return cls.from_config(config, **kwargs), None


def _fill_from_rank0(model: nn.Module, full: dict, shard_device: torch.device, comm_device: torch.device) -> None:
    """Broadcast rank 0's full weights (`full`; empty elsewhere) into the shards of every rank, one tensor at a
    time (set_model_state_dict with broadcast_from_rank0: a rank holds one full tensor at most), then the
    buffers outside the state dict (rotary inv_freq, ...) and rank 0's RNG state: rank 0 alone may have drawn
    from it (random init of new embedding rows), and every rank must draw the same minibatches afterwards."""
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        model.to_empty(device=shard_device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buf in model.buffers():
        moved = buf.to(comm_device)
        tdist.broadcast(moved, src=0)
        if moved is not buf:
            buf.copy_(moved)
    rng = [torch.get_rng_state()]
    tdist.broadcast_object_list(rng, src=0, device=comm_device)
    torch.set_rng_state(rng[0])


def shard_numel(model: nn.Module) -> tuple[int, int]:
    """(parameters held by this rank, parameters of the whole model)."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total


def reshard(*models: nn.Module | None) -> None:
    """Free every all-gathered parameter of the models (e.g. the roots FSDP keeps gathered after a forward; a no-op
    for a model that is not sharded, or None)."""
    for model in models:
        for m in fsdp_modules(model) if model is not None else ():
            m.reshard()


@contextlib.contextmanager
def unsharded(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """All-gather the whole model once and keep it gathered for the block (generation).

    Without it every generated token would all-gather every block again
    (FSDP reshards after each forward). Memory: the full model in the compute
    dtype on each rank for the duration. Afterwards blocks reshard after
    forward again and the root keeps its parameters through backward, as
    fully_shard sets them.
    """
    modules = fsdp_modules(model)
    if not enabled or not modules:
        yield
        return
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        root = modules[0] if modules[0] is model else None
        for m in modules:
            m.set_reshard_after_forward(m is not root and _block_reshard(m), recurse=False)
            m.reshard()


def _block_reshard(module: nn.Module) -> bool:
    return getattr(module, "_fastppo_reshard_after_forward", True)
