"""The benchmark harness: timing, peak memory, the provider loop, CSV rows, plots and the printed table.

Each bench/<op>.py supplies its providers, its shapes and the row of one case;
this module times and measures them, runs every provider side by side in one
run (a provider that fails is reported and dropped, not fatal), adds the
ratios to a baseline provider, prints the table, appends the rows to
bench/results/<op>.csv (stamped with commit, date and device) and draws one
PNG per op. Ratios between providers are what a CPU run can report; absolute
times mean something only on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

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


def percentiles(times: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of the times, linearly interpolated between the sorted samples."""
    times = sorted(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def time_ms(fn, device: torch.device, *, warmup: int = 2, rep: int = 10) -> tuple[float, float, float]:
    """(median, p20, p80) wall time of fn() in ms over `rep` calls after `warmup` calls (CUDA: about `rep`).

    CUDA: triton.testing.do_bench (CUDA events, the L2 cache flushed before
    each call). It takes time budgets, not counts: one call (compilation and
    autotuning stay out of the estimate), then one synchronised timed call
    whose time turns the counts into budgets. do_bench itself makes seven
    untimed calls before it times (one, five to estimate, at least one
    warm-up), so only a warm-up beyond those nine adds to its budget.
    CPU: perf_counter around each call.
    """
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        call_ms = (time.perf_counter() - t0) * 1e3
        median, p20, p80 = do_bench(fn, warmup=max(warmup - 9, 0) * call_ms, rep=rep * call_ms,
                                    quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


def peak_extra_mb(fn, device: torch.device) -> float:
    """Peak memory above the starting point while fn() runs, in MB (after one warm-up call)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
    """--shapes: replaces the device's default shape list (tools/gpu_check.py passes a shorter one)."""
    parser.add_argument("--shapes", type=lambda text: parse_shapes(text, dims), default=None, metavar=f"{dims},...",
                        help=f"shapes to run instead of the defaults, as {dims} separated by commas")


def op_parser(doc: str, dims: str) -> argparse.ArgumentParser:
    """The options the op benches share: --no-compile, --rep and --shapes (dims names the axes, e.g. 'NxV')."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--rep", type=int, default=None, help="timed repetitions (default 3 on CPU, 10 on GPU)")
    add_shapes_argument(parser, dims)
    return parser


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


def bench_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_providers(shapes, providers: dict, case, device: torch.device, *, dims: str,
                  notes: dict | None = None) -> list[dict]:
    """Rows of case(name, fn, shape) for every shape and provider, each row stamped with the device.

    A provider that fails is reported on stderr (and in notes) and not run at
    the later shapes; the others go on. dims names the shape's axes ("NxV").
    """
    rows = []
    for shape in shapes:
        where = " ".join(f"{d}={v}" for d, v in zip(dims.split("x"), shape))
        for name, fn in list(providers.items()):
            try:
                rows += case(name, fn, shape)
            except Exception as exc:  # a provider that fails here is reported, not fatal
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"  {name} failed at {where}: {msg}", file=sys.stderr, flush=True)
                if notes is not None:
                    notes[name] = f"failed: {msg}"
                providers.pop(name)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in rows:
        r["device"] = device_name(device)
    return rows


def ratio(a: float, b: float | None, digits: int = 3) -> float | None:
    """a / b rounded, or None when there is no positive b."""
    return round(a / b, digits) if b else None


def add_ratios(rows: list[dict], baseline: str, key: tuple[str, ...], columns: dict[str, str], *,
               digits: int = 3, inverse: bool = False) -> None:
    """Adds column = row[field] / baseline's row[field] (inverse: baseline / row, a speedup) to every row.

    The baseline row of a row is the `baseline` provider's row with the same
    values of `key`; columns maps each new column to its field; None where
    there is no baseline row, or nothing positive to divide by.
    """
    base = {tuple(r[k] for k in key): r for r in rows if r["provider"] == baseline}
    for r in rows:
        b = base.get(tuple(r[k] for k in key))
        for column, field in columns.items():
            if b is None:
                r[column] = None
            elif inverse:
                r[column] = ratio(b[field], r[field], digits)
            else:
                r[column] = ratio(r[field], b[field] if b[field] > 0 else None, digits)


def print_table(rows: list[dict], columns: list[tuple[str, str, int, str]]) -> None:
    """Prints a header and one line a row: columns are (header, key, width, format spec); None prints '-'."""
    print("\n" + " ".join(f"{header:>{width}}" for header, _, width, _ in columns))
    for r in rows:
        cells = ("-" if r[key] is None else format(r[key], spec) for _, key, _, spec in columns)
        print(" ".join(f"{cell:>{width}}" for cell, (_, _, width, _) in zip(cells, columns)))


def save_results(name: str, rows: list[dict], *, x: str, y: str, group: str, title: str, ylabel: str,
                 plot_rows: list[dict] | None = None) -> None:
    """bench/results/<name>.csv gets the rows, <name>.png the plot of plot_rows (default: the rows)."""
    path = append_csv(name, rows)
    png = plot_bars(name, rows if plot_rows is None else plot_rows, x=x, y=y, group=group, title=title,
                    ylabel=ylabel)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


def reexec_with_malloc_threshold() -> None:
    """On the CPU, re-executes this script once with MALLOC_MMAP_THRESHOLD_=65536 (see fastppo/memory.py).

    Host peak memory is only repeatable when freed buffers go back to the OS;
    glibc reads this at start-up, hence the re-execution.
    """
    if not torch.cuda.is_available() and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
