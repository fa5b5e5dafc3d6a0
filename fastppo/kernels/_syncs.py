"""Counting host syncs: the check that a GPU hot path never makes the CPU wait for the device.

A host sync (``.item()``, ``bool(tensor)``, ``nonzero``, a device-to-host
copy) stalls the launch queue: the GPU drains, then idles until the CPU has
launched the next kernels. The fused ops promise none per call on CUDA (on CPU
they are free, and the ops use them for clear errors). ``torch.cuda``'s sync
debug mode reports each one as a warning; this module counts them.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

# The text of the warning torch.cuda.set_sync_debug_mode("warn") gives for each sync.
SYNC_WARNING = "called a synchronizing CUDA operation"


@dataclass
class HostSyncs:
    """What `count_host_syncs` saw: ``count`` syncs, or None with the ``reason`` it could not count."""

    count: int | None = None
    reason: str | None = None


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str):
    """Count the host syncs of the code in the block, on a CUDA device.

    Yields a `HostSyncs` filled in when the block ends. Off CUDA (CPU, the
    Triton interpreter) the count stays None and ``reason`` says why: there is
    no sync to observe. Warm the code up first: a first call may sync once
    (e.g. a capability probe) and lazily initialise.

        with count_host_syncs(x.device) as syncs:
            linear_ppo_loss(...).loss.backward()
        assert syncs.count == 0
    """
    device = torch.device(device)
    result = HostSyncs()
    if device.type != "cuda":
        result.reason = f"host syncs can only be counted on CUDA devices (sync debug mode), not on {device}"
        yield result
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield result
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    result.count = sum(SYNC_WARNING in str(w.message) for w in caught)
