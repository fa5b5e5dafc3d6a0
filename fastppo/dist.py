"""Distributed runtime: the process group, the device, and the collectives every cross-rank quantity uses.

Driven by the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): `setup` joins the process group (nccl on CUDA, gloo on
CPU, with `parallel.timeout_s` on every collective); one process without
torchrun runs the same code with every helper below an identity. How the
models are sharded across the group is `fastppo.parallel`.

Every cross-rank quantity of the trainer goes through a helper here or
through `fastppo.masked` with group=`group()`: token counts, moments and
whitening are masked statistics (`fastppo.masked`); other sums, maxima and
minima go through `all_reduce` / `all_reduce_dict`, the stop decision
through `any_rank`, the experience exchange through `all_gather_cat`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from typing import Iterator

import torch
import torch.distributed as dist

from .config import validate_backend, validate_device
from .kernels._dispatch import triton_interpreter_enabled

log = logging.getLogger("fastppo")


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank has most likely died or hangs."""


# ----------------------------------------------------------------------------
# Ranks and devices
# ----------------------------------------------------------------------------

def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def group():
    """The default process group when running distributed, else None (for `fastppo.masked`'s group=)."""
    return dist.group.WORLD if is_initialized() else None


def resolve_device(name: str, backend: str | None = None) -> torch.device:
    """run.device: `auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu; checked against this machine, and
    run.backend (`backend`) against it."""
    if name == "auto":
        device = torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        validate_device(name, torch.cuda.device_count() if torch.cuda.is_available() else 0, local_rank())
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank()}")
    validate_backend(backend, device.type, triton_interpreter_enabled())
    return device


def wants_sharding(shard: str, device: torch.device, world: int | None = None) -> bool:
    """Whether the models are sharded (FSDP2), for parallel.shard and `world` processes (default: the group's).

    auto shards with more than one process, and on CUDA also in one: FSDP2's
    MixedPrecisionPolicy is then what gives float32 master weights and
    bfloat16 compute (`Sharder`). always shards also in one CPU process;
    never does not shard (one process only; see `Autocast`).
    """
    world = world_size() if world is None else world
    return shard == "always" or (shard == "auto" and (world > 1 or device.type == "cuda"))


def setup(shard: str, backend: str, timeout_s: float, device: torch.device) -> bool:
    """Join the process group when torchrun started several processes (or `shard=always`).

    Returns True when this call created the group (the caller destroys it at
    the end), False when there is nothing to do or a group already exists.
    """
    if is_initialized():
        return False
    world = env_world_size()
    if world == 1 and not wants_sharding(shard, device, world):
        return False
    if world > 1 and shard == "never":
        raise DistributedError(f"parallel.shard=never, but torchrun started {world} processes; "
                               "fastppo shards the four models across processes (FSDP2): use shard=auto")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        # One process with FSDP on (shard=always, or auto on CUDA) and no torchrun: a private single-rank group.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        # torchrun's agent keeps one TCPStore across restarts of the worker group: without a per-attempt
        # namespace a restarted rank can read a dead predecessor's address and fail to connect.
        store, rank_, world_ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"fastppo/attempt_{restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank_, world_size=world_, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    log.info("rank %d/%d: process group up (%s, timeout %ss, device %s)", rank(), world_size(), backend, timeout_s, device)
    return True


def teardown() -> None:
    """Leave the process group (also after an error: exiting with a live gloo group aborts the process)."""
    if is_initialized():
        try:
            # Sharded models hold the device mesh, which holds the group: a mesh that outlives the
            # group makes the process abort at exit ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()
        except Exception as exc:  # never hide the error that brought us here
            log.debug("destroy_process_group failed: %s", exc)


@contextlib.contextmanager
def collective_errors(what: str = "training") -> Iterator[None]:
    """Turn a failed or timed-out collective into a DistributedError that says what probably happened."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, dist.DistError) as exc:
        if not is_initialized() or world_size() == 1 or not _is_collective_failure(exc):
            raise
        raise DistributedError(
            f"rank {rank()}/{world_size()}: a collective failed during {what} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300]}). Another rank has probably failed or is stuck: look for the "
            "first error in the other ranks' logs (run_dir/train.rank<N>.log). Collectives time out after "
            "parallel.timeout_s seconds."
        ) from exc


# Collective failures torch may raise without a DistError type: gloo's own transport exceptions
# (gloo::IoException on a timed-out, closed or reset pair) derive from std::runtime_error and can reach
# Python as a plain RuntimeError, so only their message says what they are.
_UNTYPED_COLLECTIVE_FAILURE = ("gloo", "Gloo", "NCCL", "nccl", "Timed out", "timed out", "Connection closed",
                               "Connection reset", "Broken pipe", "recv", "ProcessGroup")


def _is_collective_failure(exc: BaseException) -> bool:
    # DistError covers DistBackendError (NCCL/gloo backend errors and timeouts), DistNetworkError, DistStoreError.
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _UNTYPED_COLLECTIVE_FAILURE)


# ----------------------------------------------------------------------------
# Collectives (identities in one process)
# ----------------------------------------------------------------------------

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x reduced over ranks by op ("sum", "max" or "min"), as a new tensor (x itself untouched)."""
    if op not in _OPS:
        raise ValueError(f"all_reduce: op must be one of {sorted(_OPS)}, got {op!r}")
    if not is_initialized():
        return x
    y = x.clone()
    dist.all_reduce(y, op=_OPS[op])
    return y


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when flag is True on any rank (a decision all ranks must take together)."""
    if not is_initialized():
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max").item())


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_cat(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate x over ranks along dim, in rank order; every rank's x must have the same shape."""
    if not is_initialized() or world_size() == 1:
        return x
    shape = torch.tensor(list(x.shape), dtype=torch.float64, device=x.device)    # nccl needs device tensors
    if not torch.equal(all_reduce(shape, "max"), all_reduce(shape, "min")):
        raise DistributedError(f"rank {rank()}: all_gather_cat needs equal shapes on all ranks, this rank has {tuple(x.shape)}")
    is_bool = x.dtype == torch.bool
    y = x.to(torch.uint8) if is_bool else x.contiguous()                  # gloo has no bool collectives
    parts = [torch.empty_like(y) for _ in range(world_size())]
    dist.all_gather(parts, y)
    out = torch.cat(parts, dim=dim)
    return out.bool() if is_bool else out


def gather_object_to_main(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on rank 0 (an empty list elsewhere); [obj] in one process."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank; [obj] in one process."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_dict(values: dict[str, torch.Tensor], op: str = "sum") -> dict[str, torch.Tensor]:
    """Each 0-d tensor (as float32) reduced over ranks by op, all in a single all-reduce."""
    if not is_initialized() or not values:
        return values
    keys = list(values)
    total = all_reduce(torch.stack([values[k].float().reshape(()) for k in keys]), op)
    return dict(zip(keys, total.unbind(0)))
