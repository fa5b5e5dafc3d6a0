"""`fastppo demo --task arithmetic`: a tiny model learns to answer sums with GRPO and a verifiable reward.

    0 data      prompts "what is 3 + 4 ?" (operands 0-9) with their `answer` field; SFT responses; a word-level
                tokenizer and a tiny Llama (random init)
    1 sft       `fastppo sft` on the SFT responses                          -> sft/export
    2 grpo      `fastppo train --preset grpo` with reward.functions = fastppo.rewards:math_answer and no
                reward model                                               -> grpo/export/policy
    3 evaluate  held-out prompts (operand pairs never used as GRPO prompts): accuracy before (SFT) and after

The SFT data teach two habits: "it is 7" (the sum, worked out) in P_WORK of the responses, "maybe 12" (a guess)
in the rest. So the SFT model knows every sum but answers only about a third of the prompts with it. GRPO with
a reward that checks the answer (math-verify against the prompt's `answer`) needs no reward model and no critic:
within each group of samples for one prompt the worked-out answers score above the guesses, and the policy learns
to work the answer out, on prompts it was never trained on as well. Deterministic given --seed on one machine.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from . import synthetic as S
from .config import RolloutConfig, SFTConfig, load_config, load_stage_config
from .data import collate_prompts, load_prompts
from .models import ensure_pad_token, load_tokenizer
from .rewards import math_answer
from .rollout import generate
from .sft import sft
from .train import train

NUMBERS = [str(i) for i in range(19)]
VOCAB = S.SPECIAL_TOKENS + ["what", "is", "+", "?", "it", "maybe"] + NUMBERS
P_WORK = 0.3
"""Fraction of SFT responses that give the sum ("it is 7"); the rest guess ("maybe 12")."""


@dataclass
class ArithmeticPlan:
    """Sizes and schedules (tiny-model learning rates; the grpo preset keeps its algorithmic knobs)."""
    n_sft: int = 4000
    n_prompts: int = 512
    n_eval_prompts: int = 200
    sft_epochs: float = 2.0
    sft_lr: float = 3e-3
    iterations: int = 40
    policy_lr: float = 1e-4
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 4


def is_held_out(a: int, b: int) -> bool:
    """A fifth of the operand pairs are never GRPO prompts: the held-out evaluation set."""
    return (3 * a + b) % 5 == 0


def make_prompts(n: int, seed: int, split: str) -> list[dict]:
    """Prompts with their `answer` field (the record the reward function reads); split: train, eval or all."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = rng.randrange(10), rng.randrange(10)
        if split == "all" or is_held_out(a, b) == (split == "eval"):
            rows.append({"prompt": f"what is {a} + {b} ?", "answer": str(a + b)})
    return rows


def make_sft_data(n: int, seed: int) -> list[dict]:
    """Every operand pair; the response gives the sum with probability P_WORK, else a guess."""
    rng = random.Random(seed)
    rows = make_prompts(n, seed, "all")
    for row in rows:
        row["response"] = f"it is {row['answer']}" if rng.random() < P_WORK else f"maybe {rng.choice(NUMBERS)}"
    return rows


@torch.no_grad()
def accuracy(policy_dir: Path, tokenizer_dir: Path, prompts_path: Path, *, seed: int, rollout: RolloutConfig
             ) -> dict:
    """One sampled response per prompt (fixed seed, the training temperature): the fraction math_answer accepts,
    and the fraction that works the answer out ("it is ...")."""
    tok = load_tokenizer(str(tokenizer_dir))
    ensure_pad_token(tok)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    records = [json.loads(line) for line in open(prompts_path)]
    prompts = load_prompts(prompts_path, tok, field="prompt", prompt_format="plain", max_len=16)
    torch.manual_seed(seed)
    batch = collate_prompts(prompts, tok.pad_token_id)
    ro = generate(policy, batch, rollout, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  generation_batch_size=len(prompts))
    texts = [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(ro.responses, ro.response_mask)]
    correct = [math_answer(rec["prompt"], text, rec) == 1.0 for rec, text in zip(records, texts)]
    return {"accuracy": sum(correct) / len(correct),
            "worked_out": sum(t.startswith("it is") for t in texts) / len(texts),
            "samples": [{"prompt": r["prompt"], "response": t, "answer": r["answer"]}
                        for r, t in list(zip(records, texts))[:6]]}


def run_arithmetic_demo(out: Path, *, seed: int, plan: ArithmeticPlan, progress_bar: bool, echo=print) -> dict:
    """SFT -> GRPO with math_answer -> held-out accuracy before and after, each stage configured as its command."""
    t_all = time.perf_counter()
    data = out / "data"
    paths = {
        "sft": S.write_jsonl(data / "sft.jsonl", make_sft_data(plan.n_sft, seed * 10 + 1)),
        "prompts": S.write_jsonl(data / "prompts.jsonl", make_prompts(plan.n_prompts, seed * 10 + 2, "train")),
        "prompts_eval": S.write_jsonl(data / "prompts_eval.jsonl",
                                      make_prompts(plan.n_eval_prompts, seed * 10 + 3, "eval")),
    }
    init = out / "init"
    tok = S.build_tokenizer(init, vocab=VOCAB)
    torch.manual_seed(seed)
    LlamaForCausalLM(S.tiny_llama_config(len(tok), vocab=VOCAB)).save_pretrained(init, safe_serialization=True)
    common = [f"run.seed={seed}", "run.device=cpu", f"run.progress_bar={str(progress_bar).lower()}",
              "run.log_level=WARNING"]
    sft(load_stage_config(SFTConfig, overrides=[
        f"model.path={init}", f"data.train_path={paths['sft']}", "data.eval_fraction=0.05", f"optim.lr={plan.sft_lr}",
        "optim.warmup_steps=10", f"run.epochs={plan.sft_epochs}", "run.batch_size=32", "run.micro_batch_size=32",
        "run.eval_every=25", f"run.output_dir={out / 'sft'}", *common]))
    echo(f"[demo] sft        done (total {time.perf_counter() - t_all:6.1f}s)")
    sft_dir = out / "sft" / "export"
    cfg = load_config(None, [
        f"model.policy_path={sft_dir}", f"data.prompt_path={paths['prompts']}",
        "reward.functions=[{name: 'fastppo.rewards:math_answer', weight: 1.0}]",
        f"rollout.rollout_batch_size={plan.prompts_per_iteration}",
        f"rollout.n_samples_per_prompt={plan.samples_per_prompt}", f"rollout.max_new_tokens={plan.max_new_tokens}",
        f"ppo.minibatch_size={plan.prompts_per_iteration * plan.samples_per_prompt // 2}",
        f"ppo.micro_batch_size={plan.prompts_per_iteration * plan.samples_per_prompt // 2}",
        f"optim.policy_lr={plan.policy_lr}", f"run.iterations={plan.iterations}", "run.save_every=0",
        "run.keep_last=1", f"run.output_dir={out / 'grpo'}", *common,
    ], preset="grpo")
    train(cfg)
    echo(f"[demo] grpo       done (total {time.perf_counter() - t_all:6.1f}s)")
    kw = dict(seed=seed, rollout=cfg.rollout)
    before = accuracy(sft_dir, sft_dir, paths["prompts_eval"], **kw)
    after = accuracy(out / "grpo" / "export" / "policy", sft_dir, paths["prompts_eval"], **kw)
    summary = {"seed": seed, "held_out_prompts": plan.n_eval_prompts,
               "before": {k: v for k, v in before.items() if k != "samples"},
               "after": {k: v for k, v in after.items() if k != "samples"},
               "seconds": time.perf_counter() - t_all}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    echo("")
    echo(f"{'held-out prompts':<20}{'accuracy':>10}{'worked out':>12}")
    for name, r in (("SFT (before GRPO)", before), ("grpo (after)", after)):
        echo(f"{name:<20}{r['accuracy']:>10.1%}{r['worked_out']:>12.1%}")
    echo("")
    for name, r in (("SFT", before), ("grpo", after)):
        echo(f"samples, {name}: " + "; ".join(f"{s['prompt']} {s['response']}" for s in r["samples"][:3]))
    echo(f"[demo] total {summary['seconds']:.1f}s. Everything is in {out.resolve()}")
    return summary
