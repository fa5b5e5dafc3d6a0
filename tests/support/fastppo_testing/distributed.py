"""Multi-process tests on CPU: a torchrun launcher and the workers it starts.

`torchrun(...)` starts `torchrun --nproc_per_node=N` (gloo, a free rendezvous
port, one thread per process) in a scratch directory, and returns its exit code
and output. Workers run as `-m fastppo_testing.distributed <task> ...`:

    train ARGS...        `fastppo train ARGS...`, optionally failing one rank on the first attempt
                         (FASTPPO_TEST_FAULT="rank:iteration:raise|hang"; a hang lasts FASTPPO_TEST_HANG_S)
    update OUT ARGS...   one `ppo_update` on `uneven_experience()` with FSDP-sharded models; writes
                         OUT/rank<R>.pt (losses, full parameters, shard shapes, fused logprobs)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SUPPORT = Path(__file__).resolve().parents[1]


def torchrun(args: list[str], *, cwd: Path, nproc: int = 2, max_restarts: int = 0, timeout: float = 240,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node=nproc <args>`; kill it after `timeout` seconds."""
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe), f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
           f"--max-restarts={max_restarts}", *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(SUPPORT), os.environ.get("PYTHONPATH")) if p),
                **(env or {})}
    Path(cwd).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    proc.wall_s = time.perf_counter() - t0
    return proc


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-12000:]}"


# ----------------------------------------------------------------------------
# A minibatch whose valid tokens fall unevenly on the ranks
# ----------------------------------------------------------------------------

RESPONSE_LENGTHS = (8, 4, 2, 1)
"""Any two rows hold a different number of tokens than the other two: every 2 + 2 split is uneven."""


def uneven_experience(vocab: int, *, seed: int = 0, prompt_width: int = 3):
    """A fixed 4-row Experience (prompt width 3, response width 8) with responses of 8, 4, 2 and 1 tokens."""
    from fastppo.experience import Experience

    g = torch.Generator().manual_seed(seed)
    B, R = len(RESPONSE_LENGTHS), max(RESPONSE_LENGTHS)
    response_mask = torch.arange(R)[None, :] < torch.tensor(RESPONSE_LENGTHS)[:, None]          # (B, R)
    tokens = torch.randint(4, vocab, (B, prompt_width + R), generator=g)
    attention_mask = torch.cat([torch.ones(B, prompt_width, dtype=torch.long), response_mask.long()], 1)
    tokens = torch.where(attention_mask.bool(), tokens, 0)

    def noise(scale):
        return torch.randn(B, R, generator=g) * scale * response_mask

    old_values = noise(0.5)
    advantages = noise(1.0)
    return Experience(
        sequences=tokens, attention_mask=attention_mask, response_mask=response_mask,
        old_logprobs=-(torch.rand(B, R, generator=g) * 3 + 2.5) * response_mask,   # near the tiny models' logprobs
        ref_logprobs=noise(0.0) - 3.0 * response_mask, old_values=old_values, rewards=noise(1.0),
        advantages=advantages, returns=advantages + old_values + noise(0.1), prompt_width=prompt_width,
    )


def run_update(models, cfg, exp) -> dict:
    """One ppo_update of `exp` (fused lm_head on); the logged losses, the full gradients of every optimizer
    step and the full parameters afterwards."""
    from fastppo.metrics import MetricBuffer
    from fastppo.models import response_logprobs
    from fastppo.optim import UpdateCounters, make_optimizer, make_scheduler

    from .trainer import update
    
    kw = dict(prompt_width=exp.prompt_width, temperature=cfg.rollout.temperature, return_entropy=True)
    with torch.no_grad():
        fused = response_logprobs(models.policy, exp.sequences, exp.attention_mask, exp.response_mask, fused=True, **kw)
        plain = response_logprobs(models.policy, exp.sequences, exp.attention_mask, exp.response_mask, fused=False, **kw)
    opts = {name: make_optimizer(getattr(models, name), getattr(cfg.optim, f"{name}_lr"), cfg.optim)
            for name in ("policy", "critic")}
    scheds = {name: make_scheduler(opt, cfg.optim, 10) for name, opt in opts.items()}
    grads: list[dict[str, torch.Tensor]] = []                  # the gradients each optimizer step applies

    def record_grads(name):
        names = {id(p): n for n, p in getattr(models, name).named_parameters()}
        return lambda opt, *_: grads.append({f"{name}.{names[id(p)]}": _full(p.grad) for g in opt.param_groups
                                             for p in g["params"] if p.grad is not None})

    for name, opt in opts.items():
        opt.register_step_pre_hook(record_grads(name))
    buf = MetricBuffer()
    torch.manual_seed(0)                                                       # the minibatch shuffle
    update(exp, policy=models.policy, critic=models.critic, policy_opt=opts["policy"], critic_opt=opts["critic"],
               policy_sched=scheds["policy"], critic_sched=scheds["critic"], cfg=cfg, train_policy=True, fused=True,
               ptx_batches=None, counters=UpdateCounters(), metrics=buf)
    return {"metrics": buf.flush(), "fused_logprobs": fused.logprobs, "plain_logprobs": plain.logprobs,
            "fused_entropy": fused.entropy, "grads": grads,
            "params": {f"{name}.{k}": _full(p) for name in ("policy", "critic")
                       for k, p in getattr(models, name).named_parameters()}}


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def shard_layout(model) -> list[tuple[str, tuple, tuple, str]]:
    """(name, global shape, local shape, placements) of every parameter."""
    from torch.distributed.tensor import DTensor

    out = []
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out.append((name, tuple(p.shape), tuple(p.to_local().shape), str(p.placements)))
        else:
            out.append((name, tuple(p.shape), tuple(p.shape), "not sharded"))
    return out


# ----------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------

def _update_worker(out_dir: str, overrides: list[str]) -> None:
    from fastppo import dist
    from fastppo import parallel
    from fastppo.config import load_config
    from fastppo.models import load_models

    cfg = load_config(None, overrides)
    device = torch.device("cpu")
    dist.setup("auto", "gloo", 60, device)
    sharder = parallel.Sharder(parallel.build_mesh(1, device), device=device, param_dtype=None, reduce_dtype=torch.float32,
                           offload_frozen=False, reshard_after_forward=True)
    models = load_models(cfg.model, device, shard=sharder)
    exp = uneven_experience(len(models.tokenizer))
    layout = {name: shard_layout(getattr(models, name)) for name in ("policy", "ref", "critic", "reward")}
    result = run_update(models, cfg, exp)
    share = cfg.ppo.minibatch_size // dist.world_size()
    torch.manual_seed(0)
    rows = torch.randperm(len(exp))[dist.rank() * share:(dist.rank() + 1) * share]   # the rows ppo_update gave this rank
    result.update(layout=layout, local_tokens=int(exp.response_mask[rows].sum()), rank=dist.rank())
    torch.save(result, Path(out_dir) / f"rank{dist.rank()}.pt")
    dist.teardown()


def _train_worker(args: list[str]) -> int:
    """`fastppo train args` with an injected fault on the first attempt (torchrun restarts get none)."""
    fault = os.environ.get("FASTPPO_TEST_FAULT")
    if fault and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        fault_rank, fault_iteration, mode = fault.split(":")
        if int(os.environ["RANK"]) == int(fault_rank):
            import fastppo.engine as engine_module    # where the trainer's engine calls generate

            real_generate, calls = engine_module.generate, []

            def faulty_generate(*a, **kw):
                calls.append(1)
                if len(calls) == int(fault_iteration):
                    if mode == "hang":  # like a rank stuck in a collective: it returns (with an error) much later
                        time.sleep(float(os.environ.get("FASTPPO_TEST_HANG_S", "3600")))
                    raise RuntimeError(f"injected fault on rank {fault_rank} at iteration {fault_iteration}")
                return real_generate(*a, **kw)

            engine_module.generate = faulty_generate
    from fastppo.cli import main

    return main(["train", *args])


if __name__ == "__main__":
    task, rest = sys.argv[1], sys.argv[2:]
    if task == "update":
        _update_worker(rest[0], rest[1:])
    elif task == "train":
        sys.exit(_train_worker(rest))
    else:
        raise SystemExit(f"unknown task {task!r}")
