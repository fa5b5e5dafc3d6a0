"""End-to-end trainer benchmark: one fixed PPO workload, fastppo and TRL side by side.

Workload: 64 prompts x 16 tokens, 32 new tokens, a Llama-architecture
policy and reward model with hidden 256, 4 layers, vocab 32000 (the critic
starts from the reward model, the reference is a copy of the policy); 4 PPO
epochs, minibatch 32, micro-batch 16; generation and scoring 16 rows at a
time; float32, sampling at temperature 0.8 without top-p/top-k. Every response
has the full 32 tokens (fastppo: EOS suppressed; TRL: no stop token), so every
iteration does the same work.

    .venv/bin/python bench/trainer.py [--iterations 3] [--device cpu|cuda] [--threads N] [--no-trl] [--lora [RANK]]
                                      [--old-logprobs recompute reuse] [--engine hf static]
                                      [--lengths fixed|longtail]
    make bench-trl-venv     # once: TRL 1.12.0 in .venv-trl, for the comparison

Each framework runs in its own fresh process on the same model directories and
prompts, with the same torch thread count: fastppo with this interpreter, TRL's
PPOTrainer (`trl.experimental.ppo`) with the TRL venv's (`bench/trl_workload.py`;
`--trl-python` or FASTPPO_TRL_PYTHON to use another). The venvs stay
independent (TRL 1.12 and fastppo need not agree on transformers), and the
process peak RSS of each run is its own. Results come back as JSON.

Reported: seconds and tokens/s per phase (median over the iterations after the
first, which is a warm-up in both), tokens/s of the whole iteration, peak
memory (CPU: the process's peak RSS; CUDA: max allocated; read at the end of
the last iteration in both), and fastppo/TRL ratios (tokens/s: > 1 means
fastppo is faster; memory: < 1 means fastppo needs less; with several fastppo runs,
`--old-logprobs recompute reuse`, each against the last provider). --lora runs fastppo with
LoRA adapters of that rank on the policy and the critic (model.lora, model.critic_lora)
beside full fine-tuning instead of TRL, and reports LoRA/full ratios. Tokens: rollout counts
generated tokens per second of generation; score and shape+adv count prompt +
response tokens per second; update counts prompt + response tokens x PPO
epochs; the iteration counts prompt + response tokens per second of the whole
iteration. Rows are appended to bench/results/trainer.csv.

`--engine hf static`: one fastppo run per rollout engine (`rollout.engine`; provider fastppo-static for
static), each forced to the same lengths (the static engine through its logits hook, the same rule,
`forced_lengths.force_lengths`).

`--lengths longtail`: variable-length responses instead. Each prompt's
response length is drawn once from a long-tailed (log-normal) distribution
with a fixed seed and forced in both frameworks by the same logits processor
(bench/forced_lengths.py: EOS exactly at the drawn step), so both process the
same tokens. fastppo runs twice, padding-free (`ppo.packing=true`, provider
fastppo) and padded (`ppo.packing=false`, provider fastppo-padded); the
ratios of score and update tokens/s, packed vs padded and packed vs TRL, are
printed. Tokens count only real tokens (no padding) in all three.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import append_csv, device_name
from forced_lengths import ForcedLengths, draw_lengths, force_lengths, prompt_key

from fastppo.memory import status_mb

N_PROMPTS, PROMPT_LEN, NEW_TOKENS, HIDDEN, LAYERS, VOCAB = 64, 16, 32, 256, 4, 32000
PPO_EPOCHS, MINIBATCH, MICRO, ROLLOUT_CHUNK = 4, 32, 16, 16
TEMPERATURE, SEED = 0.8, 0

REPO = Path(__file__).resolve().parent.parent
TRL_WORKER = Path(__file__).resolve().parent / "trl_workload.py"
PHASES = ["rollout", "score", "shape_advantages", "update"]
PHASE_LABEL = {"rollout": "rollout", "score": "score", "shape_advantages": "shape+adv", "update": "update",
               "iteration": "iteration"}


# ----------------------------------------------------------------------------
# The workload: models, tokenizer, prompts, and the knobs both frameworks read
# ----------------------------------------------------------------------------

def build_workload(root: Path) -> None:
    """Tokenizer (WordLevel over VOCAB synthetic words), policy + reward model, prompts, under root."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig,
                              PreTrainedTokenizerFast)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
    torch.manual_seed(SEED)
    for name, cls in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        c = cfg.__class__.from_dict(cfg.to_dict())
        if name == "reward":
            c.num_labels = 1
        cls.from_config(c).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(SEED)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(N_PROMPTS):
            words = torch.randint(len(specials), VOCAB, (PROMPT_LEN - 1,), generator=g).tolist()  # + BOS = 16 tokens
            f.write(json.dumps({"prompt": " ".join(f"w{i - len(specials)}" for i in words)}) + "\n")


def workload_spec(root: Path, iterations: int, device: str, threads: int) -> dict:
    """Everything a worker needs, as JSON: the TRL worker never imports fastppo."""
    from fastppo.config import load_config

    defaults = load_config(None, ["model.policy_path=x", "model.reward_path=x", "data.prompt_path=x"])
    return {
        "policy_path": str(root / "policy"), "reward_path": str(root / "reward"),
        "prompts_path": str(root / "prompts.jsonl"), "iterations": iterations, "device": device, "threads": threads,
        "seed": SEED, "n_prompts": N_PROMPTS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
        "ppo_epochs": PPO_EPOCHS, "minibatch": MINIBATCH, "micro_batch": MICRO, "rollout_chunk": ROLLOUT_CHUNK,
        "temperature": TEMPERATURE, "attn_implementation": defaults.model.attn_implementation,
        # PPO-max's numbers where TRL has the knob (they do not change the work done)
        "kl_coef": defaults.reward.kl_coef, "gamma": defaults.advantage.gamma, "lam": defaults.advantage.lam,
        "clip_eps": defaults.ppo.clip_eps, "value_clip": defaults.ppo.value_clip, "vf_coef": defaults.ppo.vf_coef,
        "lr": defaults.optim.policy_lr,
        "lengths": None, "packing": defaults.ppo.packing,   # --lengths longtail: {prompt ids: response length}
    }


def longtail_lengths(root: Path) -> dict[str, int]:
    """--lengths longtail: one seeded response length per prompt of the workload (bench/forced_lengths.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "policy")
    prompts = [json.loads(line)["prompt"] for line in (root / "prompts.jsonl").read_text().splitlines()]
    return draw_lengths([tok(p)["input_ids"] for p in prompts], NEW_TOKENS, SEED)


def fastppo_overrides(spec: dict, run_dir: Path) -> list[str]:
    return [
        f"model.policy_path={spec['policy_path']}", f"model.reward_path={spec['reward_path']}",
        f"data.prompt_path={spec['prompts_path']}", f"data.max_prompt_len={PROMPT_LEN}",
        f"rollout.rollout_batch_size={N_PROMPTS}", f"rollout.max_new_tokens={NEW_TOKENS}",
        f"rollout.generation_batch_size={ROLLOUT_CHUNK}", f"rollout.forward_batch_size={ROLLOUT_CHUNK}",
        f"rollout.temperature={TEMPERATURE}", "rollout.top_p=1.0", "rollout.top_k=0",  # TRL samples without them
        f"ppo.ppo_epochs={PPO_EPOCHS}", f"ppo.minibatch_size={MINIBATCH}", f"ppo.micro_batch_size={MICRO}",
        "ppo.critic_warmup_steps=0", f"run.seed={SEED}", f"run.iterations={spec['iterations']}",
        f"run.output_dir={run_dir}", "run.save_every=0", "run.export_at_end=false", "run.tensorboard=false",
        "run.progress_bar=false", "run.log_level=WARNING", f"run.device={spec['device']}",
        f"rollout.old_logprobs={spec.get('old_logprobs', 'recompute')}",
        f"ppo.packing={str(spec['packing']).lower()}", f"rollout.engine={spec.get('engine', 'hf')}",
    ] + ([f"model.lora.rank={spec['lora_rank']}", f"model.critic_lora.rank={spec['lora_rank']}"]
         if spec.get("lora_rank") else [])


# ----------------------------------------------------------------------------
# Workers: one fresh process per framework, results as JSON
# ----------------------------------------------------------------------------

def never_stop_early(rollout) -> None:
    """Fixed work per iteration: fastppo's generation never stops at EOS (a random model emits it at random)."""
    base_kwargs = rollout.generation_kwargs
    rollout.generation_kwargs = lambda cfg, *, eos_id, pad_id: {**base_kwargs(cfg, eos_id=eos_id, pad_id=pad_id),
                                                                "suppress_tokens": [pad_id, eos_id]}


def force_static_lengths(target_of) -> None:
    """The static engine's counterpart of the processors above: a logits hook (`force_lengths`) on every
    generate_static call, with target_of(prompts, max_new_tokens) -> (B,) each row's response length."""
    import fastppo.engine as engine

    base = engine.generate_static

    def generate_static(policy, prompts, cfg, logits_hook=None, **kw):
        target = target_of(prompts, cfg.max_new_tokens).to(prompts.input_ids.device)
        target = torch.cat([target, target.new_zeros(1)])                   # row B: the empty slots
        hook = lambda s, rows, steps: force_lengths(s, target[rows], steps, eos_id=kw["eos_id"],  # noqa: E731
                                                    pad_id=kw["pad_id"])
        return base(policy, prompts, cfg, logits_hook=hook, **kw)

    engine.generate_static = generate_static


def never_stop_early_static(prompts, max_new_tokens: int) -> torch.Tensor:
    """force_static_lengths' targets that never end a response before max_new_tokens (EOS always masked)."""
    return torch.full((prompts.input_ids.size(0),), max_new_tokens + 1)


def fastppo_worker(spec_path: Path, out_path: Path) -> None:
    """Run fastppo's trainer on the workload in this process; per-iteration records to out_path."""
    import fastppo.rollout as rollout
    from fastppo.config import load_config
    from fastppo.train import train

    rss_after_imports_mb = status_mb("VmRSS")
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])

    if spec["lengths"] is None:
        never_stop_early(rollout)
        force_static_lengths(never_stop_early_static)
    else:  # every response ends with EOS at its drawn length (the processor runs after fastppo's sampler)
        forced = ForcedLengths(spec["lengths"], prompt_len=PROMPT_LEN, eos_id=2, pad_id=0)
        base_list = rollout.LogitsProcessorList
        rollout.LogitsProcessorList = lambda processors: base_list([*processors, forced])
        force_static_lengths(lambda prompts, _: torch.tensor(
            [spec["lengths"][prompt_key(row)] for row in prompts.input_ids[:, :PROMPT_LEN].tolist()]))
    run_dir = spec_path.parent / f"run-{spec_path.stem}"
    train(load_config(None, fastppo_overrides(spec, run_dir)))
    write_fastppo_result(out_path, run_dir, spec, rss_after_imports_mb,
                         {"score": ("score",), "shape_advantages": ("shape", "advantages")})


def write_fastppo_result(out_path: Path, run_dir: Path, spec: dict, rss_after_imports_mb: float,
                         phases: dict[str, tuple[str, ...]]) -> None:
    """A fastppo worker's result JSON from its run's metrics.jsonl: per iteration, rollout and update seconds,
    each of `phases` as the sum of fastppo's phases it names (time/<name>_s), tokens and optimizer steps."""
    import transformers

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations, steps_before = [], 0
    for r in records:
        steps = r["train/optimizer_steps"] + r["train/skipped_steps"]
        iterations.append({
            "rollout_s": r["time/rollout_s"], "update_s": r["time/update_s"], "iteration_s": r["time/iteration_s"],
            **{f"{p}_s": sum(r.get(f"time/{n}_s", 0.0) for n in names) for p, names in phases.items()},
            "generated_tokens": r["response/tokens"], "total_tokens": r["response/total_tokens"],
            "optimizer_steps": steps - steps_before,
        })
        steps_before = steps
    out_path.write_text(json.dumps({
        "provider": "fastppo", "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "device": spec["device"], "threads": torch.get_num_threads(), "iterations": iterations,
        "peak_memory_mb": records[-1]["memory/peak_mb"],  # peak RSS (CUDA: max allocated) at the last iteration's end
        "rss_after_imports_mb": rss_after_imports_mb,
    }, indent=1))


def run_worker(name: str, cmd: list[str], out: Path, env: dict) -> tuple[dict | None, str]:
    """Run one worker; (result, error text)."""
    print(f"[bench] running {name} ...", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return None, f"{name} worker failed (exit {proc.returncode}):\n{tail}"
    return json.loads(out.read_text()), ""


def trl_python(explicit: str | None, *, venv: str = ".venv-trl", env_var: str = "FASTPPO_TRL_PYTHON",
               trainer: str = "trl.experimental.ppo import PPOTrainer",
               make_target: str = "bench-trl-venv") -> tuple[str | None, str]:
    """(interpreter that imports TRL's `trainer`, its TRL version), or (None, why not)."""
    # Absolute (the probe runs in another directory), but not resolved: a venv's python is a symlink to the base
    # interpreter, which would not see the venv's packages.
    py = os.path.abspath(explicit or os.environ.get(env_var) or str(REPO / venv / "bin" / "python"))
    if not Path(py).exists():
        return None, f"no TRL interpreter at {py} (run `make {make_target}`, or pass --trl-python)"
    probe = subprocess.run([py, "-c", f"import trl; from {trainer}; print(trl.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{py} cannot import {trainer.split()[0]}: {last}"
    return py, probe.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------

def summarize(result: dict, phases: list[str] = PHASES, epochs: int = PPO_EPOCHS) -> dict:
    """Medians over the iterations after the first (warm-up), seconds and tokens/s per phase. Work per phase:
    generated tokens for the rollout, prompt + response tokens for the others, x `epochs` for the update."""
    its = result["iterations"]
    timed = its[1:] or its
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    gen, tokens = med("generated_tokens"), med("total_tokens")
    work = {p: tokens for p in phases + ["iteration"]} | {"rollout": gen, "update": tokens * epochs}
    s = {"timed_iterations": len(timed), "generated_tokens": gen, "total_tokens": tokens,
         "optimizer_steps": med("optimizer_steps"), "peak_memory_mb": result["peak_memory_mb"],
         "rss_after_imports_mb": result["rss_after_imports_mb"]}
    for p in phases + ["iteration"]:
        sec = med(f"{p}_s")
        s[f"{p}_s"], s[f"{p}_tokens_per_s"] = sec, work[p] / max(sec, 1e-9)
    s["other_s"] = statistics.median(r["iteration_s"] - sum(r[f"{p}_s"] for p in phases) for r in timed)
    return s


def print_providers(results: dict[str, dict], summaries: dict[str, dict]) -> None:
    """One line per provider: versions, and the work of one iteration."""
    for name, r in results.items():
        s = summaries[name]
        print(f"  {name}: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}; per iteration "
              f"{s['generated_tokens']:.0f} generated / {s['total_tokens']:.0f} prompt + response tokens, "
              f"{s['optimizer_steps']:.0f} optimizer steps")


def print_table(summaries: dict[str, dict], *, cuda: bool, phases: list[str] = PHASES) -> None:
    """Seconds and tokens/s per phase for each provider; with several, each one's ratio to the last (TRL)."""
    names = list(summaries)
    w = max(14, *(len(n) + 7 for n in names))

    def row(label: str, cells: list[str], values: list[float] | None = None, note: str = "") -> None:
        ratio = "".join(f"{v / values[-1]:>{w - 1}.2f}x" for v in values[:-1]) if values else ""
        print(f"{label:<11}" + "".join(cells) + ratio + note)

    print(f"{'phase':<11}" + "".join(f"{n + ' s':>{w - 2}}{n + ' tok/s':>{w}}" for n in names)
          + "".join(f"{n + '/' + names[-1]:>{w}}" for n in names[:-1]))
    for p in phases + ["iteration"]:
        row(PHASE_LABEL[p], [f"{summaries[n][f'{p}_s']:>{w - 2}.3f}{summaries[n][f'{p}_tokens_per_s']:>{w}.0f}" for n in names],
            [summaries[n][f"{p}_tokens_per_s"] for n in names])
    row("other", [f"{summaries[n]['other_s']:>{w - 2}.3f}{'':>{w}}" for n in names], note="   (logging, metrics, callbacks)")
    peak = [summaries[n]["peak_memory_mb"] for n in names]
    row("peak MB", [f"{v:>{2 * w - 2}.0f}" for v in peak], peak)
    if not cuda:  # the process's RSS before any model exists, and the peak above it
        start = [summaries[n]["rss_after_imports_mb"] for n in names]
        row("  at start", [f"{v:>{2 * w - 2}.0f}" for v in start], note="   (RSS after imports, before the models load)")
        row("  peak-start", [f"{p - s:>{2 * w - 2}.0f}" for p, s in zip(peak, start)], [p - s for p, s in zip(peak, start)])


def parse_comparison_args(ap: argparse.ArgumentParser, worker) -> argparse.Namespace | None:
    """The parsed options; None after running `worker(spec, out)` when this process is a fastppo worker."""
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return None
    if args.iterations < 2:
        ap.error("--iterations must be >= 2 (the first iteration is a warm-up)")
    return args


def comparison_parser(doc: str, trl_help: str) -> argparse.ArgumentParser:
    """The options of a fastppo-vs-TRL benchmark (this one and bench/grpo.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3, help="iterations per framework; the first is a warm-up")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in both runs")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL run")
    ap.add_argument("--trl-python", help=trl_help)
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return ap


def main() -> int:
    ap = comparison_parser(__doc__, "interpreter with trl==1.12.0 (default: .venv-trl/bin/python)")
    ap.add_argument("--old-logprobs", nargs="+", choices=["recompute", "reuse"], default=["recompute"],
                    help="fastppo's rollout.old_logprobs; one fastppo run per value given")
    ap.add_argument("--lengths", choices=("fixed", "longtail"), default="fixed",
                    help="fixed: every response 32 tokens; longtail: seeded long-tailed lengths, fastppo packed and padded")
    ap.add_argument("--engine", nargs="+", choices=["hf", "static"], default=["hf"],
                    help="fastppo's rollout.engine; one fastppo run per value given (static: provider fastppo-static)")
    ap.add_argument("--lora", type=int, nargs="?", const=16, metavar="RANK",
                    help="compare fastppo with LoRA adapters of this rank (default 16) to full fine-tuning, instead of TRL")
    args = parse_comparison_args(ap, fastppo_worker)
    if args is None:
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    if not args.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # both frameworks on the CPU (TRL's accelerate picks CUDA when it sees one)
    dev = device_name(torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_workload(root)
        spec = workload_spec(root, args.iterations, args.device, args.threads)
        if args.lengths == "longtail":
            spec["lengths"] = longtail_lengths(root)
        results, notes = {}, []
        packings = {"": True, "-padded": False} if args.lengths == "longtail" else {"": spec["packing"]}
        runs = [(mode, engine) for engine in dict.fromkeys(args.engine) for mode in dict.fromkeys(args.old_logprobs)]
        for mode, engine in runs:
            for suffix, packed in packings.items():
                name = ("fastppo" if mode == "recompute" else f"fastppo-{mode}") + \
                    ("" if engine == "hf" else f"-{engine}") + suffix
                spec_path = root / f"workload-{name}.json"
                spec_path.write_text(json.dumps({**spec, "packing": packed, "old_logprobs": mode, "engine": engine},
                                                indent=1))
                res, err = run_worker(name, [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path),
                                             str(root / f"{name}.json")], root / f"{name}.json", env)
                if res is None:
                    print(err, file=sys.stderr)
                    return 1
                results[name] = res
        if args.lora:
            (root / "workload-lora.json").write_text(json.dumps({**spec, "lora_rank": args.lora}, indent=1))
            res, err = run_worker(f"fastppo LoRA rank {args.lora}", [sys.executable, str(Path(__file__).resolve()),
                                  "--worker", str(root / "workload-lora.json"), str(root / "lora.json")],
                                  root / "lora.json", env)
            if res is None:
                print(err, file=sys.stderr)
                return 1
            results = {"fastppo-lora": res, **results}   # first: the table's ratios are LoRA / full
            notes.append(f"fastppo-lora: model.lora.rank = model.critic_lora.rank = {args.lora}; TRL not run")
        elif args.no_trl:
            notes.append("TRL comparison skipped (--no-trl)")
        else:
            py, info = trl_python(args.trl_python)
            if py is None:
                notes.append(f"TRL comparison skipped: {info}")
            else:
                spec_trl = {**spec, "output_dir": str(root / "trl-run")}
                (root / "workload-trl.json").write_text(json.dumps(spec_trl, indent=1))
                res, err = run_worker(f"TRL {info}", [py, str(TRL_WORKER), str(root / "workload-trl.json"),
                                                      str(root / "trl.json")], root / "trl.json", env)
                if res is None:
                    notes.append(f"TRL comparison skipped: {err}")
                else:
                    results["trl"] = res

    summaries = {name: summarize(r) for name, r in results.items()}
    print(f"\ntrainer benchmark on {dev}, {args.threads} torch thread(s), "
          f"{next(iter(summaries.values()))['timed_iterations']} timed iteration(s) after 1 warm-up (medians)")
    print(f"workload: {N_PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens"
          f"{' (long-tailed lengths, forced)' if args.lengths == 'longtail' else ''}, hidden {HIDDEN}, "
          f"{LAYERS} layers, vocab {VOCAB}, {PPO_EPOCHS} PPO epochs, minibatch {MINIBATCH}, micro-batch {MICRO}, "
          f"generate/score {ROLLOUT_CHUNK} rows at a time, float32")
    print_providers(results, summaries)
    print()
    print_table(summaries, cuda=args.device.startswith("cuda"))
    mem = "CUDA max allocated" if args.device.startswith("cuda") else "process peak RSS"
    print(f"\ntok/s: rollout = generated tokens / s; score, shape+adv = prompt + response tokens / s; "
          f"update = those x {PPO_EPOCHS} epochs / s; iteration = prompt + response tokens / s of the whole iteration. "
          f"peak MB: {mem}.")
    for name, f in summaries.items():
        if name == "trl" or "trl" not in summaries:
            continue
        t = summaries["trl"]
        speed = f["iteration_tokens_per_s"] / t["iteration_tokens_per_s"]
        print(f"{name} vs TRL: {speed:.2f}x the throughput (goal >= 2x), "
              f"{f['peak_memory_mb'] / t['peak_memory_mb']:.2f}x the peak memory (goal <= 0.6x)")
    if "fastppo-padded" in summaries:
        for other in ("fastppo-padded", "trl"):
            if other in summaries:
                f, o = summaries["fastppo"], summaries[other]
                print(f"fastppo packed vs {other}: score {f['score_tokens_per_s'] / o['score_tokens_per_s']:.2f}x, "
                      f"update {f['update_tokens_per_s'] / o['update_tokens_per_s']:.2f}x the tokens/s, "
                      f"{f['peak_memory_mb'] / o['peak_memory_mb']:.2f}x the peak memory")
    for n in notes:
        print(n)

    rows = []
    for name, s in summaries.items():
        provider = f"{name} longtail" if args.lengths == "longtail" else name   # the CSV's columns stay as they are
        row = {"device": dev, "provider": provider, "threads": args.threads, "iterations": s["timed_iterations"]}
        for p in PHASES + ["iteration"]:
            row[f"{p}_s"], row[f"{p}_tokens_per_s"] = round(s[f"{p}_s"], 4), round(s[f"{p}_tokens_per_s"], 1)
        row.update({"optimizer_steps": s["optimizer_steps"], "peak_memory_mb": round(s["peak_memory_mb"], 1)})
        rows.append(row)
    path = append_csv("trainer", rows)
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
