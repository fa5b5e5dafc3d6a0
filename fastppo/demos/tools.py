"""`fastppo demo --task tools`: a tiny model learns, with GRPO, to call a calculator and use its result.

    0 data        prompts "what is 47 + 38 ?" (two-digit operands: 8100 problems, too many for a tiny model to
                  add in its head), a word-level tokenizer with a chat template that has a tool role, a tiny Llama
    1 sft         `fastppo sft` on chat conversations: half answer at once, "the answer is N" (right, but too
                  rarely seen to be learnt), half call the tool,
                  `<tool_call> {"name":"add","arguments":{"a": 47 ,"b": 38 }} </tool_call>`, and answer after its turn
                  with its result: the policy can use the tool, but does so about half the time
    2 grpo        `fastppo train --preset grpo` with the built-in fastppo.envs:ToolEnv (the tool: `add` below),
                  observations as `tool` turns, up to 3 turns, the final answer scored by
                  fastppo.rewards:math_answer
    3 evaluate    on held-out prompts before and after GRPO, turn by turn through the same environment: accuracy,
                  the share of answers that called the tool, and a transcript

Deterministic given --seed (on one machine and thread count).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from ..config import EnvConfig, RewardConfig, RolloutConfig, SFTConfig, load_config
from ..data import load_records
from ..engine import HFEngine
from ..envs import EnvRunner, parse_tool_calls
from ..models import ensure_pad_token, load_tokenizer
from ..rewards import decode_rollout, math_answer
from ..sft import sft
from ..train import train
from . import synthetic as S
from .common import Stages, TinyPlan, run_overrides, sft_overrides

MIN_OPERAND, MAX_OPERAND = 10, 99
CALL_HEAD, CALL_MIDDLE, CALL_TAIL = '{"name":"add","arguments":{"a":', ',"b":', '}}'
"""A tool call in the documented format, cut where the word-level tokenizer splits it (at spaces)."""
TOOLS_WORDS = ["user", "assistant", "tool", ":", "what", "is", "the", "answer", "+", "?", "<tool_call>",
               "</tool_call>", CALL_HEAD, CALL_MIDDLE, CALL_TAIL]
TOOLS_VOCAB = [*S.SPECIAL_TOKENS, *TOOLS_WORDS, *(str(n) for n in range(2 * MAX_OPERAND + 1))]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} " + S.EOS + " {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
TOOL_SHARE = 0.5
"""How often an SFT conversation calls the tool (else the answer is a direct guess)."""


def add(a: int, b: int) -> int:
    """Add two integers."""
    return int(a) + int(b)


@dataclass
class ToolsPlan(TinyPlan):
    """Sizes and schedules (tiny-model settings; the grpo preset keeps its algorithmic knobs)."""
    sft_epochs: float = 6.0
    n_sft: int = 6000
    n_prompts: int = 1024
    n_eval_prompts: int = 256
    iterations: int = 30
    policy_lr: float = 1e-3
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    minibatch_size: int = 64
    max_new_tokens: int = 10
    max_turns: int = 3


def quick_tools_plan() -> ToolsPlan:
    """A shortened run (the tests use it): the same code path."""
    return ToolsPlan(n_prompts=512, n_eval_prompts=128, iterations=12)


def tool_call(a: int, b: int) -> str:
    return f"<tool_call> {CALL_HEAD} {a} {CALL_MIDDLE} {b} {CALL_TAIL} </tool_call>"


def make_problem(rng: random.Random) -> dict:
    a, b = rng.randint(MIN_OPERAND, MAX_OPERAND), rng.randint(MIN_OPERAND, MAX_OPERAND)
    return {"prompt": f"what is {a} + {b} ?", "answer": str(a + b), "a": a, "b": b}


def make_sft_data(n: int, seed: int) -> list[dict]:
    """Chat examples whose last turn is the one trained: a direct (right) answer, a tool call, or the answer after
    the tool's turn (the conversations the environment produces, turn for turn)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        p = make_problem(rng)
        user = {"role": "user", "content": p["prompt"]}
        if rng.random() >= TOOL_SHARE:
            rows.append({"messages": [user, {"role": "assistant", "content": f"the answer is {p['answer']}"}]})
            continue
        call = {"role": "assistant", "content": tool_call(p["a"], p["b"])}
        rows.append({"messages": [user, call]})
        rows.append({"messages": [user, call, {"role": "tool", "content": p["answer"]},
                                  {"role": "assistant", "content": f"the answer is {p['answer']}"}]})
    return rows[:n]


def make_task(out: Path, plan: ToolsPlan, seed: int) -> None:
    """Write the problems (SFT conversations, training and held-out prompts), the tokenizer and a tiny Llama."""
    rng, eval_rng = random.Random(seed * 10 + 4), random.Random(seed * 10 + 5)
    data, init = out / "data", out / "init"
    S.write_jsonl(data / "sft.jsonl", make_sft_data(plan.n_sft, seed * 10 + 1))
    S.write_jsonl(data / "prompts.jsonl", [make_problem(rng) for _ in range(plan.n_prompts)])
    S.write_jsonl(data / "prompts_eval.jsonl", [make_problem(eval_rng) for _ in range(plan.n_eval_prompts)])
    tok = S.build_tokenizer(None, vocab=TOOLS_VOCAB)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(init))
    torch.manual_seed(seed)
    config = S.tiny_llama_config(len(tok), hidden_size=plan.hidden_size, layers=plan.layers, heads=plan.heads)
    LlamaForCausalLM(config).save_pretrained(init, safe_serialization=True)


def env_section(plan: ToolsPlan) -> dict:
    """The `env` settings of the GRPO run and of the evaluation: ToolEnv with `add`, observations as tool turns."""
    return {"name": "fastppo.envs:ToolEnv", "kwargs": {"tools": ["fastppo.demos.tools:add"]},
            "max_turns": plan.max_turns, "observation_role": "tool", "workers": 2}


@torch.no_grad()
def evaluate(policy_dir: Path, prompts_path: Path, plan: ToolsPlan, *, seed: int) -> dict:
    """Held-out accuracy (one trajectory per prompt at temperature 1 through ToolEnv, the final answer scored by
    math_answer), the share of first answers that call the tool, and the first transcripts."""
    tok = load_tokenizer(str(policy_dir))
    ensure_pad_token(tok)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    records = load_records(prompts_path)
    rc = RolloutConfig(temperature=1.0, top_p=1.0, max_new_tokens=plan.max_new_tokens)
    ec = EnvConfig(**env_section(plan))
    runner = EnvRunner(ec, RewardConfig(), tok, records, max_new_tokens=plan.max_new_tokens, max_prompt_len=32,
                       prompt_format="chat")
    engine = HFEngine(policy, rc, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                      generation_batch_size=len(records))
    try:
        with engine.policy_loaded():
            ro = runner.run(engine, list(range(len(records))), seed=seed, sample_ids=torch.arange(len(records)))
    finally:
        runner.close()
    _, finals = decode_rollout(tok, ro)
    right = [math_answer("", text, rec) for text, rec in zip(finals, records)]
    first = [tok.decode(ro.responses[i][ro.turn_index[i] == 0].tolist(), skip_special_tokens=True)
             for i in range(len(records))]
    called = [bool(parse_tool_calls(text)) for text in first]
    transcripts = []
    P = ro.prompt_width
    for i in range(min(4, len(records))):
        ids = ro.sequences[i, :P][ro.attention_mask[i, :P].bool()].tolist() + ro.responses[i, :ro.lengths[i]].tolist()
        transcripts.append({"transcript": tok.decode(ids), "answer": records[i]["answer"], "right": right[i]})
    return {"accuracy": sum(right) / len(records), "tool_call_rate": sum(called) / len(records),
            "right_when_called": sum(r for r, c in zip(right, called) if c) / max(1, sum(called)),
            "transcripts": transcripts}


def run_tools_demo(out: Path, *, seed: int = 0, plan: ToolsPlan | None = None, progress_bar: bool = True,
                   echo=print, resume: bool = False) -> dict:
    """SFT -> GRPO through ToolEnv -> held-out accuracy and tool use before and after. Returns the summary
    (summary.json). Stoppable and resumable as the other demos (`common.Stages`)."""
    plan = plan or ToolsPlan()
    data, init = out / "data", out / "init"
    paths = {"sft": data / "sft.jsonl", "prompts": data / "prompts.jsonl", "eval": data / "prompts_eval.jsonl"}
    with Stages(out, resume=resume, echo=echo) as stages:
        stages.run("data", lambda _: make_task(out, plan, seed), done=init / "config.json")
        stages.run("sft", lambda _: sft(load_config(None, schema=SFTConfig, overrides=sft_overrides(
            init, paths["sft"], out / "sft", plan, seed, progress_bar))), done=out / "sft" / "export" / "config.json",
            run_dir=out / "sft")
        stages.run("grpo", lambda resumable: _grpo(out, paths, plan, seed, progress_bar, resumable),
                   done=out / "grpo" / "export" / "policy" / "config.json", run_dir=out / "grpo")
        before, after = stages.run("evaluate", lambda _: [
            evaluate(policy, paths["eval"], plan, seed=seed * 10 + 7)       # noise no training rollout used
            for policy in (out / "sft" / "export", out / "grpo" / "export" / "policy")])

    summary = {"seed": seed, "plan": asdict(plan), "stage_seconds": stages.seconds, "sft": before, "grpo": after}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    echo("")
    echo(f"held-out ({plan.n_eval_prompts} prompts)     accuracy   called the tool   right when it did")
    for name, r in (("SFT", before), ("GRPO", after)):
        echo(f"  {name:<24}{r['accuracy']:>8.1%}{r['tool_call_rate']:>18.1%}{r['right_when_called']:>20.1%}")
    echo("a transcript after GRPO:")
    t = after["transcripts"][0]
    echo(f"  {t['transcript']}   [answer {t['answer']}, {'right' if t['right'] else 'wrong'}]")
    echo(f"[demo] total {time.perf_counter() - stages.t_all:.1f}s. Everything is in {out.resolve()}")
    return summary


def _grpo(out: Path, paths: dict, plan: ToolsPlan, seed: int, progress_bar: bool, resume: bool):
    return train(load_config(None, [
        f"model.policy_path={out / 'sft' / 'export'}", "model.reward_path=null", f"data.prompt_path={paths['prompts']}",
        "data.prompt_format=chat", *(f"env.{k}={json.dumps(v)}" for k, v in env_section(plan).items()),
        "reward.functions=[{name: 'fastppo.rewards:math_answer', weight: 1.0}]", "reward.function_workers=2",
        f"optim.policy_lr={plan.policy_lr}", f"run.iterations={plan.iterations}", "run.save_every=0",
        "run.keep_last=1", f"rollout.rollout_batch_size={plan.prompts_per_iteration}",
        f"rollout.n_samples_per_prompt={plan.samples_per_prompt}", f"rollout.max_new_tokens={plan.max_new_tokens}",
        f"rollout.engine={plan.rollout_engine}",
        f"ppo.minibatch_size={plan.minibatch_size}", f"ppo.micro_batch_size={plan.minibatch_size}",
        *run_overrides(out / "grpo", seed, progress_bar), *(["run.resume=latest"] if resume else [])], preset="grpo"))
