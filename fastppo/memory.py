"""Peak memory of a call: host RSS on CPU (for benchmarks and memory tests).

Linux resets a process's peak RSS (VmHWM) when "5" is written to
/proc/self/clear_refs; the peak during the call minus the RSS before it is the
extra memory the call needed. For repeatable numbers run it in a process
started with MALLOC_MMAP_THRESHOLD_=65536, so that large buffers go back to
the OS when freed instead of being recycled by malloc, and warm the call up
once first (lazy initialisation allocates too).
"""

from __future__ import annotations

import re


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def peak_host_extra_bytes(fn) -> int:
    """Peak resident memory above the starting point while fn() runs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before
