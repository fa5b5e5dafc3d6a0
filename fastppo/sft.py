"""`fastppo sft`: supervised fine-tuning of a causal LM, loss on response tokens only.

Records are {prompt, response} (prompt: text or chat messages) or
{messages: [...]} whose last turn is the assistant's response; EOS is
appended to every response (`data.load_sft`). The loss is the token mean of
−log π(y_t | y_<t) over the response tokens of a whole optimizer step (all
micro-batches), the same loss as PPO's ptx term (`models.ptx_loss`), computed
through the fused `linear_logprob_loss` on the backbone's hidden states and
the lm_head weight, so the (B, L, V) logits are never materialised and its
gradients come with the loss (no logits recomputed in backward).

The machinery is the stages' (`stage`): OmegaConf config with the resolved copy saved in the run directory,
AdamW + warmup/decay schedule (`optim`), metrics to metrics.jsonl and TensorBoard, and the atomic Hugging
Face export to `<output_dir>/export`.

    run dir/
      config.yaml  metrics.jsonl  tensorboard/  export/   (export: AutoModelForCausalLM)
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from . import dist
from .config import SFTConfig
from .data import SFTExample, collate_sft, load_sft
from .metrics import MetricBuffer
from .models import IGNORE_INDEX, fused_lm_head_supported, load_pretrained, ptx_loss
from .optim import Trained, make_optimizer, make_scheduler
from .run_dir import claimed_stage
from .stage import (StageResult, export_stage, load_stage_tokenizer, model_kwargs, prepare_model, setup_stage_run,
                    split_held_out, stage_loop, total_steps)

log = logging.getLogger("fastppo")


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
