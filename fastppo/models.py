"""The four models of RLHF: loading, the shared tokenizer, and their forwards.

- policy, reference: AutoModelForCausalLM from the SFT directory; the
  reference is a frozen copy of the policy as loaded.
- reward: AutoModelForSequenceClassification with one label; its score is
  read at the EOS token.
- critic: a sequence-classification model initialised from the reward model
  (PPO-max), its scalar head applied at every position.

Every forward has one code path: it runs the backbone on the rows of a
`packing.Packing` (`pack=`) and reads the states at its targets. A padded
batch is the trivial packing (positions from the attention mask, so left
padding never shifts positions); a packed one holds the sequences back to
back, positions restarting per sequence. Only the states the caller reads
go on to the heads, and the outputs come back in the padded (B, ·) layout.
Logprobs come from the backbone's hidden states and the lm_head weight
through the fused `linear_token_logprobs`, which never materialises the
(B, T, V) logits.

Under FSDP2 (`parallel.Sharder`) every function here that reads the backbone
and then the root's own parameters (lm_head weight, scalar head) runs as a
forward of the root module (`parallel.run_as_forward`): FSDP has all-gathered
them there, so the fused op sees the full (V, H) weight, and its gradient
goes back to the shards.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedTokenizerFast)
from transformers.models.auto.tokenization_auto import get_tokenizer_config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, cached_file,
                                is_flash_attn_2_available)

from . import dist, lora, parallel
from .config import ModelConfig
from .kernels import linear_logprob_loss, linear_token_logprobs, token_logprobs
from .masked import masked_count
from .packing import Packing, index_targets, varlen_attention, whole_batch

log = logging.getLogger("fastppo")

IGNORE_INDEX = -100
PAD_TOKEN = "<|fastppo_pad|>"


class ModelError(ValueError):
    """A model or tokenizer that fastppo cannot use, with the reason."""


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
"""The weight files from_pretrained looks for in a folder (whole, or the index of a sharded save)."""


def _check_model_folder(local: Path, path: str, field: str, trust_remote_code: bool) -> None:
    """A saved model folder's config.json (valid JSON, naming an architecture this transformers has) and weights."""
    config_file = local / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:                               # invalid JSON, or not UTF-8
        raise ModelError(f"{field}: {config_file} is not valid JSON ({exc}), probably truncated or hand-edited: copy "
                         "or save the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelError(f"{field}: {config_file} has no model_type, so transformers cannot tell the architecture: "
                         "add it (e.g. \"model_type\": \"llama\"), or save the model again with save_pretrained")
    if model_type not in CONFIG_MAPPING and not ("auto_map" in config and trust_remote_code):
        why = (f"it comes with its own modelling code (auto_map): set model.trust_remote_code=true if you trust {path}"
               if "auto_map" in config else
               "a typo, or a model that needs a newer transformers or model.trust_remote_code=true")
        raise ModelError(f"{field}: {config_file}: model_type {model_type!r} is not known to transformers "
                         f"{transformers.__version__} ({why})")
    if not any((local / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"{field}: {path} has a config.json but no weights ({', '.join(WEIGHT_FILES)}): copy them "
                         "there, or save the model with save_pretrained")


def check_model_source(path: str, field: str, trust_remote_code: bool = False) -> None:
    """Fail in one line naming `field` unless `path` is a saved model folder (a config.json transformers can read,
    and weights) or a hub id that resolves (in the local cache when HF_HUB_OFFLINE is set)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
            try:
                base = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except ValueError:
                base = None
            raise ModelError(
                f"{field}: {path} holds a LoRA adapter (adapter_config.json, e.g. a run.export_adapter=true export), "
                f"not a whole model: export a merged model instead (run.export_adapter=false, the default), or merge "
                f"this one with PEFT: PeftModel.from_pretrained(<AutoModel class>.from_pretrained({base or '<its base>'!r}), "
                f"{str(path)!r}).merge_and_unload().save_pretrained(<folder>)")
        if not (local / "config.json").is_file():
            raise ModelError(f"{field}: {path} has no config.json, so it is not a saved Hugging Face model "
                             "(a folder written by save_pretrained, e.g. a fastppo export)")
        _check_model_folder(local, path, field, trust_remote_code)
        return
    if local.exists():
        raise ModelError(f"{field}: {path} is a file; give the model's folder (the one holding config.json) or a hub id")
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ModelError(f"{field}: no such folder: {path}") from None
    try:
        cached_file(path, "config.json")
    except OSError as exc:
        offline = " with HF_HUB_OFFLINE set, only models already in the local cache can be used;" if hf_constants.HF_HUB_OFFLINE else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("" if hf_constants.HF_HUB_OFFLINE else
                " (without a network, HF_HUB_OFFLINE=1 reads the local cache at once, without retries)")
        raise ModelError(f"{field}: {path} is not a local folder, and as a hub id it cannot be loaded:{offline} "
                         f"{reason}{hint}") from None


# Tokenizer classes that load a tokenizer.json exactly as saved.
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path: str, *, trust_remote_code: bool = False, field: str | None = None):
    """The tokenizer saved at `path`; field: the config field that names it (for the errors)."""
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except json.JSONDecodeError as exc:  # tokenizer.json / tokenizer_config.json cut short or hand-edited
        raise ModelError(f"the tokenizer at {path} has a file that is not valid JSON, probably truncated ({exc})") from None
    except (OSError, ValueError):        # transformers then blames a missing sentencepiece or tiktoken
        local = Path(path).expanduser()
        if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
            raise ModelError(f"{f'{field}: ' if field else ''}{path} holds no tokenizer (no {' or '.join(TOKENIZER_FILES)}):"
                             f" save the model's tokenizer next to it, tokenizer.save_pretrained({str(path)!r})") from None
        raise
    declared = get_tokenizer_config(path).get("tokenizer_class")
    if declared in _GENERIC_TOKENIZER_CLASSES and type(tok).__name__ not in _GENERIC_TOKENIZER_CLASSES:
        # transformers 5 replaces a generic saved tokenizer by the model type's own class (e.g. Qwen2's
        # byte-level BPE next to a qwen2 config), which rebuilds the pipeline and garbles e.g. a word-level one.
        log.info("%s: loading the saved %s, not %s", path, declared, type(tok).__name__)
        tok = PreTrainedTokenizerFast.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer at {path} has no EOS token; the reward is read at EOS, so one is required")
    return tok


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS; True when one was added (embeddings must grow)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.pad_token_id is not None:
        log.info("pad token equals EOS (%r); adding a distinct pad token %r", tokenizer.eos_token, PAD_TOKEN)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"
    return True


def check_same_vocab(policy_tok, reward_tok, policy_path: str, reward_path: str) -> None:
    """Policy and reward model must share one tokenizer."""
    pv, rv = policy_tok.get_vocab(), reward_tok.get_vocab()
    pv = {k: v for k, v in pv.items() if k != PAD_TOKEN}
    rv = {k: v for k, v in rv.items() if k != PAD_TOKEN}
    if pv != rv:
        only_p = sorted(set(pv) - set(rv))[:5]
        only_r = sorted(set(rv) - set(pv))[:5]
        differ = sorted(k for k in set(pv) & set(rv) if pv[k] != rv[k])[:5]
        raise ModelError(
            f"the policy tokenizer ({policy_path}, {len(pv)} tokens) and the reward-model tokenizer "
            f"({reward_path}, {len(rv)} tokens) differ; fastppo needs one shared tokenizer. "
            f"Only in policy: {only_p}; only in reward: {only_r}; different ids: {differ}"
        )
    if policy_tok.eos_token != reward_tok.eos_token:
        raise ModelError(f"EOS differs: policy {policy_tok.eos_token!r} vs reward model {reward_tok.eos_token!r}")


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


EMBEDDING_ROWS_MULTIPLE = 64
"""`load_models` gives the embeddings a multiple of this many rows: an odd vocabulary (32000 + a pad token)
would cost the lm_head matmul its aligned 128-bit loads and cuBLAS its fastest kernels."""


def grow_embeddings(model, n_tokens: int, what: str, multiple: int = 1) -> None:
    """Give the model at least n_tokens embedding rows, a multiple of `multiple`.

    Rows past n_tokens are alignment padding (see `mark_padding_rows`).
    """
    current = model.get_input_embeddings().num_embeddings
    if current < n_tokens or current % multiple:
        # mean_resizing=False: deterministic init (the new rows are the pad token, always masked, and padding)
        model.resize_token_embeddings(max(current, n_tokens), pad_to_multiple_of=multiple, mean_resizing=False)
        # The alignment rows are zeros, whatever the RNG state: every rank of a sharded run and every process
        # that loads the model holds the same weights. (They are never an input, never a label, and the
        # logits they make are excluded.)
        with torch.no_grad():
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                if layer is not None:
                    layer.weight[max(current, n_tokens):].zero_()
        setattr(model, _ROWS_ATTR, max(current, n_tokens))
        log.info("%s: embeddings resized %d -> %d (%d tokens, rows a multiple of %d)", what, current,
                 model.get_input_embeddings().num_embeddings, n_tokens, multiple)


_ROWS_ATTR = "fastppo_rows_without_alignment"


def rows_without_alignment(model: nn.Module) -> int | None:
    """The embedding rows the model had before `grow_embeddings` added alignment rows (the checkpoint's rows
    plus an added pad token); None when it added none. An export drops the alignment rows again: outside
    fastppo nothing masks their logits (zero rows give logit 0), so a sampler could draw ids no tokenizer has."""
    rows = getattr(model, _ROWS_ATTR, None)
    return rows if rows is not None and rows < model.get_input_embeddings().num_embeddings else None


_VOCAB_ATTR = "fastppo_vocab_size"


def mark_padding_rows(model: nn.Module, vocab_size: int) -> None:
    """Record that the model's lm_head rows >= vocab_size are alignment padding, not tokens.

    Every forward through the lm_head module then sets those logit columns to a large negative number,
    so generation never samples them and a full-logits softmax gives them probability 0 (finite, not
    -inf, so that p log p stays 0 in an entropy). The forward helpers below read the recorded size
    (`real_vocab_size`) for the fused ops, which use the weight and not the module.
    """
    if model.get_output_embeddings().weight.size(0) <= vocab_size:
        return

    def hook(_module, _args, logits):
        logits[..., vocab_size:] = torch.finfo(logits.dtype).min / 2
        return logits

    model.get_output_embeddings().register_forward_hook(hook)
    setattr(model, _VOCAB_ATTR, vocab_size)


def real_vocab_size(model: nn.Module, vocab_size: int | None = None) -> int | None:
    """vocab_size when given, else the size `mark_padding_rows` recorded on the model (None: all rows are tokens)."""
    return vocab_size if vocab_size is not None else getattr(model, _VOCAB_ATTR, None)


def attn_implementation(requested: str, *, compute_dtype: torch.dtype, fields: str) -> str:
    """The attention implementation to load with: flash_attention_2 falls back to sdpa (with a warning)
    when flash-attn cannot run here, and is refused for float32 compute, which it does not support.

    fields: the config fields that set compute_dtype, for the error message.
    """
    if requested != "flash_attention_2":
        return requested
    if not is_flash_attn_2_available():   # first: sdpa takes any dtype, so a GPU config also runs on a CPU
        log.warning("attn_implementation=flash_attention_2 but flash-attn is not installed or has no CUDA device "
                    "here: using sdpa")
        return "sdpa"
    if compute_dtype not in (torch.bfloat16, torch.float16):
        raise ModelError(f"attn_implementation=flash_attention_2 needs bfloat16 or float16 compute, but {fields} "
                         "give float32: set one of them to bfloat16, or use attn_implementation=sdpa")
    return requested


_HEAD_PREFIXES = ("score.", "classifier.", "lm_head.")


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def load_pretrained(auto_class, path: str, *, field: str, expected: str, fresh_ok: tuple[str, ...] = (),
                    shard: "parallel.Sharder | None" = None, config=None, **kwargs):
    """`auto_class.from_pretrained(path)`, refusing a model that would get a randomly initialised head.

    transformers initialises randomly every weight the checkpoint lacks (a causal LM read as a
    sequence classifier gets a new `score`, and the reverse a new `lm_head`) and only says so in its
    load report. fresh_ok: name prefixes allowed to start random (the scalar head train-rm trains).
    With a Sharder over several processes only rank 0 reads (and checks) the checkpoint
    (`parallel.from_pretrained`); if it refuses, torchrun stops the other ranks.
    """
    # transformers' load report (a multi-line table on the console, printed before any refusal below) is
    # replaced by the refusal or by one log line of what starts new and what goes unused.
    # (A filter, not the logger's level: transformers runs extra checks, with their own warnings, at WARNING.)
    hf_log = logging.getLogger("transformers.modeling_utils")
    hf_log.addFilter(_no_load_report)
    try:
        model, info = parallel.from_pretrained(auto_class, path, shard, config=config, **kwargs)
    except SafetensorError as exc:  # a weights file cut short (an interrupted copy or download, a full disk)
        raise ModelError(f"{field}: cannot read the weights of {path}, probably truncated ({exc})") from None
    except RuntimeError as exc:     # transformers refuses weights of other shapes than the config's, naming none
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        _, info = auto_class.from_pretrained(path, config=config, output_loading_info=True, ignore_mismatched_sizes=True,
                                             **kwargs)                  # again, for the names and shapes
        if not info["mismatched_keys"]:
            raise exc
        key, saved, wanted = sorted(info["mismatched_keys"], key=str)[0]
        raise ModelError(f"{field}: the weights in {path} do not match its config.json (e.g. {key}: {tuple(saved)} in "
                         f"the weights, {tuple(wanted)} by the config; {len(info['mismatched_keys'])} weights differ): "
                         "the config was edited, or belongs to another model") from None
    finally:
        hf_log.removeFilter(_no_load_report)
    if info is None:
        return model
    new = sorted(info["missing_keys"]) + sorted(str(m[0]) if isinstance(m, tuple) else str(m)
                                                for m in info["mismatched_keys"])
    fresh = [k for k in new if not k.startswith(fresh_ok)]
    if new or info["unexpected_keys"]:
        log.info("%s: %s from %s%s%s", field, auto_class.__name__, path,
                 f"; new weights: {', '.join(new)}" if new else "",
                 f"; unused weights: {', '.join(sorted(info['unexpected_keys']))}" if info["unexpected_keys"] else "")
    if fresh:
        heads = [k for k in fresh if k.startswith(_HEAD_PREFIXES)]
        what = f"has no {', '.join(heads)}" if heads else f"lacks {len(fresh)} weights ({', '.join(fresh[:3])}, ...)"
        raise ModelError(f"{field}: {path} {what}: loaded as {auto_class.__name__} it would start with random "
                         f"weights there; {expected}")
    return model


def sequence_classifier_config(path: str, field: str, config):
    """`config` (of the checkpoint at `path`) with one label; refuses a classifier with several labels."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise ModelError(f"{field}: {path} is a classifier with {config.num_labels} labels; a reward model has one "
                         "scalar output (num_labels=1), e.g. the export of `fastppo train-rm`")
    config.num_labels = 1
    return config


def backbone(model: nn.Module) -> nn.Module:
    """The transformer inside a *ForCausalLM / *ForSequenceClassification model."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None:
        raise ModelError(f"cannot find the backbone of {type(model).__name__} (base_model_prefix={model.base_model_prefix!r})")
    return body


def scalar_head(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        copies = getattr(head, "modules_to_save", None)   # LoRA: PEFT keeps the fully trained head in a wrapper
        if copies is not None:
            head = next(iter(copies.values()))
        if isinstance(head, nn.Linear):
            if head.out_features != 1:
                raise ModelError(f"{type(model).__name__}.{name} has {head.out_features} outputs; a reward model needs num_labels=1")
            return head
    raise ModelError(f"{type(model).__name__} has no linear scalar head (score/classifier); use a *ForSequenceClassification model")


# Config attributes of architectures whose logits are not plain hidden @ W^T.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale", "mup_width_multiplier")


def fused_lm_head_supported(model: nn.Module) -> str | None:
    """None when logits == backbone_hidden @ lm_head.weight^T exactly, else the reason why not."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"lm_head is a {type(head).__name__}, not nn.Linear"
    if head.bias is not None:
        return "lm_head has a bias"
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(model.config, attr, None)
        if value not in (None, 1, 1.0):
            return f"config.{attr}={value} transforms the logits"
    return None


def no_dropout_config(path: str, cfg: ModelConfig, **overrides):
    """The model's config with every dropout probability set to 0.

    PPO needs the logprobs of the update to equal those of the rollout at the
    first step (ratio exactly 1), so dropout is off in all four models. It is
    switched off in the config rather than with eval(), so that train() mode
    (needed by gradient checkpointing) changes nothing numerically.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **overrides)
    for key, value in list(vars(config).items()):
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float) and value > 0:
            setattr(config, key, 0.0)
    return config


@dataclass
class Models:
    policy: nn.Module
    """Causal LM, trained."""
    ref: nn.Module | None
    """Frozen copy of the policy at start; with model.lora the policy itself with its adapters disabled (`lora.ReferenceView`). None when nothing reads the reference (`config.uses_reference`)."""
    critic: nn.Module | None
    """Sequence-classification model, trained; head applied at every position. None for a critic-free estimator."""
    reward: nn.Module | None
    """Sequence-classification model, frozen; score read at EOS. None when reward functions alone score."""
    tokenizer: object
    """Shared tokenizer (pad distinct from EOS)."""
    fused_lm_head: bool
    """Whether logprobs use linear_token_logprobs (else full logits + token_logprobs)."""
    vocab_size: int
    """The real vocabulary, len(tokenizer): lm_head rows past it are alignment padding, never sampled nor in a softmax."""


def load_models(cfg: ModelConfig, device: torch.device, shard: "parallel.Sharder | parallel.Autocast | None" = None,
                with_critic: bool = True, with_reference: bool = True) -> Models:
    """Load the four models; with `shard`, each is sharded (FSDP2) right after it is loaded, so that at most
    two unsharded models exist at a time (the policy and its reference copy), on the host.

    with_critic=False (a critic-free estimator) loads no critic; with_reference=False (no KL penalty nor KL loss)
    no reference; model.reward_path null loads no reward model.
    With model.lora / model.critic_lora the policy / critic get LoRA adapters before they are prepared
    (`lora.apply`), and with model.lora no reference copy is made: the reference is the policy with its
    adapters disabled."""
    critic_path, critic_field = (cfg.critic_path, "model.critic_path") if cfg.critic_path else (cfg.reward_path, "model.reward_path")
    if not with_critic:
        critic_path = None
    for path, field in ((cfg.policy_path, "model.policy_path"), (cfg.reward_path, "model.reward_path"),
                        (critic_path, critic_field)):
        if path is not None:
            check_model_source(path, field, cfg.trust_remote_code)
    dtype = torch_dtype(cfg.dtype)
    compute_dtype = shard.param_dtype if shard is not None and shard.param_dtype is not None else dtype
    attn = attn_implementation(cfg.attn_implementation, compute_dtype=compute_dtype,
                               fields="model.dtype and parallel.param_dtype")
    kw = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg.policy_path, trust_remote_code=cfg.trust_remote_code, field="model.policy_path")
    try:
        reward_tok = None if cfg.reward_path is None else load_tokenizer(cfg.reward_path,
                                                                           trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        reward_tok = None
        log.warning("no tokenizer found with the reward model at %s; assuming it shares the policy's", cfg.reward_path)
    if reward_tok is not None:
        check_same_vocab(tokenizer, reward_tok, cfg.policy_path, cfg.reward_path)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"

    n_tok = len(tokenizer)

    def fit_tokenizer(model, what: str):
        emb = model.get_input_embeddings().num_embeddings
        if emb < n_tok - 1:  # only the pad token may be missing
            raise ModelError(f"the {what} model has {emb} embeddings but the tokenizer has {n_tok} tokens: "
                             "the model and tokenizer do not belong together")
        grow_embeddings(model, n_tok, what, EMBEDDING_ROWS_MULTIPLE)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        if what in ("reward", "critic"):
            scalar_head(model)
        return model

    def prepare(model, what: str, trained: bool):
        model.eval()  # the trained models switch to train() only inside the update (gradient checkpointing)
        if not trained:
            model.requires_grad_(False)
        elif cfg.gradient_checkpointing:  # before sharding: FSDP re-gathers the blocks for the recompute
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if shard is None:
            return model.to(device)
        return shard(model, what, trained=trained)  # fully_shard moves the shards to the mesh's device

    def classifier(path: str, field: str, what: str):
        # PPO-max starts the critic from the reward model: both must be trained scalar-head checkpoints.
        config = sequence_classifier_config(path, field, no_dropout_config(path, cfg))
        return fit_tokenizer(load_pretrained(
            AutoModelForSequenceClassification, path, field=field, config=config, shard=shard,
            expected=f"the {what} model must be a sequence-classification checkpoint with num_labels=1 "
                     "(e.g. the export of `fastppo train-rm`)", **kw), what)

    policy = fit_tokenizer(load_pretrained(
        AutoModelForCausalLM, cfg.policy_path, field="model.policy_path", shard=shard,
        config=no_dropout_config(cfg.policy_path, cfg),
        expected="the policy must be a causal LM (e.g. the export of `fastppo sft`)", **kw), "policy")
    mark_padding_rows(policy, n_tok)
    reason = fused_lm_head_supported(policy)
    ref = None
    if cfg.lora is not None:
        policy = prepare(lora.apply(policy, cfg.lora, field="model.lora", classifier=False), "policy", trained=True)
        ref = lora.ReferenceView(policy) if with_reference else None
    else:
        # The reference must equal the policy exactly, including any resized rows: copy it before either is sharded.
        if with_reference:
            ref = prepare(copy.deepcopy(policy), "reference", trained=False)
        policy = prepare(policy, "policy", trained=True)
    reward = (None if cfg.reward_path is None
              else prepare(classifier(cfg.reward_path, "model.reward_path", "reward"), "reward", trained=False))
    critic = None
    if critic_path is not None:
        critic = classifier(critic_path, critic_field, "critic")
        if cfg.critic_lora is not None:
            critic = lora.apply(critic, cfg.critic_lora, field="model.critic_lora", classifier=True)
        critic = prepare(critic, "critic", trained=True)
    if reason is not None:
        log.warning("fused lm_head logprobs disabled (%s): falling back to full logits + token_logprobs", reason)
    return Models(policy, ref, critic, reward, tokenizer, fused_lm_head=reason is None, vocab_size=n_tok)


def check_positions(models: Models, cfg: ModelConfig, longest: int, what: str) -> None:
    """Refuse rollouts longer than a model takes: `longest` tokens (prompt + response; the reward model reads one
    more, the EOS appended to a cut response) against each model's max_position_embeddings (GPT-2's n_positions).
    Past it a learned position table is indexed out of range (on CUDA a device-side assert) and rotary positions
    run beyond the lengths the model was trained on. what: how `longest` comes about, naming the fields."""
    critic_field = "model.critic_path" if cfg.critic_path else "model.reward_path"
    for model, field, extra in ((models.policy, "model.policy_path", 0), (models.critic, critic_field, 0),
                                (models.reward, "model.reward_path", 1)):
        limit = None if model is None else getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and longest + extra > limit:
            plus = " + 1 (the EOS appended to score a cut response)" if extra else ""
            raise ModelError(f"{field}: {getattr(cfg, field.split('.')[1])} takes at most {limit} positions "
                             f"(max_position_embeddings in its config.json), but {what}{plus} = {longest + extra}: "
                             "lower one of them")


# ----------------------------------------------------------------------------
# Forwards: one code path, padded or packed (`packing.Packing`)
# ----------------------------------------------------------------------------

def _padded(pack: Packing | None, attention_mask: torch.Tensor, targets: torch.Tensor) -> Packing:
    """`pack`, or when it is None (a caller outside the micro-batch planner) the padded batch with `targets`."""
    return pack if pack is not None else Packing.padded_batch(attention_mask, targets)


def _window(attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(B, L) bool: the states before every response column (P-1 .. L-2), padding included."""
    out = torch.zeros_like(attention_mask, dtype=torch.bool)
    out[:, prompt_width - 1:-1] = True
    return out


def backbone_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pack: Packing) -> torch.Tensor:
    """(M, H) last hidden states of the model's backbone (final norm included) at the targets of `pack`: the
    backbone runs on the packing's rows (for a padded batch: the rows as they are, through their attention
    mask). Call it inside `parallel.run_as_forward` when the root's own parameters are read next."""
    body = backbone(model)
    out = body(input_ids=pack.pack(input_ids), position_ids=pack.position_ids, use_cache=False,
               **pack.attention_kwargs(body.config, attention_mask))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return pack.gather(hidden)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pack: Packing,
            vocab_size: int | None) -> torch.Tensor:
    """(M, V) full logits at the targets of `pack` (the model's own forward: logit transforms included)."""
    out = model(input_ids=pack.pack(input_ids), position_ids=pack.position_ids, use_cache=False,
                **pack.attention_kwargs(model.config, attention_mask))
    return pack.gather(out.logits)[:, :vocab_size]


class ResponseLogprobs(NamedTuple):
    logprobs: torch.Tensor
    """(B, R) float32 log pi(y_t | y_<t) at temperature T; 0 off the response mask."""
    entropy: torch.Tensor | None
    """(B, R) float32 entropy of pi(. | y_<t) at temperature T; 0 off the mask; None when not asked."""


@dataclass(frozen=True)
class Forward:
    """How the trainer runs its logprob and value forwards, fixed for a run (`train` builds it from the config)."""
    temperature: float
    """rollout.temperature: every logprob of the loop is one of softmax(logits / T)."""
    packed: bool
    """ppo.packing: micro-batches padding-free (`packing`)."""
    backend: str | None = None
    """run.backend of the fused ops."""
    chunk_size: int | None = None
    """model.lm_head_chunk_size of the fused lm_head ops."""
    fused: bool = True
    """Logprobs from the backbone's states and the lm_head weight (`Models.fused_lm_head`), else from full logits."""
    vocab_size: int | None = None
    """The real vocabulary (`Models.vocab_size`)."""

    def response_logprobs(self, model, input_ids, attention_mask, response_mask, prompt_width: int, *,
                          return_entropy: bool = False, pack: Packing | None = None) -> "ResponseLogprobs":
        return response_logprobs(model, input_ids, attention_mask, response_mask, prompt_width=prompt_width,
                                 temperature=self.temperature, return_entropy=return_entropy, fused=self.fused,
                                 backend=self.backend, chunk_size=self.chunk_size, vocab_size=self.vocab_size,
                                 pack=pack)

    def response_values(self, model, input_ids, attention_mask, response_mask, prompt_width: int, *,
                        pack: Packing | None = None) -> torch.Tensor:
        return response_values(model, input_ids, attention_mask, response_mask, prompt_width=prompt_width, pack=pack)


def _target_logprobs(model, input_ids, attention_mask, labels, pack, *, fused, temperature, return_entropy, backend,
                     chunk_size, vocab_size):
    """(B, L) logprobs (and entropy) of labels (B, L) at the targets of `pack`, 0 elsewhere: from the backbone's
    states and the lm_head weight (`linear_token_logprobs`: no (M, V) logits stored) or from full logits."""
    target = pack.take(labels)                                                        # (M,)
    if fused:
        hidden = backbone_states(model, input_ids, attention_mask, pack)             # (M, H)
        out = linear_token_logprobs(hidden, model.get_output_embeddings().weight, target, temperature=temperature,
                                    return_entropy=return_entropy, ignore_index=IGNORE_INDEX, backend=backend,
                                    chunk_size=chunk_size, vocab_size=vocab_size)    # the full (V, H) weight
    else:
        out = token_logprobs(_logits(model, input_ids, attention_mask, pack, vocab_size), target,
                             temperature=temperature, return_entropy=return_entropy, ignore_index=IGNORE_INDEX,
                             backend=backend)
    # (B, L) new tensors, not views of the op's buffer: FSDP hooks the backward on what a forward returns.
    return tuple(pack.unpack(t) for t in out) if return_entropy else pack.unpack(out)


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    prompt_width: int,
    temperature: float,
    return_entropy: bool = False,
    fused: bool = True,
    backend: str | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    pack: Packing | None = None,
) -> ResponseLogprobs:
    """Logprobs of the response tokens input_ids[:, P:] under softmax(logits / T).

    input_ids, attention_mask: (B, P+R); response_mask: (B, R) bool.
    Token y_t at column P+t is predicted by the hidden state at column P+t-1.
    vocab_size: the real vocabulary (`Models.vocab_size`); logit columns past it (alignment padding of the
    lm_head) are left out of the softmax. None: the size `mark_padding_rows` recorded, else every column.
    pack: how the forward runs (`packing.micro_batches`, targets `packing.response_targets`): padding-free,
    the ops then see only the response tokens' states; None: the padded batch. The outputs are (B, R) either way.
    """
    P = prompt_width
    labels = nn.functional.pad(torch.where(response_mask, input_ids[:, P:], IGNORE_INDEX), (P - 1, 1),
                               value=IGNORE_INDEX)                                 # (B, L): the label of each state
    pack = _padded(pack, attention_mask, _window(attention_mask, P))
    out = parallel.run_as_forward(model, _target_logprobs, input_ids, attention_mask, labels, pack, fused=fused,
                                  temperature=temperature, return_entropy=return_entropy, backend=backend,
                                  chunk_size=chunk_size, vocab_size=real_vocab_size(model, vocab_size))
    if return_entropy:
        return ResponseLogprobs(*(t[:, P - 1:-1] for t in out))
    return ResponseLogprobs(out[:, P - 1:-1], None)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                      fused: bool = True, backend: str | None = None, chunk_size: int | None = None,
                      vocab_size: int | None = None, pack: Packing | None = None) -> torch.Tensor:
    """(B, L) float32 log pi(labels[:, j] | input_ids[:, :j+1]) at temperature 1; 0 where labels == IGNORE_INDEX.

    vocab_size: as in `response_logprobs`. pack: as there, with targets labels != IGNORE_INDEX (None: padded).
    """
    pack = _padded(pack, attention_mask, torch.ones_like(labels, dtype=torch.bool))
    return parallel.run_as_forward(model, _target_logprobs, input_ids, attention_mask, labels, pack, fused=fused,
                                   temperature=1.0, return_entropy=False, backend=backend, chunk_size=chunk_size,
                                   vocab_size=real_vocab_size(model, vocab_size))


def ptx_loss(policy: nn.Module, batch, *, fused: bool, backend: str | None, chunk_size: int | None,
             packed: bool = False) -> torch.Tensor:
    """Token-mean LM loss (temperature 1) on the response tokens of an SFT batch (`data.SFTBatch`; the mean over
    all ranks' tokens). fused: `linear_logprob_loss` on the backbone's states (6·N·H·V lm_head FLOP, the
    gradients computed with the loss), else full logits + `token_logprobs`.

    packed: one padding-free forward over the batch's sequences (`packing.Packing`).
    """
    valid = batch.labels != IGNORE_INDEX
    pack = whole_batch(batch.attention_mask, valid, packed=packed, one_row=varlen_attention(policy))
    n_tokens = masked_count(valid, group=dist.group()).clamp(min=1)
    if fused:
        # The loss form of the fused lm_head op: its gradients computed with the loss, no logits recomputed.
        # The normalizer comes in through the closure (FSDP casts a forward's floating-point arguments).
        def run(model, input_ids, attention_mask):
            out = linear_logprob_loss(backbone_states(model, input_ids, attention_mask, pack),
                                      model.get_output_embeddings().weight, pack.take(batch.labels),
                                      normalizer=n_tokens, ignore_index=IGNORE_INDEX, backend=backend,
                                      chunk_size=chunk_size, vocab_size=real_vocab_size(model))
            return out.loss.clone()                             # a new tensor: FSDP hooks what a forward returns

        return parallel.run_as_forward(policy, run, batch.input_ids, batch.attention_mask)
    logprobs = sequence_logprobs(policy, batch.input_ids, batch.attention_mask, batch.labels, fused=False,
                                 backend=backend, chunk_size=chunk_size, pack=pack)         # (B, L)
    return -(logprobs * valid).sum() / n_tokens


def _target_values(model, input_ids, attention_mask, pack):
    """(B, L) float32: the scalar head at the targets of `pack`, 0 elsewhere (a new tensor: FSDP hooks outputs)."""
    return pack.unpack(scalar_head(model)(backbone_states(model, input_ids, attention_mask, pack)).squeeze(-1).float())


def response_values(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
    prompt_width: int, pack: Packing | None = None,
) -> torch.Tensor:
    """(B, R) float32 critic values aligned with logprobs: V of y_t is read at column P+t-1 (the state before y_t).

    pack: as in `response_logprobs` (targets `packing.response_targets`; None: padded).
    """
    pack = _padded(pack, attention_mask, _window(attention_mask, prompt_width))
    values = parallel.run_as_forward(model, _target_values, input_ids, attention_mask, pack)[:, prompt_width - 1:-1]
    return values * response_mask


def score_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor,
             pack: Packing | None = None) -> torch.Tensor:
    """(B,) float32 reward-model score read at column index[b] (the EOS token).

    pack: as in `response_logprobs`, with targets `packing.index_targets(index, L)` (None: padded).
    """
    pack = _padded(pack, attention_mask, index_targets(index, attention_mask.size(1)))
    values = parallel.run_as_forward(model, _target_values, input_ids, attention_mask, pack)
    return values.gather(1, index.view(-1, 1)).squeeze(1)
