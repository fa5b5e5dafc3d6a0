"""Benchmark linear_token_logprobs (lm_head + logprobs + entropy): fastppo vs the hand-written way.

Providers, side by side in one run:
  naive    F.linear -> log_softmax(.float()) -> gather, + entropy from the softmax
  compile  torch.compile of naive (skipped, with the reason printed, when it fails here)
  fastppo  fastppo.kernels.linear_token_logprobs (chunked; logits never stored)
  fused    the same with FASTPPO_LINEAR_FUSED=1: GEMM kernels with the row statistics (forward) and the
           dlogits (backward) in the epilogue, no logits in memory; CUDA only
  liger    Liger-Kernel's fused linear cross-entropy (its summed loss: no entropy, but the
           same memory profile), CUDA only, when importable

CPU: N=8192, H=512, V=32000 float32, forward + backward: peak extra host memory
and time of each provider as a ratio to naive. The script re-executes itself
with MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the process and
the peak RSS is repeatable (see fastppo/memory.py).
GPU: N in {4096, 16384}, H=4096, V in {128256, 151936}, bf16, modes forward
and full: ms (median, p20, p80), TFLOP/s of the useful work (2·N·H·V forward,
6·N·H·V forward + backward; fastppo does 8·N·H·V with its recompute) and % of
the measured bf16 matmul peak, peak extra MB.

Usage: python bench/linear_logprobs.py [--no-compile] [--rep R] [--shapes NxHxV,...]
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from common import (add_ratios, bench_device, device_name, matmul_peak_tflops, op_parser, peak_extra_mb, print_table,
                    reexec_with_malloc_threshold, run_providers, save_results, time_ms)

from fastppo.kernels import linear_token_logprobs


CUDA_SHAPES = [(4096, 4096, 128256), (4096, 4096, 151936), (16384, 4096, 128256), (16384, 4096, 151936)]
CPU_SHAPES = [(8192, 512, 32000)]


KEY = ("N", "H", "V", "mode")  # a case: its rows, one per provider, are compared
# the table's leading columns, in both linear benches
TABLE = [("N", "N", 6, ""), ("H", "H", 5, ""), ("V", "V", 7, ""), ("mode", "mode", 8, ""),
         ("provider", "provider", 8, ""), ("ms", "ms", 10, ".1f"), ("TFLOP/s", "TFLOP/s", 8, ".3f"),
         ("%mm", "pct_mm_peak", 5, ""), ("peakMB", "peak_extra_MB", 9, ".1f"),
         ("t/naive", "time_vs_naive", 8, ""), ("mem/naive", "mem_vs_naive", 9, "")]


def naive(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(torch.softmax(logits, dim=-1) * logp).sum(-1)
    return lp, ent


def fastppo(hidden, weight, labels):
    return linear_token_logprobs(hidden, weight, labels, return_entropy=True)


def fastppo_fused(hidden, weight, labels):
    os.environ["FASTPPO_LINEAR_FUSED"] = "1"
    try:
        return linear_token_logprobs(hidden, weight, labels, return_entropy=True)
    finally:
        del os.environ["FASTPPO_LINEAR_FUSED"]


def make_providers(device, use_compile: bool):
    providers = {"naive": naive}
    notes = {}
    if use_compile:
        providers["compile"] = torch.compile(naive, dynamic=False)
    providers["fastppo"] = fastppo
    if device.type == "cuda":
        providers["fused"] = fastppo_fused
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            def liger(hidden, weight, labels):
                out = liger_fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
                loss = out[0] if isinstance(out, tuple) else out
                return -loss, None  # a summed loss: the upstream gradient is all ones

            providers["liger"] = liger
        except Exception as exc:  # not installed, or an API this script does not know
            notes["liger"] = f"not run: {type(exc).__name__}: {exc}"
    else:
        notes["fused"] = notes["liger"] = "not run: CUDA only"
    return providers, notes


def run_case(name, fn, shape, dtype, device, modes, rep, mm_peak):
    n, size_h, vocab = shape
    hidden = (torch.randn(n, size_h, device=device) / size_h ** 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, size_h, device=device) * 3 / size_h ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device)
    g_lp = torch.randn(n, device=device)
    g_ent = torch.randn(n, device=device)

    def forward():
        with torch.no_grad():
            fn(hidden, weight, labels)

    def full():
        lp, ent = fn(hidden, weight, labels)
        loss = lp.sum() if lp.dim() == 0 else (lp * g_lp).sum()
        if ent is not None:
            loss = loss + (ent * g_ent).sum()
        loss.backward()
        # Freed here, not at the start of the next call: the peak then counts the
        # gradients a call makes, and the starting point holds none from the last one.
        hidden.grad = weight.grad = None

    return measure_modes("linear_token_logprobs", name, {"forward": forward, "full": full},
                         {"forward": 2 * n * size_h * vocab, "full": 6 * n * size_h * vocab},
                         shape, dtype, device, modes, rep, mm_peak)


def run_linear(argv, doc, make_providers, run_case):
    """The linear benches (this one and bench/linear_ppo_loss.py): parse the options, run every provider at
    every shape, add the ratios to naive; (rows, device, notes).

    make_providers(device, use_compile) -> (providers, notes);
    run_case(name, fn, shape, dtype, device, modes, rep, mm_peak) -> rows.
    """
    args = op_parser(doc, "NxHxV").parse_args(argv)

    device = bench_device()
    if device.type == "cuda":
        shapes, dtype, modes, rep = CUDA_SHAPES, torch.bfloat16, ("forward", "full"), args.rep or 10
        mm_peak = matmul_peak_tflops(device, dtype)
    else:
        shapes, dtype, modes, rep, mm_peak = CPU_SHAPES, torch.float32, ("full",), args.rep or 3, None
    providers, notes = make_providers(device, use_compile=not args.no_compile)
    print(f"device: {device_name(device)}  dtype: {dtype}  threads: {torch.get_num_threads()}  bf16 matmul peak: "
          f"{f'{mm_peak:.0f} TFLOP/s' if mm_peak else 'n/a (CPU)'}", flush=True)
    rows = run_providers(args.shapes or shapes, providers,
                         lambda name, fn, shape: run_case(name, fn, shape, dtype, device, modes, rep, mm_peak),
                         device, dims="NxHxV", notes=notes)
    add_ratios(rows, "naive", KEY, {"time_vs_naive": "ms", "mem_vs_naive": "peak_extra_MB"})
    return rows, device, notes


def report_linear(name, rows, device, notes, *, extra_columns=(), title):
    """The table, the notes, and (when there are rows) the CSV and the peak-memory plot."""
    print_table(rows, TABLE + list(extra_columns))
    for provider, note in notes.items():
        print(f"note: {provider}: {note}")
    if rows:
        save_results(name, rows, x="shape", y="peak_extra_MB", group="provider",
                     title=f"{title} ({device_name(device)})", ylabel="peak extra MB",
                     plot_rows=[dict(r, shape=f"N={r['N']} H={r['H']} V={r['V']} {r['mode']}") for r in rows])


def measure_modes(op, name, calls, flop, shape, dtype, device, modes, rep, mm_peak):
    """Rows of one provider at one shape: peak extra MB, ms and TFLOP/s of each mode (calls and flop by mode)."""
    n, size_h, vocab = shape
    rows = []
    for mode in modes:
        peak = peak_extra_mb(calls[mode], device)          # includes one warm-up call
        ms, p20, p80 = time_ms(calls[mode], device, warmup=0 if device.type == "cpu" else 3, rep=rep)
        tflops = flop[mode] / (ms * 1e-3) / 1e12
        rows.append({"op": op, "provider": name, "mode": mode, "N": n, "H": size_h, "V": vocab,
                     "dtype": str(dtype).removeprefix("torch."), "ms": round(ms, 3), "p20": round(p20, 3),
                     "p80": round(p80, 3), "TFLOP/s": round(tflops, 3),
                     "pct_mm_peak": round(100 * tflops / mm_peak, 1) if mm_peak else None,
                     "peak_extra_MB": round(peak, 1)})
        print(f"  {name:>8} {mode:>8} N={n} V={vocab}: {ms:10.1f} ms  {peak:9.1f} MB", flush=True)
    return rows


def main(argv=None):
    rows, device, notes = run_linear(argv, __doc__, make_providers, run_case)
    report_linear("linear_logprobs", rows, device, notes, title="lm_head + logprobs peak extra memory")
    return rows


if __name__ == "__main__":
    reexec_with_malloc_threshold()
    main()
