"""Benchmark token_logprobs (+ entropy): fastppo vs what trainers write by hand.

Providers, side by side in one run:
  eager    log_softmax(logits.float()).gather + entropy from the softmax
  compile  torch.compile of eager
  fastppo  fastppo.kernels.token_logprobs (Triton on CUDA, chunked torch on CPU)
  liger    Liger-Kernel's fused cross-entropy (reduction="none"), CUDA only, when importable
Modes: forward, backward, full (forward + backward).

GPU: N in {4096, 16384}, V in {32000, 128256, 151936}, bf16; ms (median,
p20, p80), GB/s of the minimum traffic (2 bytes per logit forward, 4 backward
for bf16) and % of the measured copy bandwidth, peak extra MB.
CPU: a small shape set in about a minute; what it can say is the peak extra
memory of each provider relative to eager (and time ratios on this CPU).

Usage: python bench/logprobs.py [--quick] [--no-compile] [--rep R] [--shapes NxV,...]
"""

from __future__ import annotations

import os

import torch

from common import (add_ratios, bench_device, device_name, measured_copy_bandwidth_gbs, op_parser, peak_extra_mb,
                    print_table, run_providers, save_results, time_ms)

from fastppo.kernels import token_logprobs


def eager(logits, labels, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(torch.softmax(logits.float() / temperature, -1) * logp).sum(-1)
    return lp, ent


def fastppo(logits, labels, temperature=1.0):
    return token_logprobs(logits, labels, temperature=temperature, return_entropy=True)


def make_providers(device, use_compile: bool):
    providers = {"eager": eager}
    if use_compile:
        providers["compile"] = torch.compile(eager, dynamic=False)
    providers["fastppo"] = fastppo
    if device.type == "cuda":
        try:
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

            def liger(logits, labels, temperature=1.0):
                # Liger returns the loss (= -logprob) per token; no entropy.
                loss = LigerCrossEntropyFunction.apply(logits / temperature, labels, None, -100, 0.0, 0.0, "none")[0]
                return -loss, None

            providers["liger"] = liger
        except Exception:
            pass
    return providers


def run_case(name, fn, shape, dtype, device, bandwidth, rep=None):
    n, vocab = shape
    logits = torch.randn(n, vocab, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device)
    g_lp = torch.randn(n, device=device)
    g_ent = torch.randn(n, device=device)

    def forward():
        with torch.no_grad():
            fn(logits, labels)

    def full():
        logits.grad = None
        lp, ent = fn(logits, labels)
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)
        loss.backward()

    lp, ent = fn(logits, labels)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if ent is not None else 0.0)

    def backward():
        logits.grad = None
        loss.backward(retain_graph=True)

    rep = rep or (10 if device.type == "cuda" else 3)
    rows = []
    elem = logits.element_size()
    min_bytes = {"forward": n * vocab * elem, "backward": 2 * n * vocab * elem, "full": 3 * n * vocab * elem}
    for mode, call in (("forward", forward), ("backward", backward), ("full", full)):
        ms, p20, p80 = time_ms(call, device, warmup=1 if device.type == "cpu" else 5, rep=rep)
        gbs = min_bytes[mode] / (ms * 1e-3) / 1e9
        rows.append({"op": "token_logprobs", "provider": name, "mode": mode, "N": n, "V": vocab,
                     "dtype": str(dtype).removeprefix("torch."), "ms": round(ms, 4), "p20": round(p20, 4),
                     "p80": round(p80, 4), "GB/s": round(gbs, 1),
                     "pct_copy_bw": round(100 * gbs / bandwidth, 1) if bandwidth else None})
    del loss, lp, ent
    peak = peak_extra_mb(full, device)
    for r in rows:
        r["peak_extra_MB"] = round(peak, 1)
    return rows


def main(argv=None):
    parser = op_parser(__doc__, "NxV")
    parser.add_argument("--quick", action="store_true", help="one shape only")
    args = parser.parse_args(argv)

    device = bench_device()
    if device.type == "cuda":
        shapes = [(4096, 32000), (4096, 128256), (4096, 151936), (16384, 32000), (16384, 128256), (16384, 151936)]
        dtype = torch.bfloat16
        bandwidth = measured_copy_bandwidth_gbs(device)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        shapes = [(512, 32000), (1024, 50257)]
        dtype = torch.float32
        bandwidth = None
    shapes = args.shapes or shapes
    if args.quick:
        shapes = shapes[:1]
    providers = make_providers(device, use_compile=not args.no_compile)
    print(f"device: {device_name(device)}  dtype: {dtype}  copy bandwidth: "
          f"{f'{bandwidth:.0f} GB/s' if bandwidth else 'n/a (CPU)'}", flush=True)

    rows = run_providers(shapes, providers,
                         lambda name, fn, shape: run_case(name, fn, shape, dtype, device, bandwidth, args.rep),
                         device, dims="NxV")
    add_ratios(rows, "eager", ("N", "V", "mode"), {"time_vs_eager": "ms", "mem_vs_eager": "peak_extra_MB"})
    print_table(rows, [("N", "N", 6, ""), ("V", "V", 7, ""), ("mode", "mode", 8, ""), ("provider", "provider", 8, ""),
                       ("ms", "ms", 9, ".3f"), ("GB/s", "GB/s", 8, ".1f"), ("%bw", "pct_copy_bw", 6, ""),
                       ("peakMB", "peak_extra_MB", 8, ".1f"), ("t/eager", "time_vs_eager", 8, ""),
                       ("mem/eager", "mem_vs_eager", 9, "")])
    save_results("logprobs", rows, x="shape", y="ms", group="provider",
                 title=f"token_logprobs forward+backward ({device_name(device)})", ylabel="ms (median)",
                 plot_rows=[dict(r, shape=f"N={r['N']} V={r['V']}") for r in rows if r["mode"] == "full"])
    return rows


if __name__ == "__main__":
    main()
