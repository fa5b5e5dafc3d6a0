"""`fastppo train-rm`: reward-model training on preference pairs (Ouyang et al. 2022's pairwise loss).

The reward model is an `AutoModelForSequenceClassification` with one label
(a scalar head on the LM backbone). Starting from the SFT export (a causal
LM directory) is the usual path: the backbone's weights are loaded and a
fresh scalar head is added. Its score is read at the EOS token, which is
appended to every response, exactly as `fastppo train` reads it
(`models.score_at`).

Records are {prompt, chosen, rejected}: the prompt is text or chat messages;
chosen and rejected are response strings, or message lists whose last turn
is the assistant's response (the earlier turns are the prompt when there is
no prompt field).

Loss per pair, averaged over the pairs of an optimizer step:

    -log sigmoid(r_chosen - r_rejected)
      + lm_coef * LM loss on the chosen response           (optional)
      + margin_reg * (r_chosen^2 + r_rejected^2) / 2         (optional)

The LM loss "when the model has an LM head": a sequence-classification model
has none, so fastppo keeps the LM head of the causal LM the reward model
starts from (model.path must then be a causal LM, e.g. the SFT export) beside
the reward model during training: the LM loss runs the shared backbone's
hidden states through that head (fused `linear_logprob_loss`, token mean
over the chosen responses' tokens), so it regularises the backbone towards
staying a language model, as in the paper's reward models. The head trains
with the backbone and is not exported: the export is a plain
sequence-classification directory that `fastppo train` loads as reward model
and critic.

Held-out accuracy (r_chosen > r_rejected) and mean margin are logged with the
loss; the export goes to <output_dir>/export.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from .config import RMConfig
from .data import (MAX_UNK_FRACTION, DataError, SFTBatch, apply_chat_template, check_messages, encode_prompt,
                   fit_to_length, loaded, read_records)
from .metrics import MetricBuffer
from .models import IGNORE_INDEX, backbone, load_pretrained, ptx_loss, scalar_head, score_at, sequence_classifier_config
from .packing import index_targets, varlen_attention, whole_batch
from .optim import Trained, make_optimizer, make_scheduler
from .run_dir import claimed_stage
from .stage import (StageResult, export_stage, load_stage_tokenizer, model_kwargs, prepare_model, setup_stage_run,
                    split_held_out, stage_loop, total_steps)

log = logging.getLogger("fastppo")


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

@dataclass
class PairExample:
    chosen: list[int]
    """prompt + chosen response + EOS."""
    rejected: list[int]
    """prompt + rejected response + EOS."""
    n_prompt: int
    """Leading prompt tokens shared by both (excluded from the LM loss)."""


def _response(value, where: str, field: str) -> tuple[list[dict] | None, str]:
    """(earlier messages or None, response text) of a chosen/rejected value."""
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: field '{field}' is empty")
        return None, value
    if isinstance(value, list):
        msgs = check_messages(where, field, value)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}': the last message must be the assistant's response")
        return msgs[:-1], msgs[-1]["content"]
    raise DataError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")


def load_pairs(path, tokenizer, *, prompt_field: str, chosen_field: str, rejected_field: str,
               max_len: int, max_unknown_frac: float = MAX_UNK_FRACTION) -> list[PairExample]:
    """Tokenised preference pairs; EOS appended to both responses (the score is read there). max_unknown_frac: as
    in `data.check_tokenizer`."""
    eos = tokenizer.eos_token_id
    out = []
    for where, rec in read_records(path):
        for f in (chosen_field, rejected_field):
            if f not in rec:
                raise DataError(f"{where}: missing field '{f}' (fields: {sorted(rec)})")
        (c_ctx, c_text), (r_ctx, r_text) = (_response(rec[chosen_field], where, chosen_field),
                                            _response(rec[rejected_field], where, rejected_field))
        if prompt_field in rec:
            p_ids = encode_prompt(tokenizer, rec[prompt_field], where=where, field=prompt_field, prompt_format="auto")
        elif c_ctx:  # the conversation before the assistant's turn is the prompt
            if c_ctx != r_ctx:
                raise DataError(f"{where}: '{chosen_field}' and '{rejected_field}' must share the turns before the response")
            p_ids = apply_chat_template(tokenizer, c_ctx, where, True)
        else:
            raise DataError(f"{where}: missing field '{prompt_field}' (fields: {sorted(rec)}); set data.prompt_field")
        c_ids = tokenizer(c_text, add_special_tokens=False)["input_ids"] + [eos]
        r_ids = tokenizer(r_text, add_special_tokens=False)["input_ids"] + [eos]
        chosen, n_c = fit_to_length(p_ids, c_ids, max_len)
        rejected, n_r = fit_to_length(p_ids, r_ids, max_len)
        chosen[-1], rejected[-1] = eos, eos  # a cut response still ends with EOS: the score is read there
        out.append(PairExample(chosen, rejected, min(n_c, n_r)))
    same = sum(p.chosen == p.rejected for p in out)
    if same and same == len(out):
        raise DataError(f"{path}: in every pair '{chosen_field}' and '{rejected_field}' are the same tokens (cut to "
                        "data.max_len): there is no preference to learn; do data.chosen_field and data.rejected_field "
                        "name two different responses?")
    if same:
        log.warning("%s: %d of %d pairs have the same tokens in '%s' and '%s' (cut to data.max_len): they carry no "
                    "preference", path, same, len(out), chosen_field, rejected_field)
    return loaded(out, "preference pairs", tokenizer, path, {prompt_field: "data.prompt_field",
                                                             chosen_field: "data.chosen_field",
                                                             rejected_field: "data.rejected_field"}, max_unknown_frac)


@dataclass
class PairBatch:
    """B pairs as 2B right-padded rows: chosen first, then rejected.

    input_ids:      (2B, L) int64
    attention_mask: (2B, L) int64
    eos_index:      (2B,)   int64  column of each row's EOS (where the score is read)
    lm_labels:      (B, L)  int64  next-token labels of the chosen rows' responses, -100 elsewhere
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    eos_index: torch.Tensor
    lm_labels: torch.Tensor

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.eos_index, self.lm_labels)))


def collate_pairs(pairs: list[PairExample], pad_id: int) -> PairBatch:
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for i, p in enumerate(pairs):
        n = len(p.chosen)
        labels[i, max(0, p.n_prompt - 1):n - 1] = ids[i, max(1, p.n_prompt):n]  # position j predicts token j+1
    return PairBatch(ids, mask, torch.tensor([len(r) - 1 for r in rows]), labels)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

class LMHeadAdapter(nn.Module):
    """The reward model's backbone + an LM head, shaped like a causal LM for `ppo.ptx_loss`.

    `base_model_prefix` names the shared backbone, so `models.hidden_states`
    runs exactly the reward model's transformer; the head's weight comes from
    the causal LM the reward model started from (or the input embeddings when
    that model ties them).
    """

    def __init__(self, reward_model: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.base_model_prefix = reward_model.base_model_prefix
        setattr(self, self.base_model_prefix, backbone(reward_model))
        self.lm_head = lm_head

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


def load_lm_head(path: str, reward_model: nn.Module, kw: dict, device: torch.device) -> nn.Linear:
    """The LM head of the causal LM at `path`, sized to the reward model's (possibly grown) vocabulary."""
    lm = load_pretrained(AutoModelForCausalLM, path, field="model.path", **kw,
                         expected="loss.lm_coef > 0 needs a causal LM, whose LM head the LM loss uses (or set loss.lm_coef=0)")
    src = lm.get_output_embeddings()
    if not isinstance(src, nn.Linear) or src.bias is not None:
        raise ValueError(f"loss.lm_coef > 0: the LM head of {path} is not a bias-free nn.Linear")
    emb = backbone(reward_model).get_input_embeddings()
    head = nn.Linear(src.in_features, emb.num_embeddings, bias=False, device=device, dtype=src.weight.dtype)
    if getattr(lm.config, "tie_word_embeddings", False):
        head.weight = emb.weight  # tied: the LM head is the reward model's own embedding matrix
    else:
        with torch.no_grad():
            head.weight.zero_()
            head.weight[:src.out_features] = src.weight.to(device)  # a grown pad row stays 0 (it is never a label)
    del lm
    return head


# ----------------------------------------------------------------------------
# Loss and evaluation
# ----------------------------------------------------------------------------

def pair_scores(model: nn.Module, batch: PairBatch, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (B,), r_rejected (B,)) read at the EOS token, through the same forward `train` uses
    (packed: one padding-free forward over the 2B sequences, the head applied at the EOS states only)."""
    pack = whole_batch(batch.attention_mask, index_targets(batch.eos_index, batch.input_ids.size(1)), packed=packed,
                       one_row=varlen_attention(model))
    scores = score_at(model, batch.input_ids, batch.attention_mask, batch.eos_index, pack)   # (2B,)
    B = scores.numel() // 2
    return scores[:B], scores[B:]


@torch.no_grad()
def evaluate_rm(model: nn.Module, pairs: list[PairExample], *, pad_id: int, batch_size: int,
                device: torch.device, packed: bool = False) -> dict[str, float]:
    """Held-out accuracy (r_c > r_r), mean margin, mean loss and score statistics."""
    was_training = model.training
    model.eval()
    rc_all, rr_all = [], []
    for start in range(0, len(pairs), batch_size):
        rc, rr = pair_scores(model, collate_pairs(pairs[start:start + batch_size], pad_id).to(device), packed)
        rc_all.append(rc)
        rr_all.append(rr)
    model.train(was_training)
    rc, rr = torch.cat(rc_all).double(), torch.cat(rr_all).double()
    margin = rc - rr
    return {
        "eval/accuracy": float((margin > 0).double().mean()),
        "eval/margin": float(margin.mean()),
        "eval/loss": float(-F.logsigmoid(margin).mean()),
        "eval/score_chosen": float(rc.mean()),
        "eval/score_rejected": float(rr.mean()),
        "eval/score_std": float(torch.cat([rc, rr]).std()) if rc.numel() > 1 else 0.0,
        "eval/pairs": float(rc.numel()),
    }


@claimed_stage  # locks run.output_dir, refuses one holding a run or an export over model.path
def train_rm(cfg: RMConfig, *, on_step: Callable[[int, dict], None] | None = None) -> StageResult:
    """Train a reward model on cfg.data; export to <output_dir>/export. The Python API of `fastppo train-rm`."""
    t0 = time.perf_counter()
    out, device = setup_stage_run(cfg, "train-rm")
    run, lc = cfg.run, cfg.loss

    # 1. Tokenizer, model (backbone from model.path, fresh scalar head when it is a causal LM), data.
    tokenizer = load_stage_tokenizer(cfg.model)
    kw = model_kwargs(cfg.model)
    config = sequence_classifier_config(cfg.model.path, "model.path", AutoConfig.from_pretrained(
        cfg.model.path, trust_remote_code=cfg.model.trust_remote_code))
    model = load_pretrained(AutoModelForSequenceClassification, cfg.model.path, field="model.path", config=config,
                            fresh_ok=("score.", "classifier."), expected="train-rm starts from a causal LM or a "
                            "sequence-classification model of the same architecture", **kw)
    scalar_head(model)  # fails clearly when the head is not a single scalar
    model = prepare_model(model, tokenizer, cfg.model, device, "reward model", classifier=True)
    lm_model = LMHeadAdapter(model, load_lm_head(cfg.model.path, model, kw, device)) if lc.lm_coef > 0 else None
    if lm_model is not None and cfg.model.lora is not None:
        lm_model.lm_head.requires_grad_(False)   # with LoRA the LM loss trains the adapters only, as it is not exported
    d = cfg.data
    pair_kw = dict(prompt_field=d.prompt_field, chosen_field=d.chosen_field, rejected_field=d.rejected_field,
                   max_len=d.max_len, max_unknown_frac=d.max_unknown_token_frac)
    train_pairs = load_pairs(d.train_path, tokenizer, **pair_kw)
    if d.eval_path is not None:
        eval_pairs = load_pairs(d.eval_path, tokenizer, **pair_kw)
    else:
        train_pairs, eval_pairs = split_held_out(train_pairs, d.eval_fraction, run.seed)
    n_steps = total_steps(len(train_pairs), run)
    log.info("train-rm: %d training pairs, %d held out, %d optimizer steps", len(train_pairs), len(eval_pairs), n_steps)

    params = list(model.parameters()) + ([lm_model.lm_head.weight] if lm_model is not None and
                                         lm_model.lm_head.weight is not backbone(model).get_input_embeddings().weight else [])
    holder = nn.ParameterList(params)  # one optimizer over the reward model (+ a separate LM head)
    opt = make_optimizer(holder, cfg.optim.lr, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, n_steps)

    def step_loss(idx: list[int], metrics: MetricBuffer) -> torch.Tensor:
        # 2. One optimizer step over run.batch_size pairs, in micro-batches; pair losses average over the step.
        pairs = [train_pairs[i] for i in idx]
        total = torch.zeros((), device=device)
        for s in range(0, len(pairs), run.micro_batch_size):
            chunk = pairs[s:s + run.micro_batch_size]
            batch = collate_pairs(chunk, tokenizer.pad_token_id).to(device)
            rc, rr = pair_scores(model, batch, run.packing)
            margin = rc - rr
            share = len(chunk) / len(pairs)
            loss = -F.logsigmoid(margin).mean() * share                      # -log sigma(r_c - r_r)
            if lc.margin_reg > 0:
                loss = loss + lc.margin_reg * 0.5 * (rc.pow(2) + rr.pow(2)).mean() * share
            if lm_model is not None:
                lm_batch = SFTBatch(batch.input_ids[:len(chunk)], batch.attention_mask[:len(chunk)], batch.lm_labels)
                lm = ptx_loss(lm_model, lm_batch, fused=True, backend=run.backend,
                              chunk_size=cfg.model.lm_head_chunk_size, packed=run.packing)
                loss = loss + lc.lm_coef * lm * share
                metrics.add("loss/lm", lm.detach())
            loss.backward()
            total += loss.detach()
            metrics.add_dict({"train/accuracy": (margin.detach() > 0).float().mean(),
                              "train/margin": margin.detach().mean()})
        metrics.add("loss/total", total)
        return total

    model.train()
    eval_metrics, history = stage_loop(
        "train-rm", out=out, run=run, n_steps=n_steps, n_items=len(train_pairs), shuffle=d.shuffle,
        trained=Trained("", holder, opt, sched), max_grad_norm=cfg.optim.max_grad_norm, step_loss=step_loss,
        evaluate=(lambda: evaluate_rm(model, eval_pairs, pad_id=tokenizer.pad_token_id,   # 3. held-out accuracy
                                      batch_size=run.eval_batch_size, device=device, packed=run.packing))
                  if eval_pairs else None,
        shown={"loss": "loss/total", "eval_acc": "eval/accuracy"}, on_step=on_step)

    # 4. Export: a sequence-classification directory (num_labels=1) + tokenizer, loadable as reward model and critic.
    return export_stage("train-rm", model, tokenizer, out, t0, eval_metrics, history, adapter_only=run.export_adapter)
