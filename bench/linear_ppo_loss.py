"""Benchmark linear_ppo_loss (lm_head + PPO policy loss + entropy bonus, gradients in one pass) against the
composed ways of computing the same loss.

Providers, side by side in one run, all computing
    loss = mean max(−A·ρ, −A·clip(ρ, 1 ± 0.2)) − 0.01·mean H,   ρ = exp(lp − old_lp),
and its gradients in hidden and weight (every token valid):
  naive     F.linear -> log_softmax(.float()) -> gather, entropy from the softmax, the PPO formulas in eager
            PyTorch: (N, V) float32 log-softmax kept for backward
  compile   torch.compile of naive (skipped, with the reason printed, when it fails here; --no-compile)
  composed  fastppo.kernels.linear_token_logprobs (chunked; logits recomputed in backward) + ppo_loss
  fastppo   fastppo.kernels.linear_ppo_loss (chunked; gradients computed in forward, no recompute)

CPU: N=8192, H=512, V=32000 float32, forward + backward: time and peak extra host memory of each provider
as ratios to naive, and fastppo against composed. The script re-executes itself with
MALLOC_MMAP_THRESHOLD_=65536 so that freed buffers leave the process and the peak RSS is repeatable
(see fastppo/memory.py).
GPU: N in {4096, 16384}, H=4096, V in {128256, 151936}, bf16 (the shapes of bench/linear_logprobs.py),
forward + backward: ms (median, p20, p80), TFLOP/s of the useful work (6·N·H·V; composed does 8·N·H·V with
its recompute) and % of the measured bf16 matmul peak, peak extra MB.

Usage: python bench/linear_ppo_loss.py [--no-compile] [--rep R] [--shapes NxHxV,...]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from common import (add_shapes_argument, append_csv, device_name, matmul_peak_tflops, peak_extra_mb,
                    plot_bars, time_ms)

from fastppo.kernels import linear_ppo_loss, linear_token_logprobs, ppo_loss

CLIP_EPS, ENT_COEF, TEMPERATURE = 0.2, 0.01, 1.0


def naive(hidden, weight, labels, old, adv, mask):
    logits = F.linear(hidden, weight).float() / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(torch.softmax(logits, dim=-1) * logp).sum(-1)
    ratio = torch.exp(lp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS))
    n = mask.sum()
    return (pg * mask).sum() / n - ENT_COEF * (ent * mask).sum() / n


def composed(hidden, weight, labels, old, adv, mask):
    lp, ent = linear_token_logprobs(hidden, weight, labels, temperature=TEMPERATURE, return_entropy=True)
    zeros = torch.zeros_like(lp)
    out = ppo_loss(lp, old, adv, zeros, zeros, zeros, mask, clip_eps=CLIP_EPS, value_clip=None, vf_coef=0.0)
    return out.policy_loss - ENT_COEF * (ent * mask).sum() / mask.sum()


def fastppo(hidden, weight, labels, old, adv, mask):
    return linear_ppo_loss(hidden, weight, labels, old, adv, mask, temperature=TEMPERATURE, clip_eps=CLIP_EPS,
                           ent_coef=ENT_COEF).loss


def make_providers(use_compile: bool):
    providers = {"naive": naive}
    if use_compile:
        providers["compile"] = torch.compile(naive, dynamic=False)
    providers["composed"] = composed
    providers["fastppo"] = fastppo
    return providers


def make_inputs(n, size_h, vocab, dtype, device):
    hidden = (torch.randn(n, size_h, device=device) / size_h ** 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, size_h, device=device) * 3 / size_h ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device)
    with torch.no_grad():                       # old logprobs near the current ones: ratios around 1, some clipped
        lp = linear_token_logprobs(hidden, weight, labels, temperature=TEMPERATURE)
    old = lp + 0.2 * torch.randn(n, device=device)
    adv = torch.randn(n, device=device)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    return hidden, weight, labels, old, adv, mask


def run_case(name, fn, inputs, n, size_h, vocab, dtype, device, modes, rep, mm_peak):
    hidden, weight = inputs[0], inputs[1]

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def full():
        fn(*inputs).backward()
        # Freed here, not at the start of the next call: the peak then counts the
        # gradients a call makes, and the starting point holds none from the last one.
        hidden.grad = weight.grad = None

    calls = {"forward": forward, "full": full}
    flop = {"forward": 2 * n * size_h * vocab, "full": 6 * n * size_h * vocab}
    rows = []
    for mode in modes:
        peak = peak_extra_mb(calls[mode], device)          # includes one warm-up call
        ms, p20, p80 = time_ms(calls[mode], device, warmup=0 if device.type == "cpu" else 3, rep=rep)
        tflops = flop[mode] / (ms * 1e-3) / 1e12
        rows.append({"op": "linear_ppo_loss", "provider": name, "mode": mode, "N": n, "H": size_h, "V": vocab,
                     "dtype": str(dtype).removeprefix("torch."), "ms": round(ms, 3), "p20": round(p20, 3),
                     "p80": round(p80, 3), "TFLOP/s": round(tflops, 3),
                     "pct_mm_peak": round(100 * tflops / mm_peak, 1) if mm_peak else None,
                     "peak_extra_MB": round(peak, 1)})
        print(f"  {name:>8} {mode:>8} N={n} V={vocab}: {ms:10.1f} ms  {peak:9.1f} MB", flush=True)
    return rows


def _ratio(a, b):
    return round(a / b, 3) if b and b > 0 else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--rep", type=int, default=None, help="timed repetitions (default 3 on CPU, 10 on GPU)")
    add_shapes_argument(parser, "NxHxV")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        shapes = [(4096, 4096, 128256), (4096, 4096, 151936), (16384, 4096, 128256), (16384, 4096, 151936)]
        dtype, modes, rep = torch.bfloat16, ("forward", "full"), args.rep or 10
        mm_peak = matmul_peak_tflops(device, dtype)
    else:
        shapes = [(8192, 512, 32000)]
        dtype, modes, rep = torch.float32, ("full",), args.rep or 3
        mm_peak = None
    shapes = args.shapes or shapes
    providers = make_providers(use_compile=not args.no_compile)
    notes = {}
    print(f"device: {device_name(device)}  dtype: {dtype}  threads: {torch.get_num_threads()}  bf16 matmul peak: "
          f"{f'{mm_peak:.0f} TFLOP/s' if mm_peak else 'n/a (CPU)'}", flush=True)

    rows = []
    for n, size_h, vocab in shapes:
        inputs = make_inputs(n, size_h, vocab, dtype, device)
        for name, fn in list(providers.items()):
            try:
                rows += run_case(name, fn, inputs, n, size_h, vocab, dtype, device, modes, rep, mm_peak)
            except Exception as exc:  # a provider that fails here is reported, not fatal
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"  {name} failed at N={n} H={size_h} V={vocab}: {msg}", file=sys.stderr, flush=True)
                notes[name] = f"failed: {msg}"
                providers.pop(name)
            inputs[0].grad = inputs[1].grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del inputs
    for r in rows:
        r["device"] = device_name(device)

    print(f"\n{'N':>6} {'H':>5} {'V':>7} {'mode':>8} {'provider':>8} {'ms':>10} {'TFLOP/s':>8} {'%mm':>5} "
          f"{'peakMB':>9} {'t/naive':>8} {'mem/naive':>9} {'t/comp':>7} {'mem/comp':>8}")
    key = lambda r: (r["N"], r["H"], r["V"], r["mode"])  # noqa: E731
    base = {key(r): r for r in rows if r["provider"] == "naive"}
    comp = {key(r): r for r in rows if r["provider"] == "composed"}
    for r in rows:
        b, c = base.get(key(r)), comp.get(key(r))
        r["time_vs_naive"] = _ratio(r["ms"], b["ms"]) if b else None
        r["mem_vs_naive"] = _ratio(r["peak_extra_MB"], b["peak_extra_MB"]) if b else None
        r["time_vs_composed"] = _ratio(r["ms"], c["ms"]) if c else None
        r["mem_vs_composed"] = _ratio(r["peak_extra_MB"], c["peak_extra_MB"]) if c else None
        cell = lambda v, w: f"{v if v is not None else '-':>{w}}"  # noqa: E731
        print(f"{r['N']:>6} {r['H']:>5} {r['V']:>7} {r['mode']:>8} {r['provider']:>8} {r['ms']:>10.1f} "
              f"{r['TFLOP/s']:>8.3f} {cell(r['pct_mm_peak'], 5)} {r['peak_extra_MB']:>9.1f} "
              f"{cell(r['time_vs_naive'], 8)} {cell(r['mem_vs_naive'], 9)} {cell(r['time_vs_composed'], 7)} "
              f"{cell(r['mem_vs_composed'], 8)}")
    for name, note in notes.items():
        print(f"note: {name}: {note}")
    if not rows:
        return rows
    path = append_csv("linear_ppo_loss", rows)
    plot_rows = [dict(r, shape=f"N={r['N']} H={r['H']} V={r['V']} {r['mode']}") for r in rows]
    png = plot_bars("linear_ppo_loss", plot_rows, x="shape", y="peak_extra_MB", group="provider",
                    title=f"lm_head + PPO policy loss, peak extra memory ({device_name(device)})",
                    ylabel="peak extra MB")
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return rows


if __name__ == "__main__":
    # Host peak memory is only repeatable when freed buffers go back to the OS:
    # glibc reads this at start-up, so re-execute once with it set.
    if not torch.cuda.is_available() and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    main()
