"""Benchmark a backbone forward (and backward) on a batch of rollouts: padded against packed.

Providers, side by side in one run:
  padded    the (B, P+R) batch as generated: prompts left-padded, responses right-padded
  rows      fastppo's packing for sdpa/eager: sequences binned into rows as wide as the longest one
  one_row   every sequence in one row (flash-attn's layout), here through sdpa's dense block-diagonal mask

A Llama of --hidden / --layers (random weights, sdpa), B sequences with prompts of 4..P and responses of
1..R tokens (uniform, seeded). Modes: forward (no grad, the score phase) and full (forward + backward of the
target states, the update). Reported: median ms (p20, p80), the speedup over padded in the same run, and the
tokens each layout computes. On CPU only the ratios mean something.

Usage: python bench/packed_forward.py [--quick] [--hidden H] [--layers N] [--threads N (CPU)] [--rep R]
       [--shapes B,...]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import add_ratios, add_shapes_argument, bench_device, device_name, print_table, save_results, time_ms

from fastppo.models import backbone_states
from fastppo.packing import Packing, response_targets

PROMPT, RESPONSE = 16, 48


def rollout_batch(B: int, device: torch.device, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(B)
    prompt = torch.randint(4, PROMPT + 1, (B, 1), generator=g)
    response = torch.randint(1, RESPONSE + 1, (B, 1), generator=g)
    col = torch.arange(PROMPT + RESPONSE)
    mask = ((col >= PROMPT - prompt) & (col < PROMPT + response)).long()
    ids = torch.randint(3, vocab, mask.shape, generator=g) * mask
    return ids.to(device), mask.to(device), mask[:, PROMPT:].bool().to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smallest shape only")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--rep", type=int, default=10, help="timed repetitions")
    add_shapes_argument(parser, "B")
    args = parser.parse_args(argv)
    device = bench_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or [(8,), (32,), (128,)]
    shapes = shapes[:1] if args.quick else shapes
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      max_position_embeddings=PROMPT + RESPONSE, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device, dtype)
    rows = []
    for (B,) in shapes:
        ids, mask, rmask = rollout_batch(B, device, cfg.vocab_size)
        targets = response_targets(rmask, PROMPT)
        layouts = {"padded": Packing.padded_batch(mask, targets), "rows": Packing.build(mask, targets, device),
                   "one_row": Packing.build(mask, targets, device, one_row=True)}
        for name, pack in layouts.items():
            computed = pack.position_ids.numel()

            def forward(pack=pack):
                with torch.no_grad():
                    backbone_states(model, ids, mask, pack)

            def full(pack=pack):
                model.zero_grad(set_to_none=True)
                backbone_states(model, ids, mask, pack).float().pow(2).mean().backward()

            for mode, fn in (("forward", forward), ("full", full)):
                med, p20, p80 = time_ms(fn, device, rep=args.rep)
                rows.append(dict(op="packed_forward", provider=name, mode=mode, B=B, tokens=int(mask.sum()),
                                 computed=computed, ms=med, p20=p20, p80=p80, hidden=args.hidden,
                                 layers=args.layers, dtype=str(dtype).removeprefix("torch.")))
    for r in rows:
        r["device"] = device_name(device)
    add_ratios(rows, "padded", ("B", "mode"), {"speedup": "ms"}, inverse=True)
    print_table(rows, [("B", "B", 5, "d"), ("mode", "mode", 8, "s"), ("provider", "provider", 8, "s"),
                       ("tokens", "tokens", 7, "d"), ("computed", "computed", 9, "d"), ("ms", "ms", 9, ".2f"),
                       ("p20", "p20", 9, ".2f"), ("p80", "p80", 9, ".2f"), ("speedup", "speedup", 8, ".2f")])
    save_results("packed_forward", rows, x="B", y="speedup", group="provider", ylabel="speedup over padded",
                 title="backbone forward+backward: packed layouts over padded",
                 plot_rows=[r for r in rows if r["mode"] == "full"])
    return rows


if __name__ == "__main__":
    main()
