"""What the demos share: their folder, their stages (timed, stoppable, resumable) and the overrides every stage
of a demo takes."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import list_checkpoints
from ..metrics import read_metrics
from ..run_dir import LOCK_NAME, RunDirError, held_locks


@dataclass
class TinyPlan:
    """What the demos share: the tiny Llama's shape and its SFT schedule."""
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    sft_epochs: float = 2.0
    sft_lr: float = 3e-3
    rollout_engine: str = "hf"
    """rollout.engine of the PPO / GRPO stage (`fastppo demo --engine`)."""


@dataclass
class GRPOPlan(TinyPlan):
    """What the GRPO demos share: the schedule of the RL stage (the grpo preset keeps its algorithmic knobs)."""
    n_sft: int = 3000
    n_prompts: int = 1024
    n_eval_prompts: int = 256
    iterations: int = 60
    policy_lr: float = 1e-3
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    minibatch_size: int = 64
    max_new_tokens: int = 6


def run_overrides(out_dir: Path, seed: int, progress_bar: bool) -> list[str]:
    """The `run.*` overrides of every demo stage."""
    return [f"run.output_dir={out_dir}", f"run.seed={seed}", "run.device=cpu",
            f"run.progress_bar={str(progress_bar).lower()}", "run.log_level=WARNING"]


def sft_overrides(init: Path, data: Path, out_dir: Path, plan: TinyPlan, seed: int, progress_bar: bool) -> list[str]:
    """`fastppo sft` of a demo: the tiny model at `init` on the examples at `data`, by the plan's schedule."""
    return [f"model.path={init}", f"data.train_path={data}", "data.eval_fraction=0.05", f"optim.lr={plan.sft_lr}",
            "optim.warmup_steps=10", f"run.epochs={plan.sft_epochs}", "run.batch_size=32", "run.micro_batch_size=32",
            "run.eval_every=25", *run_overrides(out_dir, seed, progress_bar)]


def grpo_overrides(policy: Path, prompts: Path, out_dir: Path, plan: GRPOPlan, seed: int, progress_bar: bool,
                   resume: bool) -> list[str]:
    """`fastppo train --preset grpo` of a demo: the SFT policy on `prompts`, scored by `math_answer`."""
    return [f"model.policy_path={policy}", "model.reward_path=null", f"data.prompt_path={prompts}",
            "reward.functions=[{name: 'fastppo.rewards:math_answer', weight: 1.0}]", "reward.function_workers=2",
            f"optim.policy_lr={plan.policy_lr}", f"run.iterations={plan.iterations}", "run.save_every=0",
            "run.keep_last=1", f"rollout.rollout_batch_size={plan.prompts_per_iteration}",
            f"rollout.n_samples_per_prompt={plan.samples_per_prompt}", f"rollout.max_new_tokens={plan.max_new_tokens}",
            f"ppo.minibatch_size={plan.minibatch_size}", f"ppo.micro_batch_size={plan.minibatch_size}",
            # One right answer in a fixed format: a converged policy is nearly deterministic (docs/monitoring.md).
            "health.entropy_floor=0.01", f"rollout.engine={plan.rollout_engine}",
            *run_overrides(out_dir, seed, progress_bar), *(["run.resume=latest"] if resume else [])]


class DemoStopped(KeyboardInterrupt):
    """A demo stopped by SIGTERM or Ctrl-C; the message names the stage and the command that continues it."""


class Stages:
    """A demo's stages, run in order and timed (`seconds`), stoppable and resumable.

    `run(name, fn, done=..., run_dir=...)` runs `fn(resume)`. With `resume` (`fastppo demo --resume`) a stage
    whose `done` file exists (its export's config.json) is kept; one whose `run_dir` holds a checkpoint continues
    from it (fn(True): `train` with run.resume=latest); any other starts afresh in an emptied `run_dir` (sft and
    train-rm take seconds here). SIGTERM, Ctrl-C, or a `train` that stopped early on one of them (its result says
    `interrupted`, with a checkpoint saved) raise DemoStopped: the later stages never read a missing export.
    """

    def __init__(self, out: Path, *, resume: bool, echo) -> None:
        self.out, self.resume, self.echo = out, resume, echo
        self.seconds: dict[str, float] = {}
        self.t_all = time.perf_counter()
        self.current, self.last = None, None                 # the stage running, the last one done
        self._old = None

    def stopped(self, why: str) -> DemoStopped:
        where = (f"during its {self.current} stage" if self.current else
                 f"after its {self.last} stage" if self.last else "before its first stage")
        return DemoStopped(f"the demo stopped {where} ({why}); continue it with "
                           f"`fastppo demo --resume --output-dir {self.out}`")

    def _on_sigterm(self, signum, frame) -> None:
        raise self.stopped("SIGTERM")

    def __enter__(self) -> "Stages":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        if exc_type is KeyboardInterrupt:                     # Ctrl-C in a stage without its own handler
            raise self.stopped("Ctrl-C") from None

    def run(self, name: str, fn, *, done: Path | None = None, run_dir: Path | None = None):
        if self.resume and done is not None and done.exists():
            self.echo(f"[demo] {name:<10} kept from the earlier run")
            return None
        resumable = bool(self.resume and run_dir is not None and list_checkpoints(run_dir))
        if run_dir is not None and run_dir.exists() and not resumable:
            shutil.rmtree(run_dir)
        self.current = name
        t0 = time.perf_counter()
        result = fn(resumable)
        if getattr(result, "interrupted", False):
            raise self.stopped("a stop signal; its checkpoint is saved")
        self.seconds[name] = time.perf_counter() - t0
        self.current, self.last = None, name
        self.echo(f"[demo] {name:<10} done in {self.seconds[name]:6.1f}s  (total {time.perf_counter() - self.t_all:6.1f}s)")
        return result


DEMO_MARKER = "demo_plan.json"


def replace_earlier_demo(out: Path, echo=print) -> None:
    """The demo owns its folder: an earlier demo there is replaced (each stage refuses a used run folder), but a
    folder holding anything else is left alone."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file, not a folder: choose another --output-dir")
    if not out.exists() or all(p.name == LOCK_NAME for p in out.iterdir()):
        return
    if not (out / DEMO_MARKER).is_file():
        raise RunDirError(f"--output-dir {out} is not empty and holds no earlier demo ({DEMO_MARKER}); "
                          "choose an empty or new folder")
    if held := held_locks(out):
        raise RunDirError(f"--output-dir {out} is in use by a running demo or stage (it holds {held[0]}): wait for "
                          "it to finish or choose another folder")
    echo(f"[demo] replacing the earlier demo in {out}")
    shutil.rmtree(out)


def read_last_eval(run_dir: Path) -> dict:
    """A stage's held-out metrics at its end (`eval/*` of its last record holding them), read back from its
    metrics.jsonl: the same whether the stage ran now or in the demo this one resumes."""
    evals = [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]
    return {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")}
