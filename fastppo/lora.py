"""LoRA (Hu et al. 2021, arXiv 2106.09685) for the policy, the critic and the stages, through PEFT.

A LoRA model here is the Hugging Face model itself, with PEFT's adapter layers injected in place
(`apply`): every fastppo function that takes a model (the forwards of `fastppo.models`, FSDP2
sharding, generation, checkpoints) takes it unchanged. The PeftModel that PEFT builds around it is kept
on it (`peft_model`) for what only PEFT does: disabling the adapters, merging them, saving them.

- Trained: the adapters A (r, in) and B (out, r), B initialised to 0, each adapted linear layer
  computing x W^T + (alpha / r) x A^T B^T; and a sequence classifier's scalar head, in full (PEFT's
  modules_to_save). Nothing else requires grad, so `ppo.make_optimizer` hands AdamW only those, and
  checkpoints hold only those (`checkpoint`: frozen parameters are left out).
- The reference of PPO is the policy with its adapters disabled (`ReferenceView`), not a copy: the
  base weights, the lm_head included, exist once. Its logprobs go through the same fused
  `linear_token_logprobs` on the same lm_head weight as the policy's.
- The lm_head is never adapted: the fused ops read lm_head.weight itself, which an adapter on the
  lm_head would bypass; a model.lora.target_modules that reaches it is refused (`apply`).
- Export (`save_export`): the adapters merged into the base weights, W + (alpha / r) B A (PEFT's
  merge_and_unload on a copy built from the full state dict), as a plain Hugging Face model; or, with
  run.export_adapter, the adapter alone in PEFT's format (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Iterator

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import parallel
from .config import ConfigError, LoraConfig

log = logging.getLogger("fastppo")

_WRAPPER = "_fastppo_peft_model"   # key in the model's __dict__: the PeftModel (not a submodule: no cycle in modules())


def apply(model: nn.Module, lc: LoraConfig, *, field: str, classifier: bool) -> nn.Module:
    """Inject LoRA adapters into `model` (in place) and freeze everything else; returns `model`.

    classifier: a sequence-classification model, whose scalar head (score / classifier) is then trained in
    full and saved with the adapter. field: the config field of `lc`, for messages.
    Call before sharding (the adapters are sharded with their blocks) and before the optimizer is built.
    """
    targets = lc.target_modules
    config = peft.LoraConfig(
        r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
        # PEFT's "all-linear" is a string (a list would be read as a module called "all-linear"); it leaves
        # out the output layer (lm_head) and, for SEQ_CLS, the scalar head.
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        task_type="SEQ_CLS" if classifier else "CAUSAL_LM",
    )
    try:
        wrapper = _get_peft_model(model, config)
    except ValueError as exc:   # PEFT: "Target modules {...} not found in the base model"
        raise ConfigError(f"{field}.target_modules={list(targets)}: {str(exc).splitlines()[0]}") from None
    head = model.get_output_embeddings() if not classifier else None
    if head is not None and isinstance(head, BaseTunerLayer):
        raise ConfigError(f"{field}.target_modules={list(targets)} adapts the lm_head: the fused logprob ops read "
                          "lm_head.weight directly and would ignore its adapter; leave the lm_head out "
                          "(all-linear already does)")
    model.__dict__[_WRAPPER] = wrapper
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("%s: LoRA rank %d, alpha %g on %d modules: %d of %d parameters trained (%.2f%%)", field, lc.rank,
             lc.alpha, sum(isinstance(m, BaseTunerLayer) for m in model.modules()), trained, total,
             100.0 * trained / max(total, 1))
    return model


def _get_peft_model(model: nn.Module, config: peft.LoraConfig) -> peft.PeftModel:
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated is_gradient_checkpointing, and says that it transposes GPT-2's
        # Conv1D weights (fan_in_fan_out), which it handles: neither is the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False", category=UserWarning)
        return peft.get_peft_model(model, config)


def peft_model(model: nn.Module) -> "peft.PeftModel | None":
    """The PeftModel around a model `apply` adapted (None: no adapters)."""
    return model.__dict__.get(_WRAPPER)


def is_lora(model: nn.Module) -> bool:
    return peft_model(model) is not None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base model: every adapter (and modules_to_save copy) off inside the block."""
    with peft_model(model).disable_adapter():
        yield


class ReferenceView:
    """The PPO reference of a LoRA policy: the policy itself, run with its adapters disabled.

    Stands where a frozen copy of the policy would (`Models.ref`): its forwards (`parallel.run_as_forward`,
    which every function of `fastppo.models` goes through, and a plain call) run the policy inside
    `adapters_disabled`; every other attribute is the policy's (config, parameters, modules, ...). Under FSDP
    it is a forward of the policy's root, so the lm_head weight the fused op reads is the policy's own,
    gathered once. Used only without gradients (scoring).

    PEFT switches requires_grad of the adapters off and back on around a disabled forward; the policy's
    first forward (generation) comes before, which is when FSDP2 records which parameters are trained.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.__dict__["policy"] = policy

    def __getattr__(self, name: str):
        policy = self.__dict__.get("policy")
        if policy is None:            # not initialised (copy, pickle)
            raise AttributeError(name)
        return getattr(policy, name)

    def _as_forward(self, fn, *args, **kwargs):
        with adapters_disabled(self.policy):
            return parallel.run_as_forward(self.policy, fn, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)


setattr(ReferenceView, parallel.FORWARD_METHOD, ReferenceView._as_forward)   # the name run_as_forward looks up


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The (unsharded) model's state dict copied to the CPU: what an export may merge into."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_export(model: nn.Module, out: Path, *, state: dict[str, torch.Tensor] | None, adapter_only: bool) -> None:
    """Write the export of a LoRA model to `out`: the merged Hugging Face model, or the adapter alone.

    state: the model's full state dict on the CPU (a sharded model's, gathered by the caller); None: read from
    the (unsharded) model, copied to the CPU. The copy is built on the meta device and takes these tensors,
    so the live model is never touched and the host holds one full copy at most.
    """
    wrapper = peft_model(model)
    if state is None:
        state = cpu_state(model)
    # Merged in the adapters' (master) dtype: frozen base weights stored in a 16-bit compute dtype (`parallel.Sharder`)
    # would round away a small W + (alpha / r) B A update, as 16-bit master weights do.
    master = next(p.dtype for p in model.parameters() if p.requires_grad)
    state = {k: v.to(master) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        base = parallel.plain_class(model)(copy.deepcopy(model.config))
    copy_ = _get_peft_model(base, copy.deepcopy(wrapper.peft_config["default"]))
    base.load_state_dict(state, strict=True, assign=True)
    base.tie_weights()   # assign=True replaced tied parameters one by one
    if adapter_only:
        # The adapter alone: the embedding rows fastppo may have added (a pad token, alignment rows) are not
        # trained, and the pad token's row never changes another position's output, so they are not saved
        # (PEFT would otherwise save both V x H matrices whole). docs/lora.md: loading it over model.policy_path.
        copy_.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    else:
        copy_.merge_and_unload().save_pretrained(out, safe_serialization=True)
