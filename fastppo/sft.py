"""`fastppo sft`: supervised fine-tuning of a causal LM, loss on response tokens only.

Records are {prompt, response} (prompt: text or chat messages) or
{messages: [...]} whose last turn is the assistant's response; EOS is
appended to every response (`data.load_sft`). The loss is the token mean of
−log π(y_t | y_<t) over the response tokens of a whole optimizer step (all
micro-batches), the same loss as PPO's ptx term (`ppo.ptx_loss`), computed
through the fused `linear_token_logprobs` on the backbone's hidden states and
the lm_head weight, so the (B, L, V) logits are never materialised.

The machinery is `train`'s: OmegaConf config with the resolved copy saved in
the run directory, AdamW + warmup/decay schedule (`ppo.make_optimizer`,
`ppo.make_scheduler`), metrics to metrics.jsonl and TensorBoard
(`metrics.MetricWriter`), and the atomic Hugging Face export
(`checkpoint.export_hf`) to `<output_dir>/export`.

    run dir/
      config.yaml  metrics.jsonl  tensorboard/  export/   (export: AutoModelForCausalLM)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm
from tqdm.auto import tqdm as tqdm_auto
from transformers import AutoModelForCausalLM

from . import dist, lora
from .checkpoint import export_hf
from .config import SFTConfig, StageModelConfig, StageRunConfig, load_config, to_yaml
from .data import SFTExample, collate_sft, load_sft
from .logs import seed_everything, setup_logging
from .metrics import MetricBuffer, MetricWriter
from .models import (IGNORE_INDEX, _dtype, _grow_embeddings, attn_implementation, check_model_source, ensure_pad_token,
                     fused_lm_head_supported, load_pretrained, load_tokenizer)
from .ppo import Trained, UpdateCounters, make_optimizer, make_scheduler, optimizer_step, ptx_loss
from .run_dir import claimed_stage

log = logging.getLogger("fastppo")


# ----------------------------------------------------------------------------
# Shared by the stages (sft, train-rm)
# ----------------------------------------------------------------------------

def setup_stage_run(cfg, what: str) -> tuple[Path, torch.device]:
    """Seed everything, create the run directory, log to it, save the resolved config, pick the device."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, cfg.run.log_level)  # console + <run dir>/train.log, as `train`
    seed_everything(cfg.run.seed)
    (out / "config.yaml").write_text(to_yaml(cfg))  # to_yaml works for any config dataclass
    device = dist.resolve_device(cfg.run.device)
    log.info("%s: run directory %s, device %s", what, out, device)
    return out, device


def load_stage_tokenizer(mc: StageModelConfig):
    """The model's tokenizer with a pad token distinct from EOS."""
    check_model_source(mc.path, "model.path")
    tokenizer = load_tokenizer(mc.path, trust_remote_code=mc.trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


def model_kwargs(mc: StageModelConfig) -> dict:
    attn = attn_implementation(mc.attn_implementation, compute_dtype=_dtype(mc.dtype), fields="model.dtype")
    return dict(dtype=_dtype(mc.dtype), attn_implementation=attn, trust_remote_code=mc.trust_remote_code)


def prepare_model(model: nn.Module, tokenizer, mc: StageModelConfig, device: torch.device, what: str, *,
                  classifier: bool = False) -> nn.Module:
    """Grow embeddings for an added pad token, record pad/EOS ids in the config, move to device; with model.lora,
    add the adapters (`lora.apply`; classifier: a sequence classifier, whose scalar head then trains in full)."""
    _grow_embeddings(model, len(tokenizer), what)
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


PROGRESS_LOG_INTERVAL_S = 30.0
"""Without a terminal, a progress line is logged at most this often (and at every step when steps are slower)."""


class _ProgressLog:
    """A file for tqdm that logs each line it draws (through the `fastppo` logger: console and train.log)."""

    def write(self, text: str) -> None:
        if text.strip():
            log.info(text.strip())

    def flush(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    """A tqdm bar on a terminal. When stderr is not one (a log file, a pipe, a batch job), no bar: one progress
    line (steps, elapsed/remaining, rate and the postfix) every PROGRESS_LOG_INTERVAL_S seconds instead, or at
    every step when steps are slower. Callers set the postfix with refresh=False (a refresh draws a line).
    """
    enabled = enabled and dist.is_main()
    bar = tqdm_auto(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                    disable=None if enabled else True)             # None: tqdm disables itself off a terminal
    if not enabled or not bar.disable:
        return bar
    return tqdm(total=total, initial=initial, desc=desc, file=_ProgressLog(), mininterval=PROGRESS_LOG_INTERVAL_S,
                miniters=1, bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")


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


# ----------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------

def load_sft_examples(cfg: SFTConfig, tokenizer) -> tuple[list[SFTExample], list[SFTExample]]:
    d = cfg.data
    kw = dict(prompt_field=d.prompt_field, response_field=d.response_field, messages_field=d.messages_field,
              max_len=d.max_len)
    train = load_sft(d.train_path, tokenizer, **kw)
    if d.eval_path is not None:
        return train, load_sft(d.eval_path, tokenizer, **kw)
    return split_held_out(train, d.eval_fraction, cfg.run.seed)


@torch.no_grad()
def evaluate_lm(model: nn.Module, examples: list[SFTExample], *, pad_id: int, batch_size: int, device: torch.device,
                fused: bool, backend: str | None, chunk_size: int | None, packed: bool = False) -> dict[str, float]:
    """Held-out token-mean NLL of the responses and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(examples), batch_size):
        batch = _to(collate_sft(examples[start:start + batch_size], pad_id), device)
        n = int((batch.labels != IGNORE_INDEX).sum())
        total += ptx_loss(model, batch, fused=fused, backend=backend, chunk_size=chunk_size,
                          packed=packed).double().cpu() * n
        count += n
    model.train(was_training)
    nll = float(total / max(count, 1))
    return {"eval/loss": nll, "eval/perplexity": math.exp(min(nll, 50.0)), "eval/tokens": float(count)}


def _to(batch, device: torch.device):
    return type(batch)(*(t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels)))


@claimed_stage  # locks run.output_dir, refuses one holding a run or an export over model.path
def sft(cfg: SFTConfig, *, on_step: Callable[[int, dict], None] | None = None) -> StageResult:
    """Fine-tune cfg.model.path on cfg.data; export to <output_dir>/export. The Python API of `fastppo sft`."""
    t0 = time.perf_counter()
    out, device = setup_stage_run(cfg, "sft")
    run = cfg.run

    # 1. Tokenizer, model, data.
    tokenizer = load_stage_tokenizer(cfg.model)
    model = load_pretrained(AutoModelForCausalLM, cfg.model.path, field="model.path",
                            expected="sft fine-tunes a causal LM (AutoModelForCausalLM)", **model_kwargs(cfg.model))
    model = prepare_model(model, tokenizer, cfg.model, device, "sft model")
    reason = fused_lm_head_supported(model)
    fused = reason is None
    if not fused:
        log.warning("fused lm_head logprobs disabled (%s): using full logits + token_logprobs", reason)
    train_ex, eval_ex = load_sft_examples(cfg, tokenizer)
    n_steps = total_steps(len(train_ex), run)
    log.info("sft: %d training examples, %d held out, %d optimizer steps", len(train_ex), len(eval_ex), n_steps)

    opt = make_optimizer(model, cfg.optim.lr, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, n_steps)

    def step_loss(idx: list[int], metrics: MetricBuffer) -> torch.Tensor:
        # 2. One optimizer step: micro-batches accumulate a step-wide token mean.
        examples = [train_ex[i] for i in idx]
        micro = [_to(collate_sft(examples[s:s + run.micro_batch_size], tokenizer.pad_token_id), device)
                 for s in range(0, len(examples), run.micro_batch_size)]
        counts = [(b.labels != IGNORE_INDEX).sum() for b in micro]
        step_tokens = dist.all_reduce(torch.stack(counts).sum().float()).clamp(min=1)
        total = torch.zeros((), device=device)
        for b, n in zip(micro, counts):
            # ptx_loss is the micro-batch token mean; rescale it to the step-wide mean
            # (the token-mean normaliser of docs/training.md).
            loss = ptx_loss(model, b, fused=fused, backend=run.backend, chunk_size=cfg.model.lm_head_chunk_size,
                            packed=run.packing) * (dist.all_reduce(n.float()) / step_tokens)
            loss.backward()
            total += loss.detach()
        metrics.add_dict({"loss/sft": total, "tokens": step_tokens})
        return total

    eval_kw = dict(pad_id=tokenizer.pad_token_id, batch_size=run.eval_batch_size, device=device, fused=fused,
                   backend=run.backend, chunk_size=cfg.model.lm_head_chunk_size, packed=run.packing)
    model.train()
    eval_metrics, history = stage_loop(
        "sft", out=out, run=run, n_steps=n_steps, n_items=len(train_ex), shuffle=cfg.data.shuffle,
        trained=Trained("", model, opt, sched), max_grad_norm=cfg.optim.max_grad_norm, step_loss=step_loss,
        evaluate=(lambda: evaluate_lm(model, eval_ex, **eval_kw)) if eval_ex else None,  # 3. held-out NLL
        shown={"loss": "loss/sft", "eval_loss": "eval/loss"}, on_step=on_step)

    return export_stage("sft", model, tokenizer, out, t0, eval_metrics, history,       # 4. AutoModelForCausalLM
                        adapter_only=run.export_adapter)


# ----------------------------------------------------------------------------
# Command line: `fastppo sft --config sft.yaml [key.sub=value ...]` (registered by cli.PLUGINS)
# ----------------------------------------------------------------------------

def add_stage_arguments(p) -> None:
    """--config and dotted overrides, shared by sft and train-rm."""
    p.add_argument("--config", "-c", type=Path, help="YAML config file (layered on the defaults)")
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
        print_stage_result(what, stage(load_config(args.config, list(args.overrides), schema=schema)))
        return 0
    return run


def register_cli(register) -> None:
    register("sft", "supervised fine-tuning on {prompt, response} records (loss on response tokens)",
             add_stage_arguments, stage_command("sft", SFTConfig, sft))
