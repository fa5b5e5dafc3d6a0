"""GRPO benchmark: fastppo's `grpo` preset and TRL's GRPOTrainer side by side on one fixed workload.

Workload: bench/trainer.py's model (Llama architecture, hidden 256, 4 layers,
vocab 32000, float32) and the first 16 of its prompts; 8 samples per prompt
(a batch of 128 responses), 64 new tokens each (EOS suppressed in both, so
every iteration does the same work), temperature 0.8 without top-p/top-k; one
reward function (`grpo_reward:even_words`), no reward model, no critic, no KL
term (TRL's default beta 0, so neither loads a reference model); group-std
advantages; one pass over each batch in minibatches of 32 responses
(micro-batch 16): 4 optimizer steps per iteration in both.

    .venv/bin/python bench/grpo.py [--iterations 3] [--device cpu|cuda] [--threads N] [--no-trl]
                                   [--engine hf static]
    make bench-grpo-venv    # once: the current TRL release in .venv-trl-grpo, for the comparison

Each framework runs in its own fresh process (bench/trainer.py's harness);
the TRL worker is bench/trl_grpo_workload.py. Reported per phase (median over
the iterations after the first): seconds and tokens/s, with rollout =
generated tokens / s, score (logprobs the estimator needs, rewards,
advantages) = prompt + response tokens / s, update = prompt + response tokens
/ s; peak memory as in bench/trainer.py. `--engine hf static`: one fastppo run per rollout engine
(`rollout.engine`; provider fastppo-static for static). Rows go to bench/results/grpo.csv.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from common import append_csv, device_name
from trainer import (PROMPT_LEN, SEED, TEMPERATURE, build_workload, comparison_parser, force_static_lengths,
                     never_stop_early, never_stop_early_static, parse_comparison_args, print_providers, print_table,
                     run_worker, summarize, trl_python, write_fastppo_result)

from fastppo.memory import status_mb

N_PROMPTS, SAMPLES, NEW_TOKENS, MINIBATCH, MICRO = 16, 8, 64, 32, 16
PHASES = ["rollout", "score", "update"]
TRL_WORKER = Path(__file__).resolve().parent / "trl_grpo_workload.py"
REWARD = "grpo_reward:even_words"


def workload(root: Path, iterations: int, device: str, threads: int) -> dict:
    """bench/trainer.py's models and tokenizer; its first N_PROMPTS prompts."""
    build_workload(root)
    lines = (root / "prompts.jsonl").read_text().splitlines()[:N_PROMPTS]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return {"policy_path": str(root / "policy"), "prompts_path": str(root / "prompts.jsonl"),
            "iterations": iterations, "device": device, "threads": threads, "seed": SEED,
            "samples_per_prompt": SAMPLES, "new_tokens": NEW_TOKENS, "minibatch": MINIBATCH, "micro_batch": MICRO,
            "temperature": TEMPERATURE, "attn_implementation": "sdpa", "clip_eps": 0.2, "lr": 1e-6}


def fastppo_overrides(spec: dict, run_dir: Path) -> list[str]:
    return [
        f"model.policy_path={spec['policy_path']}", f"data.prompt_path={spec['prompts_path']}",
        f"data.max_prompt_len={PROMPT_LEN}", f"reward.functions=[{{name: '{REWARD}', weight: 1.0}}]",
        "reward.kl_coef=0.0", "ppo.kl_loss_coef=0.0", f"rollout.rollout_batch_size={N_PROMPTS}",
        f"rollout.n_samples_per_prompt={SAMPLES}",
        f"rollout.max_new_tokens={NEW_TOKENS}", f"rollout.temperature={spec['temperature']}", "rollout.top_p=1.0",
        "rollout.top_k=0", "ppo.ppo_epochs=1", f"ppo.minibatch_size={MINIBATCH}", f"ppo.micro_batch_size={MICRO}",
        f"ppo.clip_eps={spec['clip_eps']}", f"optim.policy_lr={spec['lr']}", f"run.seed={SEED}",
        f"run.iterations={spec['iterations']}", f"run.output_dir={run_dir}", "run.save_every=0",
        "run.export_at_end=false", "run.tensorboard=false", "run.progress_bar=false", "run.log_level=WARNING",
        f"run.device={spec['device']}", f"rollout.engine={spec.get('engine', 'hf')}",
    ]


def fastppo_worker(spec_path: Path, out_path: Path) -> None:
    """fastppo's trainer with the `grpo` preset in this process; per-iteration records to out_path."""
    import fastppo.rollout as rollout
    from fastppo.config import load_config
    from fastppo.train import train

    rss_after_imports_mb = status_mb("VmRSS")
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    never_stop_early(rollout)
    force_static_lengths(never_stop_early_static)
    run_dir = spec_path.parent / f"fastppo-run-{spec.get('engine', 'hf')}"
    train(load_config(None, fastppo_overrides(spec, run_dir), preset="grpo"))
    # TRL scores (rewards, advantages) inside its generation step: fastppo's rewards are in its rollout phase.
    write_fastppo_result(out_path, run_dir, spec, rss_after_imports_mb,
                         {"score": ("score", "shape", "advantages")})


def main() -> int:
    ap = comparison_parser(__doc__, "interpreter with the current TRL (default: .venv-trl-grpo/bin/python)")
    ap.add_argument("--engine", nargs="+", choices=["hf", "static"], default=["hf"],
                    help="fastppo's rollout.engine; one fastppo run per value given (static: provider fastppo-static)")
    args = parse_comparison_args(ap, fastppo_worker)
    if args is None:
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if not args.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    dev = device_name(torch.device(args.device))
    results, notes = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = workload(root, args.iterations, args.device, args.threads)
        for engine in dict.fromkeys(args.engine):
            name = "fastppo" if engine == "hf" else f"fastppo-{engine}"
            (root / f"workload-{name}.json").write_text(json.dumps({**spec, "engine": engine}, indent=1))
            res, err = run_worker(name, [sys.executable, str(Path(__file__).resolve()), "--worker",
                                         str(root / f"workload-{name}.json"), str(root / f"{name}.json")],
                                  root / f"{name}.json", env)
            if res is None:
                print(err, file=sys.stderr)
                return 1
            results[name] = res
        py, info = (None, "--no-trl") if args.no_trl else trl_python(
            args.trl_python, venv=".venv-trl-grpo", env_var="FASTPPO_TRL_GRPO_PYTHON",
            trainer="trl import GRPOTrainer", make_target="bench-grpo-venv")
        if py is not None:
            (root / "workload-trl.json").write_text(json.dumps({**spec, "output_dir": str(root / "trl-run")}))
            res, err = run_worker(f"TRL {info}", [py, str(TRL_WORKER), str(root / "workload-trl.json"),
                                                  str(root / "trl.json")], root / "trl.json", env)
            if res is not None:
                results["trl"] = res
            info = err
        if "trl" not in results:
            notes.append(f"TRL comparison skipped: {info}")

    summaries = {name: summarize(r, PHASES, epochs=1) for name, r in results.items()}
    print(f"\nGRPO benchmark on {dev}, {args.threads} torch thread(s), "
          f"{next(iter(summaries.values()))['timed_iterations']} timed iteration(s) after 1 warm-up (medians)")
    print(f"workload: {N_PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens, bench/trainer.py's model, "
          f"minibatch {MINIBATCH}, micro-batch {MICRO}, one reward function, no critic, no KL, float32")
    print_providers(results, summaries)
    print()
    print_table(summaries, cuda=args.device.startswith("cuda"), phases=PHASES)
    for name, f in summaries.items():
        if name == "trl" or "trl" not in summaries:
            continue
        t = summaries["trl"]
        print(f"{name} vs TRL: {f['iteration_tokens_per_s'] / t['iteration_tokens_per_s']:.2f}x the throughput "
              f"(goal >= 2x), {f['peak_memory_mb'] / t['peak_memory_mb']:.2f}x the peak memory (goal <= 0.6x)")
    if "fastppo-static" in summaries and "fastppo" in summaries:
        f, s = summaries["fastppo"], summaries["fastppo-static"]
        print(f"rollout: static {s['rollout_tokens_per_s'] / f['rollout_tokens_per_s']:.2f}x hf's tokens/s")
    for n in notes:
        print(n)
    rows = [{"device": dev, "provider": name, "threads": args.threads, "iterations": s["timed_iterations"],
             **{f"{p}_{k}": round(s[f"{p}_{k}"], 4) for p in PHASES + ["iteration"] for k in ("s", "tokens_per_s")},
             "optimizer_steps": s["optimizer_steps"], "peak_memory_mb": round(s["peak_memory_mb"], 1)}
            for name, s in summaries.items()]
    print(f"appended to {append_csv('grpo', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
