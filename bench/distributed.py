"""FSDP2 and torchrun: generation with the policy gathered once vs per token, and 1 vs N processes.

    .venv/bin/python bench/distributed.py [--nproc 2] [--hidden 256] [--layers 8] [--new-tokens 32]

Everything runs on whatever device torch sees (CPU + gloo here; CUDA + nccl on a GPU machine, one
GPU per process). A small Llama policy and reward model are built from config in a scratch
directory (no downloads).

1. generation: N processes shard the policy with FSDP2 and time `rollout.generate` of a batch of
   prompts per rank, (a) inside `parallel.unsharded` (one all-gather of the whole policy for the whole
   generation, the trainer's default) and (b) without it (FSDP re-gathers every block for every
   token: layers x new tokens all-gathers); (c) one process with the unsharded model for reference.
2. trainer: wall time of the same `fastppo train` run (global rollout batch of N x batch, 3
   iterations) in one process and with torchrun --nproc_per_node=N, and the mean time per iteration
   after the first. Each of the N processes runs 1 thread; the single process runs --threads.

Rows go to bench/results/distributed.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def build_models(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    """Policy (causal LM) and reward model (sequence classification) from config, plus prompts."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fastppo.demos.synthetic import build_tokenizer, make_prompts, tiny_llama_config, write_jsonl

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_llama_config(len(tok), hidden_size=hidden, layers=layers, heads=max(4, hidden // 64))
    cfg.max_position_embeddings = 512
    paths = {}
    for name, cls, extra in (("policy", AutoModelForCausalLM, {}), ("reward", AutoModelForSequenceClassification,
                                                                     {"num_labels": 1})):
        for k, v in extra.items():
            setattr(cfg, k, v)
        model = cls.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    paths["prompts"] = write_jsonl(root / "prompts.jsonl", make_prompts(256, seed=0))
    return paths


# ----------------------------------------------------------------------------
# 1. generation (worker, started by torchrun or as one plain process)
# ----------------------------------------------------------------------------

def generation_worker(args) -> None:
    from transformers import AutoModelForCausalLM

    from fastppo import dist

    from fastppo import parallel
    from fastppo.config import RolloutConfig
    from fastppo.data import collate_prompts, load_prompts
    from fastppo.models import load_tokenizer
    from fastppo.rollout import generate

    device = dist.resolve_device("auto")
    dist.setup("auto", "auto", 600, device)
    torch.manual_seed(0)
    tok = load_tokenizer(str(args.root / "policy"))
    policy = AutoModelForCausalLM.from_pretrained(args.root / "policy").eval().requires_grad_(False)
    if dist.world_size() > 1:
        sharder = parallel.Sharder(parallel.build_mesh(1, device), device=device,
                               param_dtype=torch.bfloat16 if device.type == "cuda" else None,
                               reduce_dtype=torch.float32, offload_frozen=False, reshard_after_forward=True)
        policy = sharder(policy, "policy", trained=True)
    else:
        policy.to(device)
    prompts = load_prompts(args.root / "prompts.jsonl", tok, field="prompt", prompt_format="plain", max_len=64)
    batch = collate_prompts(prompts[: args.batch], tok.pad_token_id)
    # Never stop early at EOS: every provider generates exactly new_tokens tokens.
    rc = RolloutConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0)

    def run(unshard: bool):
        with parallel.unsharded(policy, enabled=unshard):
            return generate(policy, batch, rc, eos_id=-1 % len(tok), pad_id=tok.pad_token_id,
                            generation_batch_size=args.batch, seed=0)

    results = {}
    modes = ({"unshard once": True, "per-token all-gather": False} if dist.world_size() > 1
             else {f"1 process x {torch.get_num_threads()} thread(s)": False})
    for name, unshard in modes.items():
        run(unshard)                                                            # warm-up
        times = []
        for _ in range(args.rep):
            dist.barrier()
            t0 = time.perf_counter()
            out = run(unshard)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        slowest = dist.all_reduce(torch.tensor(times, dtype=torch.float64, device=device), "max").tolist()
        results[name] = {"s": statistics.median(slowest), "tokens": int(out.response_mask.sum()) * dist.world_size()}
    if dist.is_main():
        (args.out / f"generation_{dist.world_size()}.json").write_text(json.dumps(results))
    dist.teardown()


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------

def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def _torchrun(nproc: int, argv: list[str], threads: int) -> float:
    exe = Path(sys.executable).with_name("torchrun")
    t0 = time.perf_counter()
    subprocess.run([str(exe), f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
                    *argv], check=True, env=_env(threads), capture_output=True)
    return time.perf_counter() - t0


def _train(paths: dict, out: Path, args, nproc: int, threads: int) -> dict:
    overrides = [f"model.policy_path={paths['policy']}", f"model.reward_path={paths['reward']}",
                 f"data.prompt_path={paths['prompts']}", "data.max_prompt_len=32",
                 f"rollout.rollout_batch_size={args.batch * args.nproc}", f"rollout.max_new_tokens={args.new_tokens}",
                 f"ppo.minibatch_size={args.batch * args.nproc}", "ppo.micro_batch_size=4",
                 "ppo.critic_warmup_steps=0", f"run.output_dir={out}", "run.iterations=3", "run.save_every=0",
                 "run.export_at_end=false", "run.progress_bar=false", "run.tensorboard=false", "run.log_level=WARNING"]
    if nproc == 1:
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("fastppo")), "train", *overrides], check=True,
                       env=_env(threads), capture_output=True)
        wall = time.perf_counter() - t0
    else:
        wall = _torchrun(nproc, ["-m", "fastppo.cli", "train", *overrides], threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = records[1:]
    return {"wall_s": wall, "iteration_s": statistics.mean(r["time/iteration_s"] for r in later),
            "rollout_s": statistics.mean(r["time/rollout_s"] for r in later),
            "update_s": statistics.mean(r["time/update_s"] for r in later)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="prompts per rank")
    p.add_argument("--rep", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="threads of the one-process runs (each of the N processes always gets 1); more than one "
                        "thread per core collapses under CPU contention (OpenMP spin-waits)")
    p.add_argument("--worker", choices=["generation"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "generation":
        return generation_worker(args)

    sys.path.insert(0, str(HERE))
    from common import append_csv, bench_device, device_name

    device = bench_device()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_models(root, args.hidden, args.layers)
        n_params = sum(v.numel() for v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(paths["policy"] / "model.safetensors")).values())
        worker = [str(Path(__file__).resolve()), "--worker", "generation", "--root", str(root), "--out", str(root),
                  "--hidden", str(args.hidden), "--layers", str(args.layers), "--new-tokens", str(args.new_tokens),
                  "--batch", str(args.batch), "--rep", str(args.rep)]
        _torchrun(args.nproc, worker, threads=1)
        subprocess.run([sys.executable, *worker], check=True, env=_env(args.threads), capture_output=True)
        gen = {**json.loads((root / f"generation_{args.nproc}.json").read_text()),
               **json.loads((root / "generation_1.json").read_text())}
        train = {f"1 process x {args.threads} thread(s)": _train(paths, root / "t1", args, 1, args.threads),
                 f"{args.nproc} processes x 1 thread": _train(paths, root / "t2", args, args.nproc, 1)}

    common = {"device": device_name(device), "nproc": args.nproc, "params": n_params, "layers": args.layers,
              "hidden": args.hidden, "new_tokens": args.new_tokens, "batch_per_rank": args.batch}
    rows = [{**common, "what": "generation", "provider": k, "s": round(v["s"], 4),
             "tokens_per_s": round(v["tokens"] / v["s"], 1)} for k, v in gen.items()]
    rows += [{**common, "what": f"train {k}", "provider": prov, "s": round(v[k], 4), "tokens_per_s": ""}
             for prov, v in train.items() for k in ("wall_s", "iteration_s", "rollout_s", "update_s")]
    path = append_csv("distributed", rows)
    print(f"policy: {n_params / 1e6:.2f}M parameters, {args.layers} layers; {args.batch} prompts per rank, "
          f"{args.new_tokens} new tokens; {device_name(device)}")
    for r in rows:
        extra = f"  ({r['tokens_per_s']} tok/s)" if r["tokens_per_s"] != "" else ""
        print(f"{r['what']:<22} {r['provider']:<28} {r['s']:8.3f} s{extra}")
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
