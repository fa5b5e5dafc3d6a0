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
  gspo      the same op with ratio_level="sequence" (GSPO: sequences of SEQ_LEN tokens, packed back to back,
            sequence_ids given; chunks cut at sequence boundaries, two row passes per chunk)
  cispo     the same op with policy_loss="cispo" (a switch of the one-pass kernel)

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

import functools

import torch
import torch.nn.functional as F

from common import add_ratios, reexec_with_malloc_threshold
from linear_logprobs import KEY, measure_modes, report_linear, run_linear

from fastppo.kernels import linear_ppo_loss, linear_token_logprobs, ppo_loss

CLIP_EPS, ENT_COEF, TEMPERATURE = 0.2, 0.01, 1.0
SEQ_LEN = 256               # gspo: tokens per sequence (shorter than a chunk: no logits computed twice)


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


def gspo(hidden, weight, labels, old, adv, mask):
    seq = torch.arange(labels.numel(), device=labels.device) // SEQ_LEN
    return linear_ppo_loss(hidden, weight, labels, old, adv, mask, temperature=TEMPERATURE, clip_eps=CLIP_EPS,
                           ent_coef=ENT_COEF, ratio_level="sequence", sequence_ids=seq).loss


def cispo(hidden, weight, labels, old, adv, mask):
    return linear_ppo_loss(hidden, weight, labels, old, adv, mask, temperature=TEMPERATURE, clip_eps=CLIP_EPS,
                           ent_coef=ENT_COEF, policy_loss="cispo").loss


def make_providers(device, use_compile: bool):
    providers = {"naive": naive}
    if use_compile:
        providers["compile"] = torch.compile(naive, dynamic=False)
    providers["composed"] = composed
    providers["fastppo"] = fastppo
    providers["gspo"] = gspo
    providers["cispo"] = cispo
    return providers, {}


@functools.lru_cache(maxsize=1)  # one shape's inputs, shared by its providers
def make_inputs(shape, dtype, device):
    n, size_h, vocab = shape
    hidden = (torch.randn(n, size_h, device=device) / size_h ** 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, size_h, device=device) * 3 / size_h ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device)
    with torch.no_grad():                       # old logprobs near the current ones: ratios around 1, some clipped
        lp = linear_token_logprobs(hidden, weight, labels, temperature=TEMPERATURE)
    old = lp + 0.2 * torch.randn(n, device=device)
    adv = torch.randn(n, device=device)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    return hidden, weight, labels, old, adv, mask


def run_case(name, fn, shape, dtype, device, modes, rep, mm_peak):
    n, size_h, vocab = shape
    inputs = make_inputs(shape, dtype, device)
    hidden, weight = inputs[0], inputs[1]

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def full():
        fn(*inputs).backward()
        # Freed here, not at the start of the next call: the peak then counts the
        # gradients a call makes, and the starting point holds none from the last one.
        hidden.grad = weight.grad = None

    try:
        return measure_modes("linear_ppo_loss", name, {"forward": forward, "full": full},
                             {"forward": 2 * n * size_h * vocab, "full": 6 * n * size_h * vocab},
                             shape, dtype, device, modes, rep, mm_peak)
    finally:  # a provider that failed mid-call leaves no gradients to the next one
        hidden.grad = weight.grad = None


def main(argv=None):
    rows, device, notes = run_linear(argv, __doc__, make_providers, run_case)
    make_inputs.cache_clear()
    add_ratios(rows, "composed", KEY, {"time_vs_composed": "ms", "mem_vs_composed": "peak_extra_MB"})
    report_linear("linear_ppo_loss", rows, device, notes,
                  extra_columns=[("t/comp", "time_vs_composed", 7, ""), ("mem/comp", "mem_vs_composed", 8, "")],
                  title="lm_head + PPO policy loss, peak extra memory")
    return rows


if __name__ == "__main__":
    reexec_with_malloc_threshold()
    main()
