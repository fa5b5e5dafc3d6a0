"""One GRPO and one PPO-max iteration of a Qwen2-1.5B-shaped model on one GPU: fastppo against naive logits.

Workload (GPU defaults): a Qwen2-1.5B-shaped policy (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960,
vocab 151936, tied embeddings; random weights, bf16, `model.dtype=bfloat16`) and a reward model of the same
shape (the critic starts from it, PPO-max); 32 prompts of 64 tokens, 256 new tokens that never stop early (EOS
suppressed: every iteration does the same work), GRPO with 4 samples per prompt and the reward model's score,
PPO-max (GAE, critic) with 128 prompts x 1; one PPO epoch, minibatch 64 rows, micro-batches of 8192 packed
tokens. Each configuration runs `fastppo.train` in this process for --iterations (the first is a warm-up)
twice:

  fastppo  the fused lm_head ops: linear_token_logprobs for old / reference logprobs, linear_ppo_loss in the
           update (logits never stored, gradients computed with the loss)
  naive    the model's own logits (`F.linear` over every position) → log_softmax(.float()) → gather, and
           entropy from the same log-softmax (the lm_head path most trainers run), in scoring and the update

Reported per phase (rollout, score, shape + advantages, update, iteration): seconds and tokens/s (median over
the timed iterations; rollout: generated tokens, update: prompt + response tokens x epochs, the others:
prompt + response tokens), the peak memory of the run (CUDA max allocated), and the update's MFU: model FLOPs
6·N·tokens (N the matmul parameters of the policy, lm_head included, plus the critic's for PPO-max) plus causal
attention 6·L·H·T per token (T the sequence length), over the update's seconds, against the bf16 matmul peak
measured in the same run (8192³). Rows go to bench/results/gpu_iteration.csv; the naive/fastppo ratios are
printed. Not measured on a GPU yet.

    .venv/bin/python bench/gpu_iteration.py [--iterations 2] [--tiny] [--algos grpo ppo_max] [--paths fastppo naive]

--tiny: a 2-layer, hidden-64, vocab-512 model and a few short rollouts (the CPU smoke run of `make gpu-check`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import append_csv, device_name, matmul_peak_tflops

PHASES = {"rollout": ("rollout",), "score": ("score",), "shape_advantages": ("shape", "advantages"),
          "update": ("update",)}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompts: int
    prompt_len: int
    new_tokens: int
    group: int                  # GRPO samples per prompt
    minibatch: int
    micro_tokens: int


QWEN2_1_5B = Shape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936, prompts=32,
                   prompt_len=64, new_tokens=256, group=4, minibatch=64, micro_tokens=8192)
TINY = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, prompts=2, prompt_len=8,
             new_tokens=8, group=2, minibatch=4, micro_tokens=64)


# ----------------------------------------------------------------------------
# The workload
# ----------------------------------------------------------------------------

def build_workload(root: Path, s: Shape, dtype: torch.dtype) -> None:
    """A WordLevel tokenizer over s.vocab synthetic words, a random Qwen2 policy and reward model, prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              Qwen2Config)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(s.vocab - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    cfg = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=4 * (s.prompt_len + s.new_tokens), tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    for name, cls in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        c = cfg.__class__.from_dict(cfg.to_dict())
        if name == "reward":
            c.num_labels = 1
        cls.from_config(c, dtype=dtype).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    n_prompts = max(s.prompts, s.prompts * s.group)                 # PPO-max draws prompts x group prompts
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(n_prompts):
            words = torch.randint(0, s.vocab - len(specials), (s.prompt_len - 1,), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in words)}) + "\n")


def overrides(root: Path, run_dir: Path, s: Shape, algo: str, iterations: int, device: str) -> list[str]:
    common = [
        f"model.policy_path={root / 'policy'}", f"model.reward_path={root / 'reward'}",
        f"data.prompt_path={root / 'prompts.jsonl'}", f"data.max_prompt_len={s.prompt_len}",
        f"rollout.max_new_tokens={s.new_tokens}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        "ppo.ppo_epochs=1", f"ppo.minibatch_size={s.minibatch}", f"ppo.micro_batch_tokens={s.micro_tokens}",
        f"rollout.forward_batch_tokens={s.micro_tokens}", "ppo.critic_warmup_steps=0", "run.seed=0",
        f"run.iterations={iterations}", f"run.output_dir={run_dir}", "run.save_every=0", "run.export_at_end=false",
        "run.tensorboard=false", "run.progress_bar=false", "run.log_level=WARNING", f"run.device={device}",
        f"model.dtype={'bfloat16' if device == 'cuda' else 'float32'}",
    ]
    if algo == "grpo":
        return common + ["advantage.estimator=grpo", f"rollout.rollout_batch_size={s.prompts}",
                         f"rollout.n_samples_per_prompt={s.group}", "reward.kl_coef=0.0"]
    return common + [f"rollout.rollout_batch_size={s.prompts * s.group}"]       # PPO-max: the defaults


def naive_token_logprobs(logits, labels, *, temperature=1.0, return_entropy=False, ignore_index=-100, backend=None):
    """The lm_head path of most trainers: log_softmax of the float32 logits, gather; entropy from the same."""
    from fastppo.kernels import LogprobsAndEntropy

    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = labels != ignore_index
    lp = logp.gather(-1, torch.where(valid, labels, 0).long()[..., None]).squeeze(-1) * valid
    if not return_entropy:
        return lp
    return LogprobsAndEntropy(lp, -(logp.exp() * logp).sum(-1) * valid)


@contextlib.contextmanager
def lm_head_path(path: str):
    """fastppo: as it is; naive: full logits from the model's forward and `naive_token_logprobs`."""
    import fastppo.models as models

    saved = models.fused_lm_head_supported, models.token_logprobs
    if path == "naive":
        models.fused_lm_head_supported = lambda model: "the naive baseline (bench/gpu_iteration.py)"
        models.token_logprobs = naive_token_logprobs
    try:
        yield
    finally:
        models.fused_lm_head_supported, models.token_logprobs = saved


def never_stop_early():
    """Fixed work per iteration: generation never stops at EOS (a random model emits it at random)."""
    import fastppo.rollout as rollout

    base = rollout.generation_kwargs
    rollout.generation_kwargs = lambda cfg, *, eos_id, pad_id: {**base(cfg, eos_id=eos_id, pad_id=pad_id),
                                                                "suppress_tokens": [pad_id, eos_id]}
    return lambda: setattr(rollout, "generation_kwargs", base)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:          # VmHWM restarts from the current RSS
            f.write("5")


# ----------------------------------------------------------------------------
# Model FLOPs of the update
# ----------------------------------------------------------------------------

def matmul_params(s: Shape, *, lm_head: bool) -> int:
    """Parameters that multiply each token's activations: the layers' projections (+ the lm_head, V·H)."""
    head_dim = s.hidden // s.heads
    per_layer = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head_dim + 3 * s.hidden * s.intermediate
    return s.layers * per_layer + (s.vocab * s.hidden if lm_head else s.hidden)


def update_flops(s: Shape, algo: str, tokens: float, seq_len: float, epochs: int = 1) -> float:
    """6·N per token for forward + backward of each trained model, + causal attention 6·L·H·T per token."""
    n = matmul_params(s, lm_head=True) + (matmul_params(s, lm_head=False) if algo == "ppo_max" else 0)
    models = 2 if algo == "ppo_max" else 1
    return epochs * tokens * (6 * n + models * 6 * s.layers * s.hidden * seq_len)


# ----------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------

def run_one(root: Path, work: Path, s: Shape, algo: str, path: str, iterations: int, device: torch.device) -> dict:
    """One configuration: train for `iterations`, medians over the iterations after the first."""
    from fastppo.config import load_config
    from fastppo.train import train

    run_dir = work / f"run-{algo}-{path}"
    gc.collect()
    reset_peak(device)
    restore = never_stop_early()
    t0 = time.perf_counter()
    try:
        with lm_head_path(path):
            train(load_config(None, overrides(root, run_dir, s, algo, iterations, device.type)))
    finally:
        restore()
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = records[1:] or records
    med = lambda key: statistics.median(r.get(key, 0.0) for r in timed)    # noqa: E731
    gen, total = med("response/tokens"), med("response/total_tokens")
    rows = max(1, s.prompts * s.group)
    row = {"algo": algo, "path": path, "device": device_name(device), "timed_iterations": len(timed),
           "generated_tokens": gen, "total_tokens": total, "peak_memory_mb": round(records[-1]["memory/peak_mb"], 1),
           "wall_s": round(wall, 2)}
    work_of = {"rollout": gen, "update": total}
    for phase, names in PHASES.items():
        sec = statistics.median(sum(r.get(f"time/{n}_s", 0.0) for n in names) for r in timed)
        row[f"{phase}_s"] = round(sec, 4)
        row[f"{phase}_tokens_per_s"] = round(work_of.get(phase, total) / max(sec, 1e-9), 1)
    row["iteration_s"] = round(med("time/iteration_s"), 4)
    row["iteration_tokens_per_s"] = round(total / max(row["iteration_s"], 1e-9), 1)
    row["update_tflops"] = round(update_flops(s, algo, total, total / rows) / max(row["update_s"], 1e-9) / 1e12, 3)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2, help="per configuration; the first is a warm-up")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and workload (CPU smoke run)")
    parser.add_argument("--algos", nargs="+", default=["grpo", "ppo_max"], choices=["grpo", "ppo_max"])
    parser.add_argument("--paths", nargs="+", default=["fastppo", "naive"], choices=["fastppo", "naive"])
    parser.add_argument("--no-compile", action="store_true", help="accepted for the gpu-check harness; unused")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = TINY if args.tiny or device.type != "cuda" else QWEN2_1_5B
    peak = matmul_peak_tflops(device, torch.bfloat16) if device.type == "cuda" else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastppo-gpu-iteration-") as tmp:
        root = Path(tmp)
        build_workload(root, s, torch.bfloat16 if device.type == "cuda" else torch.float32)
        for algo in args.algos:
            for path in args.paths:
                print(f"[gpu_iteration] {algo} / {path} ...", flush=True)
                try:
                    row = run_one(root, root, s, algo, path, args.iterations, device)
                except torch.OutOfMemoryError as exc:                # the naive path at this shape: reported
                    print(f"[gpu_iteration] {algo} / {path}: out of memory ({str(exc).splitlines()[0]})", flush=True)
                    row = {"algo": algo, "path": path, "device": device_name(device), "error": "out of memory"}
                row["matmul_peak_tflops"] = peak
                if peak and "update_tflops" in row:
                    row["update_mfu_pct"] = round(100 * row["update_tflops"] / peak, 2)
                rows.append(row)
    print_summary(rows)
    if rows:
        append_csv("gpu_iteration", [dict(r, shape="tiny" if s is TINY else "qwen2-1.5b") for r in rows])
    return rows


def print_summary(rows: list[dict]) -> None:
    keys = ["rollout_s", "score_s", "shape_advantages_s", "update_s", "iteration_s", "iteration_tokens_per_s",
            "peak_memory_mb", "update_tflops", "update_mfu_pct"]
    print("algo     path     " + " ".join(f"{k:>22}" for k in keys))
    for r in rows:
        print(f"{r['algo']:<8} {r['path']:<8} " + " ".join(f"{str(r.get(k, r.get('error', '-'))):>22}" for k in keys))
    by = {(r["algo"], r["path"]): r for r in rows}
    for algo in sorted({r["algo"] for r in rows}):
        fast, naive = by.get((algo, "fastppo")), by.get((algo, "naive"))
        if fast and naive and "iteration_s" in fast and "iteration_s" in naive:
            ratios = ", ".join(f"{k[:-2]} {naive[k] / max(fast[k], 1e-9):.2f}x" for k in
                               ("score_s", "update_s", "iteration_s"))
            mem = naive["peak_memory_mb"] / max(fast["peak_memory_mb"], 1e-9)
            print(f"{algo}: naive / fastppo time: {ratios}; peak memory {mem:.2f}x")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
