"""Benchmark one decode step's sampling: the fused sampler against the logits-processor paths it replaces.

Providers, side by side in one run, on float32 (B, V) logits (generation's sampler sees float32 logits):
  processor  the previous CounterSampler: temperature, top-k (torch.topk), top-p (a full sort, two softmaxes,
             a cumsum and a scatter), counter-based Gumbel noise (~20 elementwise passes), HF's argmax
  hf         HF's own warpers (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) + softmax +
             torch.multinomial
  fastppo    fastppo.kernels.sample: token, its logprob and the entropy (Triton on CUDA, torch twin on CPU)
  fastppo+hf what a decode step costs in generation: CounterSampler (sample, then the scores set to -inf
             but at the drawn token) + HF's argmax

B in {16, 64, 256}, V in {32000, 151936}, top_p in {1.0, 0.9} (temperature 0.8, top_k 0): ms per step
(median, p20, p80), peak extra memory per step, and on a GPU GB/s of the minimum traffic (one read of the
logits, 4 bytes each) and its % of the measured copy bandwidth. Ratios to `processor`.

Usage: python bench/sampler.py [--quick] [--rep R] [--shapes BxV,...]
"""

from __future__ import annotations

import os

import torch

from common import (add_ratios, bench_device, device_name, measured_copy_bandwidth_gbs, op_parser, peak_extra_mb,
                    print_table, reexec_with_malloc_threshold, run_providers, save_results, time_ms)

from fastppo.config import RolloutConfig
from fastppo.kernels import gumbel_noise, sample
from fastppo.rollout import CounterSampler

TEMPERATURE, TOP_K, SEED, STEP = 0.8, 0, 1234, 5


def processor(logits, ids, top_p):
    """The logits processor this repository used before the fused op, and HF's greedy argmax after it."""
    scores = logits.float() / TEMPERATURE
    V = scores.size(-1)
    if 0 < TOP_K < V:
        kth = torch.topk(scores, TOP_K, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        mass_before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return (scores + gumbel_noise(SEED, ids, STEP, V)).argmax(-1)


def hf(logits, ids, top_p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(TEMPERATURE)(None, logits)
    if TOP_K:
        scores = TopKLogitsWarper(TOP_K)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.multinomial(scores.softmax(-1), 1).squeeze(-1)


def fastppo(logits, ids, top_p):
    return sample(logits, seed=SEED, sample_ids=ids, step=STEP, temperature=TEMPERATURE, top_k=TOP_K, top_p=top_p)


def fastppo_in_generation(logits, ids, top_p):
    # The processor overwrites its scores: HF hands it a fresh float32 copy each step, which the clone stands
    # for (every path pays that copy in generation; only this provider counts it here).
    sampler = CounterSampler(RolloutConfig(temperature=TEMPERATURE, top_k=TOP_K, top_p=top_p), seed=SEED,
                             sample_ids=ids, prompt_width=0)
    steps = torch.zeros(logits.size(0), STEP, dtype=torch.long, device=logits.device)
    return sampler(steps, logits.clone()).argmax(-1)


PROVIDERS = {"processor": processor, "hf": hf, "fastppo": fastppo, "fastppo+hf": fastppo_in_generation}


def run_case(name, fn, shape, device, bandwidth, rep):
    B, V, top_p = shape
    logits = torch.randn(B, V, device=device) * 3
    ids = torch.arange(B, device=device)
    call = lambda: fn(logits, ids, top_p)  # noqa: E731
    ms, p20, p80 = time_ms(call, device, warmup=1 if device.type == "cpu" else 5, rep=rep)
    gbs = B * V * logits.element_size() / (ms * 1e-3) / 1e9
    return [{"op": "sample", "mode": f"top_p={top_p}", "provider": name, "B": B, "V": V, "top_p": top_p,
             "ms": round(ms, 3),
             "p20": round(p20, 3), "p80": round(p80, 3), "GB/s": round(gbs, 1),
             "pct_copy_bw": round(100 * gbs / bandwidth, 1) if bandwidth else None,
             "peak_extra_MB": round(peak_extra_mb(call, device), 1)}]


def main(argv=None):
    parser = op_parser(__doc__, "BxV")
    parser.add_argument("--quick", action="store_true", help="B=16 and 64 at V=32000, and B=64 at V=151936")
    args = parser.parse_args(argv)

    device = bench_device()
    shapes = args.shapes or [(b, v) for v in (32000, 151936) for b in (16, 64, 256)]
    if args.quick:
        shapes = [(16, 32000), (64, 32000), (64, 151936)]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    bandwidth = measured_copy_bandwidth_gbs(device) if device.type == "cuda" else None
    rep = args.rep or (10 if device.type == "cuda" else 3)
    print(f"device: {device_name(device)}  copy bandwidth: "
          f"{f'{bandwidth:.0f} GB/s' if bandwidth else 'n/a (CPU)'}", flush=True)

    cases = [(b, v, p) for b, v in shapes for p in (1.0, 0.9)]
    rows = run_providers(cases, dict(PROVIDERS), lambda name, fn, shape: run_case(name, fn, shape, device,
                                                                                  bandwidth, rep),
                         device, dims="BxVxtop_p")
    add_ratios(rows, "processor", ("B", "V", "top_p"), {"time_vs_processor": "ms",
                                                         "mem_vs_processor": "peak_extra_MB"})
    print_table(rows, [("B", "B", 4, ""), ("V", "V", 7, ""), ("top_p", "top_p", 5, ""),
                       ("provider", "provider", 10, ""), ("ms", "ms", 9, ".3f"), ("GB/s", "GB/s", 8, ".1f"),
                       ("%bw", "pct_copy_bw", 6, ""), ("peakMB", "peak_extra_MB", 8, ".1f"),
                       ("t/proc", "time_vs_processor", 7, ""), ("mem/proc", "mem_vs_processor", 8, "")])
    save_results("sampler", rows, x="shape", y="ms", group="provider",
                 title=f"one decode step's sampling ({device_name(device)})", ylabel="ms (median)",
                 plot_rows=[dict(r, shape=f"B={r['B']} V={r['V']} p={r['top_p']}") for r in rows])
    return rows


if __name__ == "__main__":
    reexec_with_malloc_threshold()                       # CPU: repeatable peak host memory
    main()
