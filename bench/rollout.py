"""Benchmark the rollout engines on one long-tailed workload: hf, hf + rollout.compile, static (+ its CUDA graph).

Every engine gets the same prompts, seed and sample ids, and every response is forced to the same length
(EOS exactly at a seeded, long-tailed step, the same in every engine: HF through a logits processor, static
through its logits hook), so all engines generate the same tokens and differ only in schedule:

- prompts: B in {64, 256} prompts x G in {1, 8} samples each, prompt lengths uniform in [64, 256] tokens;
- response lengths: log-normal per response, median cap / 4, log-space std 1, clamped to [1, cap] (cap 1024 on
  GPU, 48 on CPU): about 1 response in 12 reaches the cap;
- generation_batch_size (HF's rows per generate call, static's slots): --slots (default 16 on CPU, 256 on GPU);
- temperature 0.8, top_p 0.9 (the ppo_max default).

Model: a Qwen2-1.5B-shaped policy with random weights in bfloat16 on GPU; on CPU the tiny Llama of
bench/trainer.py (hidden 256, 4 layers, vocabulary 32000) in float32, with B in {8, 32} on CPU (--quick: 8;
--batches picks others).

Reported per engine and shape: generated tokens/s (EOS included; each engine first warms up on a small batch),
seconds (median of --repeat runs, the engines interleaved), decode steps, peak memory (CUDA: max allocated above
the model; CPU: peak RSS above the start of the run), ratio of tokens/s to hf, and on GPU the fraction of the
decode roofline: per decode step max((weight bytes + bytes of the live KV cache) / measured copy bandwidth,
FLOPs / measured bf16 matmul rate), summed over the steps and divided by the measured time (every step counted at min(slots, rows) rows: for eager
static, whose tail steps run fewer rows, an upper bound). Rows go to bench/results/rollout.csv.

    python bench/rollout.py [--quick] [--engines hf hf+compile static static+graph] [--slots N] [--threads N]
                            [--repeat 3] [--batches B ...] [--groups G ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from common import (append_csv, device_name, matmul_peak_tflops, measured_copy_bandwidth_gbs, print_table,
                    reexec_with_malloc_threshold)
from forced_lengths import force_lengths

from fastppo.config import RolloutConfig
from fastppo.data import PromptBatch
from fastppo.memory import peak_host_extra_bytes
from fastppo.rollout import generate
from fastppo.static_engine import generate_static

SEED, TEMPERATURE, TOP_P, SIGMA = 0, 0.8, 0.9, 1.0
ENGINES = ["hf", "hf+compile", "static", "static+graph"]
"""hf+compile: rollout.compile with hf; static+graph: rollout.compile with static (its decode step as a CUDA graph)."""
EOS, PAD, BOS = 2, 0, 1


def build_policy(device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if device.type == "cuda":   # Qwen2-1.5B's shape
        cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        dtype = torch.bfloat16
    else:                        # bench/trainer.py's
        cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        dtype = torch.float32
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def workload(n_prompts: int, G: int, lo: int, hi: int, cap: int, vocab: int) -> tuple[PromptBatch, torch.Tensor]:
    """Left-padded prompts (n_prompts x G rows, each prompt repeated G times) and each row's response length (drawn
    per row: the G samples of a prompt end at different steps, as sampled responses do)."""
    g = torch.Generator().manual_seed(SEED)
    lens = torch.randint(lo, hi + 1, (n_prompts,), generator=g)
    P = int(lens.max())
    ids = torch.full((n_prompts, P), PAD)
    mask = torch.zeros(n_prompts, P, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        ids[i, P - n:] = torch.randint(3, vocab, (n,), generator=g)
        ids[i, P - n] = BOS
        mask[i, P - n:] = 1
    z = torch.randn(n_prompts * G, generator=g, dtype=torch.float64)
    lengths = (math.log(cap / 4) + SIGMA * z).exp().ceil().clamp(1, cap).long()
    return PromptBatch(ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)), lengths


class ForcedHF:
    """`force_lengths` as an HF logits processor: each generate call's rows are found once, at its first step (the rows
    come in order, generation_batch_size at a time)."""

    def __init__(self, lengths: torch.Tensor, prompt_width: int) -> None:
        self.lengths, self.P, self.next_row, self.target = lengths, prompt_width, 0, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.size(1) - self.P
        if step == 0:
            rows = slice(self.next_row, self.next_row + input_ids.size(0))
            self.target, self.next_row = self.lengths[rows].to(scores.device), rows.stop
        return force_lengths(scores, self.target, step, eos_id=EOS, pad_id=PAD)


def run_engine(engine: str, policy, batch: PromptBatch, lengths: torch.Tensor, cap: int, slots: int):
    from transformers import LogitsProcessorList

    rc = RolloutConfig(max_new_tokens=cap, temperature=TEMPERATURE, top_p=TOP_P,
                       compile=engine in ("hf+compile", "static+graph"))
    kw = dict(eos_id=EOS, pad_id=PAD, seed=SEED, vocab_size=policy.config.vocab_size)
    if engine.startswith("static"):
        target = torch.cat([lengths, torch.zeros(1, dtype=torch.long)]).to(next(policy.parameters()).device)
        hook = lambda s, rows, steps: force_lengths(s, target[rows], steps, eos_id=EOS, pad_id=PAD)  # noqa: E731
        return generate_static(policy, batch, rc, slots=slots, logits_hook=hook, **kw)
    forced = ForcedHF(lengths, batch.input_ids.size(1))
    base = policy.generate
    policy.generate = lambda *a, logits_processor, **k: base(*a, logits_processor=LogitsProcessorList(
        [forced, *logits_processor]), **k)
    try:
        return generate(policy, batch, rc, generation_batch_size=slots, **kw)
    finally:
        del policy.generate


def measure(engine, policy, batch, lengths, cap, slots, device):
    """(seconds, decode steps, peak extra MB, rollout) of one run."""
    steps = [0]
    handle = policy.register_forward_pre_hook(
        lambda _m, _a, kw: steps.__setitem__(0, steps[0] + (kw["input_ids"].size(1) == 1)), with_kwargs=True)
    out = {}

    def go():
        t0 = time.perf_counter()
        out["rollout"] = run_engine(engine, policy, batch, lengths, cap, slots)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["seconds"] = time.perf_counter() - t0

    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            go()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 1e6
        else:
            peak = peak_host_extra_bytes(go) / 1e6
    finally:
        handle.remove()
    return out["seconds"], steps[0], peak, out["rollout"]


def roofline_s(policy, n_steps: int, slots: int, context: float, bw_gbs: float, tflops: float) -> float:
    """Seconds of n_steps decode steps at the roofline: each reads the weights and `slots` x `context` cached
    tokens' keys and values, and does 2 FLOPs per weight per row plus attention's 4 per cached token and dim."""
    c = policy.config
    n_params = sum(p.numel() for p in policy.parameters())
    elt = next(policy.parameters()).element_size()
    head_dim = c.hidden_size // c.num_attention_heads
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * elt * slots * context
    flops = 2 * n_params * slots + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * slots * context
    return n_steps * max((n_params * elt + kv_bytes) / (bw_gbs * 1e9), flops / (tflops * 1e12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engines", nargs="+", default=None, choices=ENGINES,
                    help="default: all (static+graph on CUDA only)")
    ap.add_argument("--slots", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each engine per shape, interleaved (median)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="prompts per shape (default: 64 256 on CUDA; 8 32 on CPU, 8 with --quick)")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 8], help="samples per prompt (default: 1 8)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.engines = args.engines or [e for e in ENGINES if gpu or e != "static+graph"]
    policy = build_policy(device)
    cap = 1024 if gpu else 48
    lo, hi = 64, 256
    slots = args.slots or (256 if gpu else 16)
    Bs = args.batches or ([64, 256] if gpu else ([8] if args.quick else [8, 32]))
    bw = measured_copy_bandwidth_gbs(device) if gpu else None
    rate = matmul_peak_tflops(device, torch.bfloat16) if gpu else None
    # Warm-up of every engine on a small batch (hf+compile: the compilation).
    wb, wl = workload(4, 2, lo, hi, 8, policy.config.vocab_size)
    for engine in args.engines:
        run_engine(engine, policy, wb, wl, 8, slots)
    rows = []
    for B in Bs:
        for G in args.groups:
            batch, lengths = workload(B, G, lo, hi, cap, policy.config.vocab_size)
            ref, runs = None, {e: [] for e in args.engines}
            for _ in range(args.repeat):                  # interleaved: load on a shared machine hits all alike
                for engine in args.engines:
                    runs[engine].append(measure(engine, policy, batch, lengths, cap, slots, device))
            for engine in args.engines:
                seconds = statistics.median(r[0] for r in runs[engine])
                _, n_steps, _, ro = runs[engine][0]
                peak = max(r[2] for r in runs[engine])
                assert torch.equal(ro.lengths.cpu(), lengths), f"{engine}: the forced lengths were not generated"
                if ref is None:
                    ref = ro
                else:   # the same tokens in every engine
                    assert torch.equal(ro.sequences, ref.sequences), \
                        f"{engine} drew other tokens than {args.engines[0]}"
                tokens = int(lengths.sum())
                row = {"device": device_name(device), "engine": engine, "B": B, "G": G, "slots": slots, "cap": cap,
                       "repeats": args.repeat, "tokens": tokens, "seconds": round(seconds, 3),
                       "tokens_per_s": round(tokens / seconds, 1), "decode_steps": n_steps, "peak_mb": round(peak, 1),
                       "roofline_frac": None}
                if gpu:
                    context = float(batch.attention_mask.sum(1).float().mean()) + float(lengths.float().mean()) / 2
                    row["roofline_frac"] = round(roofline_s(policy, n_steps, min(slots, B * G), context, bw, rate)
                                                 / seconds, 3)
                rows.append(row)
    for r in rows:
        base = next(x for x in rows if x["B"] == r["B"] and x["G"] == r["G"] and x["engine"] == args.engines[0])
        r["vs_" + args.engines[0]] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
    print_table(rows, [("engine", "engine", 10, ""), ("B", "B", 4, ""), ("G", "G", 3, ""),
                       ("tok/s", "tokens_per_s", 9, ".1f"), ("s", "seconds", 8, ".2f"),
                       ("steps", "decode_steps", 6, ""), ("peak MB", "peak_mb", 9, ".1f"),
                       ("ratio", "vs_" + args.engines[0], 6, ".2f"), ("roofline", "roofline_frac", 8, "")])
    print("wrote", append_csv("rollout", rows))


if __name__ == "__main__":
    reexec_with_malloc_threshold()
    main()
