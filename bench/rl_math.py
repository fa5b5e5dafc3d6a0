"""Benchmark the RL math on (B, T): kl_penalty, gae and ppo_loss, fastppo vs what trainers write.

Providers, side by side in one run:
  eager     the composite PyTorch a trainer writes (kl_penalty, ppo_loss)
  loop      GAE as a Python loop over reversed(range(T)) with the mask applied at
            every step (verl-style; handles left padding and holes like fastppo)
  trl_loop  GAE as TRL's unmasked loop (fewer ops per step; right padding only)
  compile   torch.compile of eager (on CUDA by default; --compile on CPU)
  fastppo   fastppo.kernels (one Triton launch per op on CUDA, the vectorised
            torch twins on CPU)
Modes: forward, and for the differentiable ops full (forward + backward).
"forward" of ppo_loss records the autograd graph, as in training; kl_penalty's
forward runs under no_grad, as in reward shaping.

Shapes: B in {64, 512}, T in {512, 2048}, float32 inputs, masks with random
right padding (and, for GAE, also random holes). Reported: median ms (p20,
p80), the speedup of fastppo over the baseline (eager, or loop for GAE)
measured in the same run, GB/s of the minimum traffic and peak extra MB. On a
GPU the GB/s column is the kernels' bandwidth; on a CPU only the ratios mean
something.

Host and device apart: host_us is the wall time of issuing one call (calls
back to back, one synchronisation after them: on a GPU the Python wrappers'
and launches' cost, on a CPU the whole call), gpu_us the device time of one
call replayed from a CUDA graph (no host work at all; CUDA only, empty where a
provider cannot be captured). A small shape such as --shapes 1x8 shows the
wrappers' own cost.

Usage: python bench/rl_math.py [--quick] [--compile | --no-compile] [--threads N (CPU; default 1)] [--rep R]
       [--shapes BxT,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import (add_ratios, add_shapes_argument, bench_device, device_name, measured_copy_bandwidth_gbs,
                    peak_extra_mb, print_table, save_results, time_ms)

from fastppo.kernels import gae, kl_penalty, ppo_loss

KL_ESTIMATOR, KL_CLAMP = "k3", 10.0
GAMMA, LAM = 1.0, 0.95
CLIP, VALUE_CLIP = 0.2, 0.2


# ----------------------------------------------------------------------------
# What trainers write
# ----------------------------------------------------------------------------

def kl_eager(lp, ref):
    log_ratio = ref.float() - lp.float()
    kl = torch.exp(log_ratio) - log_ratio - 1
    return torch.clamp(kl, -KL_CLAMP, KL_CLAMP)


def gae_loop(rewards, values, mask):
    """Masked loop: invalid steps carry the next value and advantage through (verl-style)."""
    m = mask.float()
    n_rows, n_cols = rewards.shape
    next_value = torch.zeros(n_rows, device=rewards.device)
    last = torch.zeros(n_rows, device=rewards.device)
    steps = [None] * n_cols
    for t in reversed(range(n_cols)):
        delta = rewards[:, t] + GAMMA * next_value - values[:, t]
        adv_t = delta + GAMMA * LAM * last
        next_value = m[:, t] * values[:, t] + (1 - m[:, t]) * next_value
        last = m[:, t] * adv_t + (1 - m[:, t]) * last
        steps[t] = last
    adv = torch.stack(steps, dim=1) * m
    return adv, (adv + values) * m


def gae_trl_loop(rewards, values, mask):
    """Unmasked loop (TRL-style): right padding only, padding must hold zeros."""
    n_cols = rewards.shape[1]
    last = 0.0
    steps = []
    for t in reversed(range(n_cols)):
        next_values = values[:, t + 1] if t < n_cols - 1 else 0.0
        delta = rewards[:, t] + GAMMA * next_values - values[:, t]
        last = delta + GAMMA * LAM * last
        steps.append(last)
    adv = torch.stack(steps[::-1], dim=1)
    return adv, adv + values


def ppo_eager(lp, old_lp, adv, values, old_values, returns, mask):
    m = mask.float()
    n = m.sum().clamp(min=1)
    log_ratio = lp - old_lp
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
    pg_loss = (torch.max(pg1, pg2) * m).sum() / n
    v_clipped = old_values + torch.clamp(values - old_values, -VALUE_CLIP, VALUE_CLIP)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * (torch.max(vf1, vf2) * m).sum() / n
    with torch.no_grad():
        clipfrac = ((pg2 > pg1).float() * m).sum() / n
        vf_clipfrac = ((vf2 > vf1).float() * m).sum() / n
        approx_kl = (((ratio - 1) - log_ratio) * m).sum() / n
        ratio_mean = (ratio * m).sum() / n
    return pg_loss + vf_loss, pg_loss, vf_loss, clipfrac, vf_clipfrac, approx_kl, ratio_mean


def gae_fastppo(rewards, values, mask):
    return gae(rewards, values, mask, gamma=GAMMA, lam=LAM)


def kl_fastppo(lp, ref):
    return kl_penalty(lp, ref, estimator=KL_ESTIMATOR, clamp=KL_CLAMP)


def ppo_fastppo(*args):
    return ppo_loss(*args, clip_eps=CLIP, value_clip=VALUE_CLIP)


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------

def right_padded_mask(n_rows, n_cols, device):
    lengths = torch.randint(n_cols // 4, n_cols + 1, (n_rows, 1), device=device)
    return torch.arange(n_cols, device=device) < lengths


def holes_mask(n_rows, n_cols, device):
    return torch.rand(n_rows, n_cols, device=device) < 0.8


def bench_kl(providers, n_rows, n_cols, device):
    lp = -torch.rand(n_rows, n_cols, device=device) * 3
    ref = lp + torch.randn(n_rows, n_cols, device=device) * 0.3
    grad = torch.randn(n_rows, n_cols, device=device)
    for name, fn in providers.items():
        x = lp.clone().requires_grad_()

        def forward(fn=fn):
            with torch.no_grad():
                fn(lp, ref)

        def full(fn=fn, x=x):
            x.grad = None
            (fn(x, ref) * grad).sum().backward()

        # read 2 inputs, write the fp32 estimate; backward: read 2 + grad, write dlogprobs
        yield name, "forward", forward, 12, "right"
        yield name, "full", full, 12 + 16, "right"


def bench_gae(providers, n_rows, n_cols, device):
    rewards = torch.randn(n_rows, n_cols, device=device)
    values = torch.randn(n_rows, n_cols, device=device)
    for pattern, make in (("right", right_padded_mask), ("holes", holes_mask)):
        mask = make(n_rows, n_cols, device)
        r, v = rewards * mask, values * mask      # zeros in the padding, which the TRL loop needs
        for name, fn in providers.items():
            if name == "trl_loop" and pattern != "right":
                continue

            def forward(fn=fn, r=r, v=v, mask=mask):
                with torch.no_grad():
                    fn(r, v, mask)

            # read rewards, values (4 B each) and the mask (1 B); write advantages and returns
            yield name, "forward", forward, 17, pattern


def bench_ppo(providers, n_rows, n_cols, device):
    shape = (n_rows, n_cols)
    old_lp = -torch.rand(shape, device=device) * 3
    lp = (old_lp + torch.randn(shape, device=device) * 0.3).requires_grad_()
    adv = torch.randn(shape, device=device)
    old_v = torch.randn(shape, device=device)
    v = (old_v + torch.randn(shape, device=device) * 0.3).requires_grad_()
    ret = old_v + torch.randn(shape, device=device)
    mask = right_padded_mask(n_rows, n_cols, device)
    args = (lp, old_lp, adv, v, old_v, ret, mask)
    for name, fn in providers.items():
        def forward(fn=fn):
            fn(*args)

        def full(fn=fn):
            lp.grad = v.grad = None
            fn(*args)[0].backward()

        # read 6 fp32 inputs + the mask; backward reads them again and writes 2 gradients
        yield name, "forward", forward, 25, "right"
        yield name, "full", full, 25 + 25 + 8, "right"


def host_us(call, device, n: int = 20, batches: int = 5) -> float:
    """Wall µs per call of `n` calls issued back to back (one synchronisation after them, on CUDA): the
    median over `batches` batches."""
    call()
    per_call = []
    for _ in range(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        per_call.append((time.perf_counter() - t0) / n * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return statistics.median(per_call)


def graph_us(call, device, n: int = 20) -> float | None:
    """Device µs per call replayed from a CUDA graph of one call; None off CUDA or where capture fails."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):              # warm-up off the default stream, as capture requires
            for _ in range(3):
                call()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / n * 1e3
    except Exception as exc:  # noqa: BLE001 - host syncs, CPU scalars: reported as not capturable
        print(f"    (no CUDA graph: {type(exc).__name__}: {str(exc)[:80]})", file=sys.stderr)
        return None


def make_providers(device, use_compile):
    def with_compile(eager):
        out = {"eager": eager}
        if use_compile:
            out["compile"] = torch.compile(eager, dynamic=False)
        return out

    return {
        "kl_penalty": (bench_kl, {**with_compile(kl_eager), "fastppo": kl_fastppo}, "eager"),
        "gae": (bench_gae, {"loop": gae_loop, "trl_loop": gae_trl_loop, "fastppo": gae_fastppo}, "loop"),
        "ppo_loss": (bench_ppo, {**with_compile(ppo_eager), "fastppo": ppo_fastppo}, "eager"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smallest shape only")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile", dest="compile", action="store_true", default=None,
                       help="add the torch.compile provider (default on CUDA only)")
    group.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: these ops are small, and on a shared machine several "
                             "threads make the timings, hence the ratios, erratic)")
    parser.add_argument("--rep", type=int, default=None,
                        help="timed repetitions (default 15; 5 for the Python loops on CPU)")
    add_shapes_argument(parser, "BxT")
    args = parser.parse_args(argv)

    device = bench_device()
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    bandwidth = measured_copy_bandwidth_gbs(device) if device.type == "cuda" else None
    shapes = args.shapes or [(64, 512), (64, 2048), (512, 512), (512, 2048)]
    if args.quick:
        shapes = shapes[:1]
    ops = make_providers(device, use_compile)
    print(f"device: {device_name(device)}  threads: {torch.get_num_threads()}  copy bandwidth: "
          f"{f'{bandwidth:.0f} GB/s' if bandwidth else 'n/a (CPU)'}", flush=True)

    rows = []
    for op, (cases, providers, _baseline) in ops.items():
        for n_rows, n_cols in shapes:
            for name, mode, call, bytes_per_token, mask in cases(providers, n_rows, n_cols, device):
                slow = device.type == "cpu" and "loop" in name
                try:
                    ms, p20, p80 = time_ms(call, device, warmup=1 if slow else 3, rep=args.rep or (5 if slow else 15))
                    peak = peak_extra_mb(call, device)
                    host = host_us(call, device, n=1 if slow else 20, batches=3 if slow else 5)
                    gpu = graph_us(call, device)
                except Exception as exc:  # a provider that fails here is reported, not fatal
                    print(f"  {op}/{name} failed at B={n_rows} T={n_cols}: {type(exc).__name__}: {exc}",
                          file=sys.stderr)
                    continue
                gbs = bytes_per_token * n_rows * n_cols / (ms * 1e-3) / 1e9
                rows.append({"op": op, "provider": name, "mode": mode, "mask": mask, "B": n_rows, "T": n_cols,
                             "dtype": "float32", "ms": round(ms, 4), "p20": round(p20, 4), "p80": round(p80, 4),
                             "GB/s": round(gbs, 2),
                             "pct_copy_bw": round(100 * gbs / bandwidth, 1) if bandwidth else None,
                             "peak_extra_MB": round(peak, 1), "host_us": round(host, 1),
                             "gpu_us": round(gpu, 1) if gpu is not None else None, "device": device_name(device),
                             "threads": torch.get_num_threads() if device.type == "cpu" else None})
                print(f"  {op:>10} {mode:>7} {mask:>5} B={n_rows:<4} T={n_cols:<5} {name:>8} {ms:10.3f} ms",
                      flush=True)

    for op, (_, _, baseline) in ops.items():
        add_ratios([r for r in rows if r["op"] == op], baseline, ("mode", "mask", "B", "T"),
                   {"speedup_vs_baseline": "ms"}, digits=2, inverse=True)
    print_table(rows, [("op", "op", 10, ""), ("mode", "mode", 7, ""), ("mask", "mask", 5, ""), ("B", "B", 4, ""),
                       ("T", "T", 5, ""), ("provider", "provider", 8, ""), ("ms", "ms", 10, ".3f"),
                       ("p20", "p20", 9, ".3f"), ("p80", "p80", 9, ".3f"), ("GB/s", "GB/s", 7, ".2f"),
                       ("peakMB", "peak_extra_MB", 7, ".1f"), ("host_us", "host_us", 9, ".1f"),
                       ("gpu_us", "gpu_us", 8, ""), ("speedup", "speedup_vs_baseline", 8, "")])
    fused = [dict(r, case=f"{r['op']} {r['mode']}" + (" (holes)" if r["mask"] == "holes" else ""),
                  shape=f"B={r['B']} T={r['T']}") for r in rows if r["provider"] == "fastppo"]
    save_results("rl_math", rows, x="case", y="speedup_vs_baseline", group="shape", plot_rows=fused,
                 title=f"fastppo speedup over eager / the GAE loop ({device_name(device)})",
                 ylabel="speedup (x, same run)")
    return rows


if __name__ == "__main__":
    main()
