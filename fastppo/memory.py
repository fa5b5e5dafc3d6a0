"""Memory of this process: its peak so far (trainer metrics, benchmarks) and the peak of one call.

On CUDA the peak is torch.cuda.max_memory_allocated; on the CPU it is the
process's resident set (VmRSS, and its high-water mark VmHWM, from
/proc/self/status).

For the peak of one call, Linux resets VmHWM when "5" is written to
/proc/self/clear_refs; the peak during the call minus the RSS before it is the
extra memory the call needed. For repeatable numbers run it in a process
started with MALLOC_MMAP_THRESHOLD_=65536, so that large buffers go back to
the OS when freed instead of being recycled by malloc, and warm the call up
once first (lazy initialisation allocates too).

This module imports only torch and the standard library: bench/trl_workload.py
loads it by path in a venv that has no fastppo.
"""

from __future__ import annotations

import re

import torch


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def status_mb(key: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in MiB; NaN where the system has none."""
    try:
        return _status_bytes(key) / 2**20
    except (OSError, AttributeError):  # no procfs (not Linux), or no such field
        return float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far in MiB: CUDA max allocated on a GPU, the peak RSS (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")


def peak_host_extra_bytes(fn) -> int:
    """Peak resident memory above the starting point while fn() runs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before
