"""Shared benchmark plumbing: timing, peak memory, CSV rows and plots.

Providers are always measured side by side in one run; ratios between them are
what a CPU run can report, absolute times mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fastppo.memory import peak_host_extra_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int = 2, rep: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) wall time of fn() in ms; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(rep):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def peak_extra_mb(fn, device: torch.device) -> float:
    """Peak memory above the starting point while fn() runs, in MB (after one warm-up call)."""
    fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 1e6
    return peak_host_extra_bytes(fn) / 1e6


def measured_copy_bandwidth_gbs(device: torch.device, n_bytes: int = 1 << 28) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the roofline for memory-bound ops."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device, warmup=3, rep=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """Measured size³ matmul rate in TFLOP/s, the roofline for matmul-bound ops."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms, _, _ = time_ms(lambda: torch.mm(a, b), device, warmup=3, rep=10)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def parse_shapes(text: str, dims: str) -> list[tuple[int, ...]]:
    """'4096x32000,16384x128256' -> [(4096, 32000), (16384, 128256)]; dims names the axes, e.g. 'NxV'."""
    n_dims = len(dims.split("x"))
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != n_dims or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not {dims} in positive integers "
                                             f"(a comma-separated list, e.g. {','.join(['64'] * n_dims)})")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def add_shapes_argument(parser: argparse.ArgumentParser, dims: str) -> None:
    """--shapes: replaces the device's default shape list (bench/gpu_check.py passes a shorter one)."""
    parser.add_argument("--shapes", type=lambda text: parse_shapes(text, dims), default=None, metavar=f"{dims},...",
                        help=f"shapes to run instead of the defaults, as {dims} separated by commas")


def append_csv(name: str, rows: list[dict]) -> Path:
    """Append rows to bench/results/<name>.csv, stamped with device, commit and date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    stamp = {"commit": git_commit(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rows = [{**stamp, **r} for r in rows]
    fields = list(rows[0].keys())
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            old_fields = next(csv.reader(f), [])
        if old_fields != fields:  # schema changed: start a fresh file rather than misalign columns
            path.rename(path.with_suffix(f".{int(time.time())}.csv"))
            new = True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def plot_bars(name: str, rows: list[dict], *, x: str, y: str, group: str, title: str, ylabel: str) -> Path | None:
    """One PNG per op: `y` per `x` value, one bar per `group` (provider)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = list(dict.fromkeys(str(r[x]) for r in rows))
    groups = list(dict.fromkeys(r[group] for r in rows))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(xs) * max(1, len(groups)) / 2), 4))
    for i, g in enumerate(groups):
        vals = {str(r[x]): r[y] for r in rows if r[group] == g}
        ax.bar([j + i * width for j in range(len(xs))], [vals.get(v, 0) or 0 for v in xs], width, label=g)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(xs))], xs, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
