"""What the stages before PPO (`fastppo sft`, `fastppo train-rm`) share: run set-up, the training loop, the export,
and their command line.

Each stage trains one model with AdamW (`optim`), one optimizer step per run.batch_size items, accumulated over
micro-batches; writes metrics to metrics.jsonl and TensorBoard; evaluates on held-out data; and exports a plain
Hugging Face model to <output_dir>/export.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import dist, lora
from .checkpoint import export_hf
from .config import StageModelConfig, StageRunConfig, load_config, to_yaml
from .logs import progress, seed_everything, setup_logging
from .metrics import MetricBuffer, MetricWriter
from .models import torch_dtype, grow_embeddings, attn_implementation, check_model_source, ensure_pad_token, load_tokenizer
from .optim import Trained, UpdateCounters, optimizer_step

log = logging.getLogger("fastppo")


def setup_stage_run(cfg, what: str) -> tuple[Path, torch.device]:
    """Seed everything, create the run directory, log to it, save the resolved config, pick the device."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, cfg.run.log_level)  # console + <run dir>/train.log, as `train`
    seed_everything(cfg.run.seed)
    (out / "config.yaml").write_text(to_yaml(cfg))  # to_yaml works for any config dataclass
    device = dist.resolve_device(cfg.run.device, cfg.run.backend)
    log.info("%s: run directory %s, device %s", what, out, device)
    return out, device


def load_stage_tokenizer(mc: StageModelConfig):
    """The model's tokenizer with a pad token distinct from EOS."""
    check_model_source(mc.path, "model.path", mc.trust_remote_code)
    tokenizer = load_tokenizer(mc.path, trust_remote_code=mc.trust_remote_code, field="model.path")
    ensure_pad_token(tokenizer)
    return tokenizer


def model_kwargs(mc: StageModelConfig) -> dict:
    attn = attn_implementation(mc.attn_implementation, compute_dtype=torch_dtype(mc.dtype), fields="model.dtype")
    return dict(dtype=torch_dtype(mc.dtype), attn_implementation=attn, trust_remote_code=mc.trust_remote_code)


def prepare_model(model: nn.Module, tokenizer, mc: StageModelConfig, device: torch.device, what: str, *,
                  classifier: bool = False) -> nn.Module:
    """Grow embeddings for an added pad token, record pad/EOS ids in the config, move to device; with model.lora,
    add the adapters (`lora.apply`; classifier: a sequence classifier, whose scalar head then trains in full)."""
    grow_embeddings(model, len(tokenizer), what)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if mc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = model.to(device)
    if mc.lora is not None:
        lora.apply(model, mc.lora, field="model.lora", classifier=classifier)
    return model


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random split with at least one held-out item when fraction > 0."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(items) - 1, max(1, round(fraction * len(items))))
    return [items[i] for i in perm[n_eval:]], [items[i] for i in perm[:n_eval]]


def total_steps(n_train: int, run: StageRunConfig) -> int:
    if run.max_steps is not None:
        return run.max_steps
    return max(1, math.ceil(run.epochs * n_train / run.batch_size))


def step_batches(n: int, run: StageRunConfig, *, shuffle: bool) -> Iterator[list[int]]:
    """Index lists of run.batch_size items, endlessly, reshuffled every epoch (global torch RNG, seeded)."""
    while True:
        order = torch.randperm(n).tolist() if shuffle else list(range(n))
        for start in range(0, n - run.batch_size + 1, run.batch_size):
            yield order[start:start + run.batch_size]
        if n < run.batch_size:  # fewer items than a batch: draw with wrap-around
            yield [order[i % n] for i in range(run.batch_size)]


@dataclass
class StageResult:
    """What a stage returns: where things are and the held-out metrics at the end."""
    run_dir: Path
    export_dir: Path
    eval_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    """Every logged record (also in metrics.jsonl)."""
    seconds: float = 0.0


STAGE_ADVICE = "Lower optim.lr or set optim.max_grad_norm."
"""What a stage's non-finite abort suggests changing."""


def stage_loop(what: str, *, out: Path, run: StageRunConfig, n_steps: int, n_items: int, shuffle: bool,
               trained: Trained, max_grad_norm: float | None,
               step_loss: Callable[[list[int], MetricBuffer], torch.Tensor],
               evaluate: Callable[[], dict[str, float]] | None, shown: dict[str, str],
               on_step: Callable[[int, dict], None] | None) -> tuple[dict[str, float], list[dict]]:
    """The training loop of a stage (sft, train-rm): n_steps optimizer steps, then (eval metrics, history).

    Each step, `step_loss(indices, metrics)` runs the forward and backward passes of run.batch_size training
    items (indices into them, reshuffled every epoch when `shuffle`), adds its own metrics and returns the
    step's loss (detached); `ppo.optimizer_step` then clips, checks finiteness and steps (or skips; after
    run.max_nonfinite_in_a_row skipped steps in a row, NonFiniteError). Every run.log_every steps and at the
    end a metrics record goes to metrics.jsonl / TensorBoard and `on_step`; `evaluate` (None: no held-out
    data) runs every run.eval_every steps and at the end. `shown`: progress-bar name -> record key.
    """
    writer = MetricWriter(out, tensorboard=run.tensorboard)
    metrics = MetricBuffer()
    counters = UpdateCounters()
    history: list[dict] = []
    eval_metrics: dict[str, float] = {}
    batches = step_batches(n_items, run, shuffle=shuffle)
    bar = progress(n_steps, what, run.progress_bar)
    try:
        for step in range(1, n_steps + 1):
            loss = step_loss(next(batches), metrics)
            optimizer_step(loss, [trained], max_grad_norm=max_grad_norm, counters=counters,
                           max_nonfinite_in_a_row=run.max_nonfinite_in_a_row, metrics=metrics, advice=STAGE_ADVICE)
            last = step == n_steps
            record = None
            if step % run.log_every == 0 or last:
                record = {**metrics.flush(), "lr": trained.sched.get_last_lr()[0],
                          "skipped_steps": float(counters.skipped_steps)}
            if evaluate is not None and ((run.eval_every and step % run.eval_every == 0) or last):
                eval_metrics = evaluate()
                record = {**(record or {}), **eval_metrics}
            if record is not None:
                writer.write(step, record)
                history.append({"step": step, **record})
                values = {**eval_metrics, **record}
                bar.set_postfix(refresh=False, **{name: f"{values[key]:.3f}" for name, key in shown.items()
                                                  if key in values})
                if on_step is not None:
                    on_step(step, record)
            bar.update(1)
    finally:
        bar.close()
        writer.close()
    return eval_metrics, history


def export_stage(what: str, model: nn.Module, tokenizer, out: Path, t0: float, eval_metrics: dict[str, float],
                 history: list[dict], *, adapter_only: bool = False) -> StageResult:
    """A stage's last phase: the trained model (eval mode; LoRA merged, or the adapter alone with adapter_only)
    and tokenizer exported to <out>/export; its result."""
    model.eval()
    export_dir = export_hf(model, tokenizer, out / "export", adapter_only=adapter_only)
    seconds = time.perf_counter() - t0
    log.info("%s done in %.1fs: exported to %s", what, seconds, export_dir)
    return StageResult(out, export_dir, eval_metrics, history, seconds)


class OneConfigFile(argparse.Action):
    """--config: one YAML file. A second one is refused: it would replace the first, not layer on it."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, f"given twice ({getattr(namespace, self.dest)}, {value}): give one "
                                               "file, and the settings to change on top of it as key=value overrides")
        setattr(namespace, self.dest, value)


def add_stage_arguments(p) -> None:
    """--config and dotted overrides, shared by sft and train-rm (and a hidden --preset, which the config loader
    refuses for them with its reason)."""
    p.add_argument("--config", "-c", type=Path, action=OneConfigFile, help="YAML config file (layered on the defaults)")
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted config overrides, e.g. model.path=runs/init data.train_path=sft.jsonl optim.lr=1e-5")


def print_stage_result(what: str, result: StageResult) -> None:
    shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in result.eval_metrics.items())
    print(f"fastppo {what}: done in {result.seconds:.1f}s; run dir {result.run_dir}; export {result.export_dir}"
          + (f"; held-out: {shown}" if shown else ""))


def stage_command(what: str, schema: type, stage: Callable[[Any], StageResult]) -> Callable[[Any], int]:
    """The run(args) of a stage's subcommand: its config (--config, overrides) loaded as `schema`, the stage run
    on it, its result printed."""
    def run(args) -> int:
        print_stage_result(what, stage(load_config(args.config, list(args.overrides), args.preset, schema=schema)))
        return 0
    return run
