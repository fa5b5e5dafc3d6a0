"""The four models (SPEC §1): loading, the shared tokenizer, and their forwards.

- policy, reference: AutoModelForCausalLM from the SFT directory; the
  reference is a frozen copy of the policy as loaded.
- reward: AutoModelForSequenceClassification with one label; its score is
  read at the EOS token.
- critic: a sequence-classification model initialised from the reward model
  (PPO-max), its scalar head applied at every position.

Every forward builds position ids from the attention mask, so left padding
never shifts positions. Logprobs come from the backbone's hidden states and
the lm_head weight through the fused `linear_token_logprobs`, which never
materialises the (B, T, V) logits.

Under FSDP2 (`dist.Sharder`) every function here that reads the backbone
and then the root's own parameters (lm_head weight, scalar head) runs as a
forward of the root module (`dist.run_as_forward`): FSDP has all-gathered
them there, so the fused op sees the full (V, H) weight, and its gradient
goes back to the shards.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from . import dist
from .config import ModelConfig

log = logging.getLogger("fastppo")

IGNORE_INDEX = -100
PAD_TOKEN = "<|fastppo_pad|>"


class ModelError(ValueError):
    """A model or tokenizer that fastppo cannot use, with the reason."""


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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
    """Policy and reward model must share one tokenizer (SPEC §1)."""
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

def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _grow_embeddings(model, n_tokens: int, what: str) -> None:
    current = model.get_input_embeddings().num_embeddings
    if current < n_tokens:
        # mean_resizing=False: deterministic init (the new row is only the pad token, always masked)
        model.resize_token_embeddings(n_tokens, mean_resizing=False)
        log.info("%s: embeddings resized %d -> %d for the added pad token", what, current, n_tokens)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer inside a *ForCausalLM / *ForSequenceClassification model."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None:
        raise ModelError(f"cannot find the backbone of {type(model).__name__} (base_model_prefix={model.base_model_prefix!r})")
    return body


def scalar_head(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
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
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **overrides)
    for key, value in list(vars(config).items()):
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float) and value > 0:
            setattr(config, key, 0.0)
    return config


@dataclass
class Models:
    policy: nn.Module
    """Causal LM, trained."""
    ref: nn.Module
    """Frozen copy of the policy at start."""
    critic: nn.Module
    """Sequence-classification model, trained; head applied at every position."""
    reward: nn.Module
    """Sequence-classification model, frozen; score read at EOS."""
    tokenizer: object
    """Shared tokenizer (pad distinct from EOS)."""
    fused_lm_head: bool
    """Whether logprobs use linear_token_logprobs (else full logits + token_logprobs)."""


def load_models(cfg: ModelConfig, device: torch.device, shard: "dist.Sharder | None" = None) -> Models:
    """Load the four models; with `shard`, each is sharded (FSDP2) right after it is loaded, so that at most
    two unsharded models exist at a time (the policy and its reference copy), on the host."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = _dtype(cfg.dtype)
    kw = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg.policy_path, trust_remote_code=cfg.trust_remote_code)
    try:
        reward_tok = load_tokenizer(cfg.reward_path, trust_remote_code=cfg.trust_remote_code)
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
        _grow_embeddings(model, n_tok, what)
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

    policy = fit_tokenizer(dist.from_pretrained(
        AutoModelForCausalLM, cfg.policy_path, shard, config=no_dropout_config(cfg.policy_path, cfg), **kw), "policy")
    reason = fused_lm_head_supported(policy)
    # The reference must equal the policy exactly, including any resized rows: copy it before either is sharded.
    ref = prepare(copy.deepcopy(policy), "reference", trained=False)
    policy = prepare(policy, "policy", trained=True)
    reward = prepare(fit_tokenizer(dist.from_pretrained(
        AutoModelForSequenceClassification, cfg.reward_path, shard,
        config=no_dropout_config(cfg.reward_path, cfg, num_labels=1), **kw), "reward"),
        "reward", trained=False)
    critic_path = cfg.critic_path or cfg.reward_path
    critic = prepare(fit_tokenizer(dist.from_pretrained(
        AutoModelForSequenceClassification, critic_path, shard,
        config=no_dropout_config(critic_path, cfg, num_labels=1), **kw), "critic"),
        "critic", trained=True)
    if reason is not None:
        log.warning("fused lm_head logprobs disabled (%s): falling back to full logits + token_logprobs", reason)
    return Models(policy, ref, critic, reward, tokenizer, fused_lm_head=reason is None)


# ----------------------------------------------------------------------------
# Forwards
# ----------------------------------------------------------------------------

def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting only attended tokens; 0 on left padding (as HF generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, L, H) of the model's backbone (final norm included).

    Under FSDP this is a forward of the root, whose parameters (embeddings,
    lm_head) then stay gathered until its backward or `dist.reshard`, so a
    caller may still read `model.get_output_embeddings().weight` in full.
    """
    return dist.run_as_forward(model, _hidden_states, input_ids, attention_mask)


class LogprobsAndEntropy(NamedTuple):
    logprobs: torch.Tensor
    """(B, R) float32 log pi(y_t | y_<t) at temperature T; 0 off the response mask."""
    entropy: torch.Tensor | None
    """(B, R) float32 entropy of pi(. | y_<t) at temperature T; 0 off the mask; None when not asked."""


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
) -> LogprobsAndEntropy:
    """Logprobs of the response tokens input_ids[:, P:] under softmax(logits / T).

    input_ids, attention_mask: (B, P+R); response_mask: (B, R) bool.
    Token y_t at column P+t is predicted by the hidden state at column P+t-1.
    """
    from .kernels import token_logprobs

    labels = torch.where(response_mask, input_ids[:, prompt_width:], IGNORE_INDEX)     # (B, R)
    if fused:
        out = dist.run_as_forward(model, _fused_response_logprobs, input_ids, attention_mask, labels,
                                  prompt_width=prompt_width, temperature=temperature, return_entropy=return_entropy,
                                  backend=backend, chunk_size=chunk_size)
    else:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask), use_cache=False,
        ).logits[:, prompt_width - 1:-1]                                                 # (B, R, V)
        out = token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy,
                             ignore_index=IGNORE_INDEX, backend=backend)
    if return_entropy:
        return LogprobsAndEntropy(out[0], out[1])
    return LogprobsAndEntropy(out, None)


def _fused_response_logprobs(model, input_ids, attention_mask, labels, *, prompt_width, temperature, return_entropy,
                             backend, chunk_size):
    from .kernels import linear_token_logprobs

    hidden = _hidden_states(model, input_ids, attention_mask)[:, prompt_width - 1:-1]     # (B, R, H)
    out = linear_token_logprobs(
        hidden, model.get_output_embeddings().weight, labels,                            # the full (V, H) weight
        temperature=temperature, return_entropy=return_entropy, ignore_index=IGNORE_INDEX,
        backend=backend, chunk_size=chunk_size,
    )
    # (B, R) copies, not views of the op's buffer: FSDP hooks the backward on what a forward returns.
    return tuple(t.clone() for t in out) if return_entropy else out.clone()


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                      fused: bool = True, backend: str | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """(B, L) float32 log pi(labels[:, j] | input_ids[:, :j+1]) at temperature 1; 0 where labels == IGNORE_INDEX."""
    from .kernels import token_logprobs

    if fused:
        return dist.run_as_forward(model, _fused_sequence_logprobs, input_ids, attention_mask, labels,
                                   backend=backend, chunk_size=chunk_size)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    return token_logprobs(logits, labels, ignore_index=IGNORE_INDEX, backend=backend)


def _fused_sequence_logprobs(model, input_ids, attention_mask, labels, *, backend, chunk_size):
    from .kernels import linear_token_logprobs

    hidden = _hidden_states(model, input_ids, attention_mask)                            # (B, L, H)
    return linear_token_logprobs(hidden, model.get_output_embeddings().weight, labels, ignore_index=IGNORE_INDEX,
                                 backend=backend, chunk_size=chunk_size).clone()             # not a view (as above)


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) float32: the scalar head applied at every position."""
    return dist.run_as_forward(model, _token_values, input_ids, attention_mask)


def _token_values(model, input_ids, attention_mask):
    # A copy, not a view of the head's output (FSDP's backward hooks live on the forward's output tensor).
    return scalar_head(model)(_hidden_states(model, input_ids, attention_mask)).squeeze(-1).to(torch.float32, copy=True)


def response_values(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, *, prompt_width: int
) -> torch.Tensor:
    """(B, R) float32 critic values aligned with logprobs: V of y_t is read at column P+t-1 (the state before y_t)."""
    values = token_values(model, input_ids, attention_mask)[:, prompt_width - 1:-1]
    return values * response_mask


def score_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B,) float32 reward-model score read at column index[b] (the EOS token)."""
    return dist.run_as_forward(model, _score_at, input_ids, attention_mask, index)


def _score_at(model, input_ids, attention_mask, index):
    hidden = _hidden_states(model, input_ids, attention_mask)                           # (B, L, H)
    at = hidden.gather(1, index.view(-1, 1, 1).expand(-1, 1, hidden.size(-1))).squeeze(1)  # (B, H)
    return scalar_head(model)(at).squeeze(-1).to(torch.float32, copy=True)
