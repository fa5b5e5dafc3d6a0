"""`fastppo demo --task arithmetic`: GRPO with a verifiable reward, on a laptop CPU, offline, in minutes.

    0 data        prompts "what is 4 + 5 ?" (sums and differences of 0..5), a word-level tokenizer whose
                  words include the numbers, a tiny Llama (random init)
    1 sft         `fastppo sft` on noisy answers "the answer is N" (right only ARITH_P_CORRECT of the time):
                  the policy learns the format and a spread of candidate answers
    2 grpo        `fastppo train --preset grpo` with no reward model: reward.functions =
                  fastppo.rewards:math_answer against each prompt's `answer` field (math-verify)
    3 evaluate    accuracy on held-out prompts before and after GRPO: fresh draws of the same problems (there are
                  only 57 of them), sampled with noise no training rollout used

Each stage is configured as its command would be (config loaders with dotted overrides). Deterministic
given --seed (on one machine and thread count).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from ..config import RolloutConfig, SFTConfig, load_config
from ..data import collate_prompts, load_prompts
from ..models import ensure_pad_token, load_tokenizer
from ..rewards import math_answer
from ..rollout import generate
from ..sft import sft
from ..train import train
from . import synthetic as S
from .common import Stages, TinyPlan, run_overrides, sft_overrides

ARITH_WORDS = ["what", "is", "the", "answer", "+", "-", "?"]
MAX_OPERAND = 5
NUMBERS = [str(n) for n in range(2 * MAX_OPERAND + 1)]   # every sum a + b and difference a - b >= 0 of operands <= 5
ARITH_VOCAB = [*S.SPECIAL_TOKENS, *ARITH_WORDS, *NUMBERS]
ARITH_P_CORRECT = 0.5
"""How often an SFT response holds the right answer (else a uniformly random number)."""


@dataclass
class ArithmeticPlan(TinyPlan):
    """Sizes and schedules (tiny-model settings; the grpo preset keeps its algorithmic knobs)."""
    sft_epochs: float = 4.0
    n_sft: int = 3000
    n_prompts: int = 1024
    n_eval_prompts: int = 256
    iterations: int = 60
    policy_lr: float = 1e-3
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    minibatch_size: int = 64
    max_new_tokens: int = 6


def quick_arithmetic_plan() -> ArithmeticPlan:
    """A shortened run (the tests use it): the same code path."""
    return ArithmeticPlan(n_sft=2000, n_prompts=512, n_eval_prompts=128, sft_epochs=3.0, iterations=25)


def make_problem(rng: random.Random) -> dict:
    a, b = rng.randrange(MAX_OPERAND + 1), rng.randrange(MAX_OPERAND + 1)
    if rng.random() < 0.5:
        return {"prompt": f"what is {a} + {b} ?", "answer": str(a + b)}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"what is {a} - {b} ?", "answer": str(a - b)}


def make_sft_data(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = make_problem(rng)
        answer = p["answer"] if rng.random() < ARITH_P_CORRECT else rng.choice(NUMBERS)
        rows.append({"prompt": p["prompt"], "response": f"the answer is {answer}"})
    return rows


@torch.no_grad()
def accuracy(policy_dir: Path, prompts_path: Path, *, seed: int, max_new_tokens: int) -> tuple[float, list[dict]]:
    """Fraction of held-out prompts answered right (one sample each at temperature 1, scored by math_answer)."""
    tok = load_tokenizer(str(policy_dir))
    ensure_pad_token(tok)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    records: list[dict] = []
    prompts = load_prompts(prompts_path, tok, field="prompt", prompt_format="plain", max_len=16, records=records)
    rc = RolloutConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    ro = generate(policy, collate_prompts(prompts, tok.pad_token_id), rc, eos_id=tok.eos_token_id,
                  pad_id=tok.pad_token_id, generation_batch_size=len(prompts), seed=seed)
    samples, right = [], 0.0
    for i, rec in enumerate(records):
        text = tok.decode(ro.responses[i][ro.response_mask[i]], skip_special_tokens=True)
        score = math_answer(rec["prompt"], text, rec)
        right += score
        if len(samples) < 6:
            samples.append({"prompt": rec["prompt"], "response": text, "answer": rec["answer"], "right": score})
    return right / len(records), samples


def make_task(out: Path, plan: ArithmeticPlan, seed: int) -> None:
    """Write the problems (SFT answers, training and held-out prompts), the tokenizer and a tiny Llama."""
    rng, eval_rng = random.Random(seed * 10 + 4), random.Random(seed * 10 + 5)
    data, init = out / "data", out / "init"
    S.write_jsonl(data / "sft.jsonl", make_sft_data(plan.n_sft, seed * 10 + 1))
    S.write_jsonl(data / "prompts.jsonl", [make_problem(rng) for _ in range(plan.n_prompts)])
    S.write_jsonl(data / "prompts_eval.jsonl", [make_problem(eval_rng) for _ in range(plan.n_eval_prompts)])
    tok = S.build_tokenizer(init, vocab=ARITH_VOCAB)
    torch.manual_seed(seed)
    config = S.tiny_llama_config(len(tok), hidden_size=plan.hidden_size, layers=plan.layers, heads=plan.heads)
    LlamaForCausalLM(config).save_pretrained(init, safe_serialization=True)


def run_arithmetic_demo(out: Path, *, seed: int = 0, plan: ArithmeticPlan | None = None, progress_bar: bool = True,
                        echo=print, resume: bool = False) -> dict:
    """SFT -> GRPO with math_answer -> held-out accuracy before and after. Returns the summary (summary.json).
    Stoppable and resumable as `demo.run_demo` (`synthetic.Stages`)."""
    plan = plan or ArithmeticPlan()
    data, init = out / "data", out / "init"
    paths = {"sft": data / "sft.jsonl", "prompts": data / "prompts.jsonl", "eval": data / "prompts_eval.jsonl"}
    with Stages(out, resume=resume, echo=echo) as stages:
        stages.run("data", lambda _: make_task(out, plan, seed), done=init / "config.json")
        stages.run("sft", lambda _: sft(load_config(None, schema=SFTConfig, overrides=sft_overrides(
            init, paths["sft"], out / "sft", plan, seed, progress_bar))), done=out / "sft" / "export" / "config.json",
            run_dir=out / "sft")
        stages.run("grpo", lambda resumable: _grpo(out, paths, plan, seed, progress_bar, resumable),
                   done=out / "grpo" / "export" / "policy" / "config.json", run_dir=out / "grpo")

        def evaluate(_):
            eval_seed = seed * 10 + 7                             # sampling noise no training rollout used
            return [accuracy(policy, paths["eval"], seed=eval_seed, max_new_tokens=plan.max_new_tokens)
                    for policy in (out / "sft" / "export", out / "grpo" / "export" / "policy")]

        (before, samples_before), (after, samples_after) = stages.run("evaluate", evaluate)
    seconds, t_all = stages.seconds, stages.t_all

    summary = {"seed": seed, "plan": asdict(plan), "stage_seconds": seconds,
               "held_out_accuracy": {"sft": before, "grpo": after},
               "samples": {"sft": samples_before, "grpo": samples_after}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    echo("")
    echo(f"held-out accuracy (math_answer, {plan.n_eval_prompts} prompts): SFT {before:.1%} -> GRPO {after:.1%}")
    for s in samples_after[:3]:
        echo(f"  {s['prompt']} {s['response']}   [answer {s['answer']}, {'right' if s['right'] else 'wrong'}]")
    echo(f"[demo] total {time.perf_counter() - t_all:.1f}s. Everything is in {out.resolve()}")
    return summary


def _grpo(out: Path, paths: dict, plan: ArithmeticPlan, seed: int, progress_bar: bool, resume: bool):
    return train(load_config(None, [
        f"model.policy_path={out / 'sft' / 'export'}", "model.reward_path=null", f"data.prompt_path={paths['prompts']}",
        "data.prompt_format=plain", "reward.functions=[{name: 'fastppo.rewards:math_answer', weight: 1.0}]",
        "reward.function_workers=2", f"optim.policy_lr={plan.policy_lr}", f"run.iterations={plan.iterations}",
        "run.save_every=0", "run.keep_last=1", f"rollout.rollout_batch_size={plan.prompts_per_iteration}",
        f"rollout.n_samples_per_prompt={plan.samples_per_prompt}", f"rollout.max_new_tokens={plan.max_new_tokens}",
        f"ppo.minibatch_size={plan.minibatch_size}", f"ppo.micro_batch_size={plan.minibatch_size}",
        f"rollout.engine={plan.rollout_engine}",
        *run_overrides(out / "grpo", seed, progress_bar), *(["run.resume=latest"] if resume else [])], preset="grpo"))
