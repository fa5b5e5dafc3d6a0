"""End-to-end trainer benchmark: one fixed PPO workload, tokens/s per phase and peak memory.

Workload (issue 5): 64 prompts x 16 tokens, 32 new tokens, a Llama-architecture
policy and reward model with hidden 256, 4 layers, vocab 32000; 4 PPO epochs,
minibatch 32, micro-batch 16. Generation is forced to the full 32 tokens (EOS
suppressed) so every iteration does the same work.

    .venv/bin/python bench/trainer.py [--iterations 3] [--device cpu|cuda]

Prints per-phase seconds and tokens/s (median over the iterations after the
first, which is a warm-up), and peak memory (CUDA: max allocated; CPU: peak
RSS of this process), and appends a row to bench/results/trainer.csv.

TRL comparison: when `trl` (1.12.0, `trl.experimental.ppo`) is importable, the
same workload would run through TRL's PPOTrainer and the ratios be printed side
by side. Not implemented yet: this script only reports fastppo's numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from common import append_csv, device_name

from fastppo.config import load_config
from fastppo.train import train

N_PROMPTS, PROMPT_LEN, NEW_TOKENS, HIDDEN, LAYERS, VOCAB = 64, 16, 32, 256, 4, 32000
PPO_EPOCHS, MINIBATCH, MICRO = 4, 32, 16


def build_workload(root: Path, device: str) -> list[str]:
    """Tokenizer (WordLevel over VOCAB synthetic words), policy + reward model, prompts; returns overrides."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                              PreTrainedTokenizerFast)

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HIDDEN // 64, num_key_value_heads=HIDDEN // 64, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    for name, cls in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        c = cfg.__class__.from_dict(cfg.to_dict())
        if name == "reward":
            c.num_labels = 1
        cls.from_config(c).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(N_PROMPTS):
            words = torch.randint(len(specials), VOCAB, (PROMPT_LEN - 1,), generator=g).tolist()  # + BOS = 16 tokens
            f.write(json.dumps({"prompt": " ".join(f"w{i - len(specials)}" for i in words)}) + "\n")
    return [
        f"model.policy_path={root / 'policy'}", f"model.reward_path={root / 'reward'}",
        f"data.prompt_path={root / 'prompts.jsonl'}", f"data.max_prompt_len={PROMPT_LEN}",
        f"rollout.rollout_batch_size={N_PROMPTS}", f"rollout.max_new_tokens={NEW_TOKENS}",
        f"ppo.ppo_epochs={PPO_EPOCHS}", f"ppo.minibatch_size={MINIBATCH}", f"ppo.micro_batch_size={MICRO}",
        "ppo.critic_warmup_steps=0", "rollout.forward_batch_size=16",
        f"run.output_dir={root / 'run'}", "run.save_every=0", "run.export_at_end=false", "run.tensorboard=false",
        "run.progress_bar=false", "run.log_level=WARNING", f"run.device={device}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import fastppo.rollout as rollout

    # Fixed work per iteration: never stop early at EOS (the random model emits it at random).
    base_kwargs = rollout.generation_kwargs
    rollout.generation_kwargs = lambda cfg, *, eos_id, pad_id: {**base_kwargs(cfg, eos_id=eos_id, pad_id=pad_id),
                                                                 "suppress_tokens": [pad_id, eos_id]}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = build_workload(Path(tmp), args.device)
        train(load_config(None, overrides + [f"run.iterations={args.iterations}"]))
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    tokens = med("response/total_tokens")
    gen_tokens = med("response/tokens")
    phases = ["rollout", "score", "shape", "advantages", "update"]
    print(f"fastppo trainer benchmark on {device_name(torch.device(args.device))}, {len(timed)} timed iteration(s)")
    print(f"workload: {N_PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, hidden {HIDDEN}, "
          f"{LAYERS} layers, vocab {VOCAB}, {PPO_EPOCHS} PPO epochs, minibatch {MINIBATCH}, micro-batch {MICRO}")
    print(f"{'phase':<12}{'seconds':>10}{'tokens/s':>12}")
    row = {"device": device_name(torch.device(args.device)), "provider": "fastppo", "iterations": len(timed)}
    for p in phases:
        sec = med(f"time/{p}_s")
        # rollout throughput counts generated tokens; the other phases process prompt + response tokens
        tps = (gen_tokens if p == "rollout" else tokens * (PPO_EPOCHS if p == "update" else 1)) / max(sec, 1e-9)
        print(f"{p:<12}{sec:>10.3f}{tps:>12.0f}")
        row[f"{p}_s"], row[f"{p}_tokens_per_s"] = round(sec, 4), round(tps, 1)
    total = med("time/iteration_s")
    row.update({"iteration_s": round(total, 4), "tokens_per_s": round(tokens / total, 1),
                "peak_memory_mb": round(max(r["memory/peak_mb"] for r in records), 1)})
    print(f"{'iteration':<12}{total:>10.3f}{tokens / total:>12.0f}   (prompt + response tokens / iteration time)")
    print(f"peak memory: {row['peak_memory_mb']:.0f} MB ({'CUDA max allocated' if args.device.startswith('cuda') else 'process peak RSS'})")
    try:
        import trl  # noqa: F401
        print("TRL is importable, but the side-by-side TRL run is not implemented yet")
    except ImportError:
        print("TRL not importable: TRL comparison skipped")
    path = append_csv("trainer", [row])
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
