"""Run configuration: nested dataclasses, presets, YAML + dotted overrides.

Every knob lives in one dataclass below with a docstring under it. A run's
config is built in layers, later ones winning:

    preset (ppo_max by default)  <-  YAML file  <-  dotted CLI overrides

OmegaConf merges the layers onto the dataclass schema, so an unknown key or a
value of the wrong type fails at start-up naming the field; `validate` then
checks ranges and cross-field constraints. Derived quantities are computed in
one place (`derived`), never stored.

Presets (Zheng et al. 2023 and the MOSS-RLHF scripts) are plain functions returning a full `Config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem; the message names the field."""


# ----------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------

@dataclass
class LoraConfig:
    rank: int = 16
    """r: rank of each low-rank update B·A (Hu et al. 2021)."""
    alpha: float = 32.0
    """α: the update is scaled by α / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (PEFT's lora_dropout). PPO compares update logprobs with rollout logprobs computed without dropout: keep 0 there."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (or name suffixes) that get adapters; ["all-linear"]: every linear layer of the attention and MLP blocks, never the lm_head nor a scalar head."""


@dataclass
class ModelConfig:
    policy_path: str = MISSING
    """SFT model (local Hugging Face directory or hub id): initialises the policy and the frozen reference."""
    reward_path: str = MISSING
    """Reward model (AutoModelForSequenceClassification, num_labels=1), e.g. the export of `fastppo train-rm`."""
    critic_path: Optional[str] = None
    """Sequence-classification model the critic starts from; null = reward_path (PPO-max: critic from the reward model)."""
    dtype: str = "float32"
    """Storage dtype of the four models: the master weights of the trained ones (their AdamW state has it too). Keep float32 and compute in bfloat16 with parallel.param_dtype; bfloat16/float16 with a learning rate under 1e-5 is refused (the updates round away)."""
    attn_implementation: str = "sdpa"
    """Attention implementation passed to from_pretrained: sdpa, eager or flash_attention_2 (GPU, when installed)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directories."""
    gradient_checkpointing: bool = False
    """Recompute activations of the trained models (policy, critic) in backward to save memory."""
    lm_head_chunk_size: Optional[int] = None
    """Rows per chunk for the fused lm_head + logprob op; null = the op's default."""
    lora: Optional[LoraConfig] = None
    """LoRA adapters for the policy (through PEFT); null = full fine-tuning. With them the reference is the policy with its adapters disabled: no second copy is loaded. Set with e.g. model.lora.rank=16."""
    critic_lora: Optional[LoraConfig] = None
    """LoRA adapters for the critic; its scalar head stays fully trained. null = full fine-tuning."""


@dataclass
class DataConfig:
    prompt_path: str = MISSING
    """Prompts: a .jsonl or .parquet file, or a directory (a saved `datasets` dataset, or .jsonl/.parquet files)."""
    prompt_field: str = "prompt"
    """Field holding the prompt: a string (plain text) or a list of {role, content} messages (chat template)."""
    prompt_format: str = "auto"
    """auto: strings are plain text and message lists use the chat template; chat: strings become one user message; plain: never use the template."""
    max_prompt_len: int = 256
    """Prompts longer than this many tokens keep their last max_prompt_len tokens (the end holds the generation prompt)."""
    shuffle: bool = True
    """Reshuffle the prompts every epoch (seeded by run.seed)."""
    ptx_path: Optional[str] = None
    """Optional SFT data for the ptx loss: JSONL/Parquet with prompt and response fields (or messages)."""
    ptx_prompt_field: str = "prompt"
    """Prompt field of the ptx data."""
    ptx_response_field: str = "response"
    """Response field of the ptx data (the LM loss covers these tokens only)."""
    ptx_messages_field: str = "messages"
    """Field with chat messages in the ptx data (used when the prompt field is absent; the last message is the response)."""
    max_ptx_len: int = 512
    """Prompt + response tokens of a ptx example are truncated to this length."""


@dataclass
class RolloutConfig:
    rollout_batch_size: int = 128
    """Prompts sampled per PPO iteration, all ranks together (each rank generates rollout_batch_size / world_size)."""
    generation_batch_size: Optional[int] = None
    """Prompts per generate() call on each rank (bounds the KV cache); null = the rank's whole share."""
    forward_batch_size: Optional[int] = None
    """Rows per no-grad forward on each rank when scoring experience; null = ppo.micro_batch_size."""
    max_new_tokens: int = 128
    """Longest response; responses cut here get EOS appended for scoring."""
    temperature: float = 0.8
    """Sampling temperature T; every logprob (old, ref, new) uses logits / T."""
    top_p: float = 0.9
    """Nucleus sampling threshold (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    repetition_penalty: float = 1.0
    """HF repetition penalty during sampling (1.0 = off; the paper's setup optionally uses 1.1)."""


@dataclass
class RewardConfig:
    reward_scale: bool = True
    """Divide scores by the running standard deviation (PPO-max §5.3.1)."""
    reward_norm: bool = True
    """Also subtract the running mean (requires reward_scale semantics: (s - mu) / sigma)."""
    reward_clip: Optional[float] = 0.8
    """Clamp the reparameterised score to [-delta, delta]; null = off."""
    missing_eos_penalty: Optional[float] = None
    """Subtracted from the raw score (reward-model units) of responses cut at max_new_tokens; null = off."""
    kl_coef: float = 0.05
    """beta of the token-level KL penalty r_t = -beta * KL_t (PPO-max §5.3.2); 0 = off."""
    kl_estimator: str = "k1"
    """Per-token KL estimator: k1, k2, k3 or abs."""
    kl_clamp: Optional[float] = None
    """Clamp the per-token KL estimate to [-c, c]; null = off."""
    adaptive_kl: bool = False
    """Adapt beta towards kl_target (proportional controller of Ziegler et al.)."""
    kl_target: float = 6.0
    """Target sequence KL (nats) for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (rollouts) of the adaptive controller."""


@dataclass
class PPOConfig:
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    minibatch_size: int = 32
    """Rollouts per optimizer step, all ranks together."""
    micro_batch_size: int = 8
    """Rollouts per forward/backward on each rank (gradient accumulation inside a minibatch); also the ptx batch per rank and step."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.9
    """lambda of GAE."""
    whiten_advantages: bool = False
    """Whiten advantages over the whole rollout batch (masked, global)."""
    advantage_clip: Optional[float] = None
    """Clamp advantages to [-c, c] after whitening; null = off."""
    clip_eps: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip: Optional[float] = 0.2
    """Value clip epsilon around the old values; null = off."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages; null = off."""
    vf_coef: float = 1.0
    """Weight of the value loss in the total loss (it only reaches the critic's gradients)."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    fused_policy_loss: bool = True
    """Policy loss + entropy bonus in one pass from the backbone's hidden states (`linear_ppo_loss`: gradients computed with the loss, no logits recompute); false = `linear_token_logprobs` + `ppo_loss`. Same numbers either way; lm_heads that are not a plain matmul always use full logits."""
    ptx_coef: float = 0.1
    """Weight of the ptx LM loss; used only when data.ptx_path is set."""
    critic_warmup_steps: int = 0
    """Iterations at the start during which only the critic trains (policy frozen; PPO-max §5.4)."""


@dataclass
class OptimConfig:
    policy_lr: float = 5e-7
    """Peak AdamW learning rate of the policy."""
    critic_lr: float = 1.65e-6
    """Peak AdamW learning rate of the critic."""
    weight_decay: float = 0.0
    """AdamW weight decay (both models)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear LR warmup, in optimizer steps of each model."""
    schedule: str = "constant"
    """LR after warmup: constant, linear or cosine (decaying to min_lr_ratio at the last step)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak for linear/cosine."""
    max_grad_norm: Optional[float] = 1.0
    """Global gradient-norm clip, applied per model; null = off."""


@dataclass
class RunConfig:
    output_dir: str = "runs/fastppo"
    """Run directory: resolved config, metrics, TensorBoard logs, checkpoints, export."""
    iterations: int = 100
    """PPO iterations (rollout + update) to run."""
    seed: int = 0
    """Seed of every random choice (prompt order, sampling, minibatch shuffles)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    backend: Optional[str] = None
    """Fused-op backend: null (triton on CUDA, torch elsewhere), triton or torch."""
    save_every: int = 50
    """Save a resumable checkpoint every N iterations (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""
    resume: Optional[str] = None
    """Checkpoint directory to resume from; 'latest' for the newest in output_dir/checkpoints; 'auto' for the newest if there is one, else a fresh start (a torchrun restart behaves as 'auto')."""
    stop_after: Optional[int] = None
    """Stop this invocation after N iterations with a resumable checkpoint (e.g. a time-limited job slot); null = run to `iterations`."""
    export_at_end: bool = True
    """Export the policy as a Hugging Face directory (safetensors + tokenizer) at the end."""
    max_nonfinite_in_a_row: int = 5
    """Abort after this many consecutive optimizer steps with a non-finite loss or gradient (each is skipped)."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress_bar: bool = True
    """Show a tqdm progress bar on a terminal; elsewhere (a log file, a pipe) log a progress line every 30 s instead."""
    log_level: str = "INFO"
    """Python logging level."""
    export_adapter: bool = False
    """With model.lora: export the policy's adapter alone in PEFT's format (adapter_config.json + weights, loaded with peft.PeftModel.from_pretrained over model.policy_path) instead of a merged Hugging Face model."""


@dataclass
class ParallelConfig:
    shard: str = "auto"
    """FSDP2 sharding of the four models: auto (whenever torchrun starts more than one process, and on CUDA also in one: FSDP2's mixed precision gives float32 master weights and bfloat16 compute), always (also in one CPU process), never (one process only; compute in param_dtype by torch.autocast)."""
    replicate_degree: int = 1
    """HSDP: size of the replicate dimension of a (replicate, shard) mesh, usually the number of nodes; models are sharded within a group of world_size / replicate_degree ranks and replicated across groups. 1 = plain FSDP over all ranks."""
    param_dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on CUDA, model.dtype on CPU), float32, bfloat16 or float16. Under FSDP it is MixedPrecisionPolicy.param_dtype (also the all-gather dtype): the trained models keep model.dtype shards (the optimizer's copy), the frozen ones are stored in it. With shard=never the transformer blocks of all four models run under torch.autocast(param_dtype) over model.dtype weights. Logits that feed a logprob, an entropy or the sampler are float32 either way."""
    reduce_dtype: str = "float32"
    """Dtype of the gradient reduce-scatter / all-reduce under FSDP (MixedPrecisionPolicy.reduce_dtype)."""
    offload_frozen: bool = False
    """Keep the shards of the reference and reward models in CPU memory (CPUOffloadPolicy), copied to the GPU for each forward. CUDA only."""
    reshard_after_forward: bool = True
    """Free the all-gathered blocks of the trained models after forward (re-gathered in backward); false keeps them until backward (less communication, more memory)."""
    unshard_for_generation: bool = True
    """All-gather the whole policy once per rollout and keep it gathered while generating, instead of all-gathering every block for every token."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    timeout_s: float = 600.0
    """Seconds a collective may wait before the rank gives up with an error (a failed or stuck peer); also the process-group init timeout."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The four models."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt and ptx data."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Score reparameterisation and KL penalty."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """GAE and the PPO update."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers and schedules."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run control, logging, checkpoints."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Multi-GPU / multi-node: process group, FSDP2 sharding, mixed precision."""


# ----------------------------------------------------------------------------
# Presets (Zheng et al. 2023)
# ----------------------------------------------------------------------------

def ppo_max() -> Config:
    """PPO-max as in the paper: token KL 0.05, reward scale+norm+clip 0.8, value clip, critic warm-up."""
    cfg = Config()
    cfg.reward = RewardConfig(reward_scale=True, reward_norm=True, reward_clip=0.8, kl_coef=0.05, kl_estimator="k1")
    cfg.ppo = PPOConfig(gamma=1.0, lam=0.9, whiten_advantages=False, clip_eps=0.2, value_clip=0.2,
                        ptx_coef=0.1, critic_warmup_steps=10)
    cfg.optim = OptimConfig(policy_lr=5e-7, critic_lr=1.65e-6, max_grad_norm=1.0)
    return cfg


def moss_release() -> Config:
    """The MOSS-RLHF reference scripts: KL 0.01, reward scaling only, lambda 0.95, no ptx."""
    cfg = Config()
    cfg.reward = RewardConfig(reward_scale=True, reward_norm=False, reward_clip=None, kl_coef=0.01, kl_estimator="k1")
    cfg.ppo = PPOConfig(gamma=1.0, lam=0.95, whiten_advantages=False, clip_eps=0.2, value_clip=0.2,
                        ptx_coef=0.0, critic_warmup_steps=0)
    cfg.optim = OptimConfig(policy_lr=5e-7, critic_lr=1.5e-6, max_grad_norm=1.0)
    return cfg


def vanilla() -> Config:
    """Plain PPO: no KL penalty, raw scores, advantage whitening, no value or grad-norm clipping."""
    cfg = Config()
    cfg.reward = RewardConfig(reward_scale=False, reward_norm=False, reward_clip=None, kl_coef=0.0, kl_estimator="k1")
    cfg.ppo = PPOConfig(gamma=1.0, lam=0.95, whiten_advantages=True, clip_eps=0.2, value_clip=None,
                        ptx_coef=0.0, critic_warmup_steps=0)
    cfg.optim = OptimConfig(policy_lr=5e-7, critic_lr=1.5e-6, max_grad_norm=None)
    return cfg


PRESETS = {"ppo_max": ppo_max, "moss_release": moss_release, "vanilla": vanilla}


# ----------------------------------------------------------------------------
# Loading, validation, derived values
# ----------------------------------------------------------------------------

def _field_name(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    return str(key) if key else "?"


def _merge(base: Any, layer: Any, what: str) -> Any:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"invalid config in {what}: field '{_field_name(exc)}': {msg}") from None


def load_config(
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> Config:
    """Build a validated Config: preset <- YAML <- dotted overrides (`ppo.clip_eps=0.1`).

    A YAML file may name its base with a top-level `preset:` key; an explicit
    `preset` argument wins over it.
    """
    layers = []
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml parse errors
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        if not OmegaConf.is_dict(file_cfg):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        file_preset = file_cfg.pop("preset", None)
        preset = preset or file_preset
        layers.append((file_cfg, str(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key.sub=value, got {bad[0]!r}")
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "command-line overrides"))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse overrides: {exc}") from None
    preset = preset or "ppo_max"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    merged = OmegaConf.structured(PRESETS[preset]())
    for layer, what in layers:
        merged = _merge(merged, layer, what)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config field(s) not set: {', '.join(missing)}")
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def from_dict(d: dict, preset: str = "ppo_max") -> Config:
    """Config from a nested dict (Python API), validated like a YAML file."""
    merged = _merge(OmegaConf.structured(PRESETS[preset]()), OmegaConf.create(d), "dict")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config field(s) not set: {', '.join(missing)}")
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config: field '{name}': {msg}")


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of a config (nested dataclasses, lists of floats) must be finite: NaN and inf fail naming the field.

    YAML and OmegaConf accept `.inf`, `inf` and `nan` for float fields; no field of fastppo gives them a meaning
    (an infinite kl_coef or timeout would only fail later, or silently poison the run).
    """
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                _check(not isinstance(v, float) or math.isfinite(v), f"{name}[{i}]", f"must be a finite number, got {v}")
        else:
            _check(not isinstance(value, float) or math.isfinite(value), name, f"must be a finite number, got {value}")


def _check_lora(lc: "LoraConfig | None", name: str) -> None:
    if lc is None:
        return
    _check(lc.rank > 0, f"{name}.rank", f"must be > 0, got {lc.rank}")
    _check(lc.alpha > 0, f"{name}.alpha", f"must be > 0, got {lc.alpha}")
    _check(0 <= lc.dropout < 1, f"{name}.dropout", f"must be in [0, 1), got {lc.dropout}")
    _check(len(lc.target_modules) > 0 and all(t for t in lc.target_modules), f"{name}.target_modules",
           "must name at least one module (or be [all-linear])")


def validate_device(name: str, cuda_devices: int, local_rank: int = 0) -> None:
    """run.device against this machine (`dist.resolve_device` calls it with torch's CUDA device count).

    `cuda` means cuda:<LOCAL_RANK> (one GPU per torchrun process).
    """
    if not name.startswith("cuda"):
        return
    _check(cuda_devices > 0, "run.device", f"is {name!r}, but CUDA is not available on this machine (use auto or cpu)")
    index = int(name.split(":", 1)[1]) if ":" in name else local_rank
    _check(index < cuda_devices, "run.device",
           f"is {name!r}{f' (LOCAL_RANK {local_rank})' if ':' not in name else ''}, but this machine has "
           f"{cuda_devices} CUDA device(s): cuda:0 to cuda:{cuda_devices - 1}")


def validate(cfg: Config) -> None:
    """Range and cross-field checks; every failure names the field."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a fastppo.config.Config, got {type(cfg).__name__}")
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            if getattr(getattr(cfg, section.name), f.name) is MISSING or getattr(getattr(cfg, section.name), f.name) == "???":
                raise ConfigError(f"required config field not set: {section.name}.{f.name}")
    m, d, r, rw, p, o, run = cfg.model, cfg.data, cfg.rollout, cfg.reward, cfg.ppo, cfg.optim, cfg.run
    _check(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"must be float32, bfloat16 or float16, got {m.dtype!r}")
    _check_finite(cfg)
    _check(m.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
           f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {m.attn_implementation!r}")
    _check(m.lm_head_chunk_size is None or m.lm_head_chunk_size > 0, "model.lm_head_chunk_size", "must be > 0")
    _check(d.prompt_format in ("auto", "chat", "plain"), "data.prompt_format", f"must be auto, chat or plain, got {d.prompt_format!r}")
    _check(d.max_prompt_len > 0, "data.max_prompt_len", "must be > 0")
    _check(d.max_ptx_len > 1, "data.max_ptx_len", "must be > 1")
    _check(r.rollout_batch_size > 0, "rollout.rollout_batch_size", "must be > 0")
    _check(r.generation_batch_size is None or r.generation_batch_size > 0, "rollout.generation_batch_size", "must be > 0")
    _check(r.forward_batch_size is None or r.forward_batch_size > 0, "rollout.forward_batch_size", "must be > 0")
    _check(r.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0 (logprobs use logits / T), got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.top_k >= 0, "rollout.top_k", "must be >= 0")
    _check(r.repetition_penalty > 0, "rollout.repetition_penalty", "must be > 0")
    _check(rw.reward_clip is None or rw.reward_clip > 0, "reward.reward_clip", "must be > 0 or null")
    _check(rw.kl_coef >= 0, "reward.kl_coef", "must be >= 0")
    _check(rw.kl_estimator in ("k1", "k2", "k3", "abs"), "reward.kl_estimator", f"must be k1, k2, k3 or abs, got {rw.kl_estimator!r}")
    _check(rw.kl_clamp is None or rw.kl_clamp > 0, "reward.kl_clamp", "must be > 0 or null")
    _check(rw.kl_target > 0, "reward.kl_target", "must be > 0")
    _check(rw.kl_horizon > 0, "reward.kl_horizon", "must be > 0")
    _check(p.ppo_epochs > 0, "ppo.ppo_epochs", "must be > 0")
    _check(p.minibatch_size > 0, "ppo.minibatch_size", "must be > 0")
    _check(p.micro_batch_size > 0, "ppo.micro_batch_size", "must be > 0")
    _check(r.rollout_batch_size % p.minibatch_size == 0, "ppo.minibatch_size",
           f"must divide rollout.rollout_batch_size ({r.rollout_batch_size}), got {p.minibatch_size}")
    _check(p.minibatch_size % p.micro_batch_size == 0, "ppo.micro_batch_size",
           f"must divide ppo.minibatch_size ({p.minibatch_size}), got {p.micro_batch_size}")
    _check(0 <= p.gamma <= 1, "ppo.gamma", "must be in [0, 1]")
    _check(0 <= p.lam <= 1, "ppo.lam", "must be in [0, 1]")
    _check(p.advantage_clip is None or p.advantage_clip > 0, "ppo.advantage_clip", "must be > 0 or null")
    _check(p.clip_eps > 0, "ppo.clip_eps", "must be > 0")
    _check(p.value_clip is None or p.value_clip > 0, "ppo.value_clip", "must be > 0 or null")
    _check(p.dual_clip is None or p.dual_clip > 1, "ppo.dual_clip", "must be > 1 or null")
    _check(p.vf_coef >= 0, "ppo.vf_coef", "must be >= 0")
    _check(p.ent_coef >= 0, "ppo.ent_coef", "must be >= 0")
    _check(p.ptx_coef >= 0, "ppo.ptx_coef", "must be >= 0")
    _check(p.critic_warmup_steps >= 0, "ppo.critic_warmup_steps", "must be >= 0")
    _check(o.policy_lr >= 0, "optim.policy_lr", "must be >= 0")
    _check(o.critic_lr >= 0, "optim.critic_lr", "must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    _check(o.eps > 0, "optim.eps", "must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.schedule in ("constant", "linear", "cosine"), "optim.schedule", f"must be constant, linear or cosine, got {o.schedule!r}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0 or null")
    _check(run.iterations >= 0, "run.iterations", "must be >= 0")
    _check(run.save_every >= 0, "run.save_every", "must be >= 0")
    _check(run.stop_after is None or run.stop_after > 0, "run.stop_after", "must be > 0 or null")
    _check(run.keep_last >= 1, "run.keep_last", "must be >= 1")
    _check(run.max_nonfinite_in_a_row >= 1, "run.max_nonfinite_in_a_row", "must be >= 1")
    _check(run.backend in (None, "triton", "torch"), "run.backend", f"must be null, triton or torch, got {run.backend!r}")
    _check(DEVICE_NAME.fullmatch(run.device) is not None, "run.device", f"must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    _check(run.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "run.log_level", "must be DEBUG, INFO, WARNING or ERROR")
    par = cfg.parallel
    _check(par.shard in ("auto", "always", "never"), "parallel.shard", f"must be auto, always or never, got {par.shard!r}")
    _check(par.replicate_degree >= 1, "parallel.replicate_degree", "must be >= 1")
    _check(par.param_dtype in ("auto", "float32", "bfloat16", "float16"), "parallel.param_dtype",
           f"must be auto, float32, bfloat16 or float16, got {par.param_dtype!r}")
    _check(par.reduce_dtype in ("float32", "bfloat16", "float16"), "parallel.reduce_dtype",
           f"must be float32, bfloat16 or float16, got {par.reduce_dtype!r}")
    _check(par.backend in ("auto", "nccl", "gloo"), "parallel.backend", f"must be auto, nccl or gloo, got {par.backend!r}")
    _check(par.timeout_s > 0, "parallel.timeout_s", "must be > 0")
    _check_lora(m.lora, "model.lora")
    _check_lora(m.critic_lora, "model.critic_lora")
    _check(not run.export_adapter or m.lora is not None, "run.export_adapter", "needs model.lora (there is no adapter)")
    validate_precision(cfg)


# Smallest learning rate a 16-bit master weight keeps. An AdamW step moves a weight by about lr (the
# update m/sqrt(v) is of order 1), and rounding drops any move under half an ulp of the weight: bfloat16
# keeps 8 significant bits, so a weight of 0.02 (a typical initialisation scale) has an ulp of
# 2^-6 * 2^-7 = 1.2e-4, and below lr ~ 1e-5 nearly every update of nearly every weight rounds away
# (float16, 11 bits: ulp(0.02) = 1.5e-5, the same order).
MIN_LR_16BIT_MASTER = 1e-5


def validate_precision(cfg) -> None:
    """Refuse 16-bit master weights with a learning rate their rounding would swallow (the model would
    silently stop learning); float32 master weights (with bfloat16 compute in `train`) are the remedy.
    cfg: a Config, SFTConfig or RMConfig."""
    m, o = cfg.model, cfg.optim
    if m.dtype == "float32":
        return
    if isinstance(cfg, Config):
        lrs = (("optim.policy_lr", o.policy_lr), ("optim.critic_lr", o.critic_lr))
        remedy = "use model.dtype=float32 with parallel.param_dtype=bfloat16 (float32 master weights, bfloat16 compute)"
    else:
        lrs = (("optim.lr", o.lr),)
        remedy = "use model.dtype=float32"
    for name, lr in lrs:
        _check(not 0 < lr < MIN_LR_16BIT_MASTER, "model.dtype",
               f"{m.dtype} master weights (and AdamW state) round away updates of {name}={lr:g} "
               f"(< {MIN_LR_16BIT_MASTER:g}): {remedy}")


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes: the global batch sizes must split evenly over ranks."""
    r, p = cfg.rollout, cfg.ppo
    _check(r.rollout_batch_size % world_size == 0, "rollout.rollout_batch_size",
           f"must be divisible by the number of processes ({world_size}), got {r.rollout_batch_size}")
    _check(p.minibatch_size % (world_size * p.micro_batch_size) == 0, "ppo.minibatch_size",
           f"must be divisible by processes x ppo.micro_batch_size ({world_size} x {p.micro_batch_size}), "
           f"got {p.minibatch_size}")
    _check(world_size % cfg.parallel.replicate_degree == 0, "parallel.replicate_degree",
           f"must divide the number of processes ({world_size}), got {cfg.parallel.replicate_degree}")


@dataclass(frozen=True)
class Derived:
    """Quantities computed from the config in one place.

    rollout.rollout_batch_size and ppo.minibatch_size are global (all ranks
    together); micro-, generation- and forward-batch sizes are per rank.
    """
    world_size: int
    rollouts_per_rank: int
    minibatch_per_rank: int
    minibatches_per_epoch: int
    micro_batches_per_minibatch: int
    generation_batch_size: int
    forward_batch_size: int
    policy_optimizer_steps: int
    critic_optimizer_steps: int


def derived(cfg: Config, world_size: int = 1) -> Derived:
    mb_per_epoch = cfg.rollout.rollout_batch_size // cfg.ppo.minibatch_size
    steps_per_iter = mb_per_epoch * cfg.ppo.ppo_epochs
    rollouts_per_rank = cfg.rollout.rollout_batch_size // world_size
    return Derived(
        world_size=world_size,
        rollouts_per_rank=rollouts_per_rank,
        minibatch_per_rank=cfg.ppo.minibatch_size // world_size,
        minibatches_per_epoch=mb_per_epoch,
        micro_batches_per_minibatch=cfg.ppo.minibatch_size // (cfg.ppo.micro_batch_size * world_size),
        generation_batch_size=cfg.rollout.generation_batch_size or rollouts_per_rank,
        forward_batch_size=cfg.rollout.forward_batch_size or cfg.ppo.micro_batch_size,
        policy_optimizer_steps=max(0, cfg.run.iterations - cfg.ppo.critic_warmup_steps) * steps_per_iter,
        critic_optimizer_steps=cfg.run.iterations * steps_per_iter,
    )


# ----------------------------------------------------------------------------
# The stages before PPO: `fastppo sft` and `fastppo train-rm`
# ----------------------------------------------------------------------------
# Same layering as `Config` (defaults <- YAML <- dotted overrides, unknown keys
# and bad values fail naming the field); loaded with `load_stage_config`.

@dataclass
class StageModelConfig:
    path: str = MISSING
    """Model to start from (local Hugging Face directory or hub id). sft: a causal LM. train-rm: a causal LM (e.g. the SFT export; a fresh scalar head is added) or a sequence-classification model."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """Attention implementation passed to from_pretrained: sdpa, eager or flash_attention_2."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directory."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    lm_head_chunk_size: Optional[int] = None
    """Rows per chunk for the fused lm_head + logprob op; null = the op's default."""
    lora: Optional[LoraConfig] = None
    """LoRA adapters (through PEFT) instead of full fine-tuning; train-rm also trains the scalar head fully. null = full fine-tuning."""


@dataclass
class StageDataConfig:
    train_path: str = MISSING
    """Training records: .jsonl, .parquet or a directory (as data.prompt_path of `train`)."""
    eval_path: Optional[str] = None
    """Held-out records; null = hold out eval_fraction of train_path (a seeded split)."""
    eval_fraction: float = 0.05
    """Fraction of train_path held out when eval_path is null (0 = no evaluation)."""
    prompt_field: str = "prompt"
    """Prompt field: a string or a list of {role, content} messages (chat template)."""
    response_field: str = "response"
    """sft: the response field (the loss covers these tokens only)."""
    chosen_field: str = "chosen"
    """train-rm: the preferred response (a string, or messages whose last turn is the assistant's)."""
    rejected_field: str = "rejected"
    """train-rm: the dispreferred response (same form as chosen_field)."""
    messages_field: str = "messages"
    """sft: chat messages used when the prompt field is absent (the last message is the response)."""
    max_len: int = 512
    """Prompt + response tokens (EOS included) are cut to this length, the prompt from the left first."""
    shuffle: bool = True
    """Reshuffle the training records every epoch (seeded by run.seed)."""


@dataclass
class StageOptimConfig:
    lr: float = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear LR warmup, in optimizer steps."""
    schedule: str = "cosine"
    """LR after warmup: constant, linear or cosine (decaying to min_lr_ratio at the last step)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak for linear/cosine."""
    max_grad_norm: Optional[float] = 1.0
    """Global gradient-norm clip; null = off."""


@dataclass
class StageRunConfig:
    output_dir: str = "runs/stage"
    """Run directory: resolved config, metrics.jsonl, TensorBoard logs, the exported model (export/)."""
    epochs: float = 1.0
    """Passes over the training records (fractions allowed); ignored when max_steps is set."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; null = derived from epochs."""
    batch_size: int = 32
    """Examples (sft) or pairs (train-rm) per optimizer step."""
    micro_batch_size: int = 8
    """Examples or pairs per forward/backward (gradient accumulation inside a step)."""
    eval_every: int = 50
    """Evaluate on the held-out split every N optimizer steps (and at the end); 0 = only at the end."""
    eval_batch_size: int = 64
    """Examples or pairs per forward during evaluation."""
    seed: int = 0
    """Seed of every random choice (split, order, head initialisation)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    backend: Optional[str] = None
    """Fused-op backend: null (triton on CUDA, torch elsewhere), triton or torch."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress_bar: bool = True
    """Show a tqdm progress bar on a terminal; elsewhere (a log file, a pipe) log a progress line every 30 s instead."""
    log_every: int = 1
    """Write a metrics record every N optimizer steps."""
    max_nonfinite_in_a_row: int = 5
    """Abort after this many consecutive optimizer steps with a non-finite loss or gradient (each is skipped)."""
    log_level: str = "INFO"
    """Python logging level."""
    export_adapter: bool = False
    """With model.lora: export the adapter alone in PEFT's format instead of the merged model."""


@dataclass
class SFTConfig:
    model: StageModelConfig = field(default_factory=StageModelConfig)
    """The causal LM to fine-tune."""
    data: StageDataConfig = field(default_factory=StageDataConfig)
    """{prompt, response} records or chat messages."""
    optim: StageOptimConfig = field(default_factory=StageOptimConfig)
    """Optimizer and schedule."""
    run: StageRunConfig = field(default_factory=lambda: StageRunConfig(output_dir="runs/sft"))
    """Run control and logging."""


@dataclass
class RMLossConfig:
    lm_coef: float = 0.0
    """Weight of an LM loss on the chosen responses (0 = off). Needs model.path to hold a causal LM (its lm_head is kept beside the reward model during training, not exported)."""
    margin_reg: float = 0.0
    """Weight of an L2 penalty on the scores, (r_c^2 + r_r^2)/2, keeping them near 0 (0 = off)."""


@dataclass
class RMConfig:
    model: StageModelConfig = field(default_factory=StageModelConfig)
    """The model the reward model starts from."""
    data: StageDataConfig = field(default_factory=StageDataConfig)
    """{prompt, chosen, rejected} records."""
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    """Loss terms beyond -log sigmoid(r_c - r_r)."""
    optim: StageOptimConfig = field(default_factory=StageOptimConfig)
    """Optimizer and schedule."""
    run: StageRunConfig = field(default_factory=lambda: StageRunConfig(output_dir="runs/rm"))
    """Run control and logging."""


def load_stage_config(schema: type, yaml_path: str | Path | None = None, overrides: list[str] | None = None,
                      base: Any = None) -> Any:
    """An SFTConfig or RMConfig: defaults (or `base`) <- YAML <- dotted overrides, validated."""
    merged = OmegaConf.structured(base if base is not None else schema())
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        merged = _merge(merged, file_cfg, str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key.sub=value, got {bad[0]!r}")
        try:
            merged = _merge(merged, OmegaConf.from_dotlist(list(overrides)), "command-line overrides")
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse overrides: {exc}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config field(s) not set: {', '.join(missing)}")
    cfg = OmegaConf.to_object(merged)
    validate_stage(cfg)
    return cfg


def validate_stage(cfg: Any) -> None:
    """Range checks of an SFTConfig / RMConfig; every failure names the field."""
    if not isinstance(cfg, (SFTConfig, RMConfig)):
        raise ConfigError(f"expected an SFTConfig or RMConfig, got {type(cfg).__name__}")
    m, d, o, run = cfg.model, cfg.data, cfg.optim, cfg.run
    _check_finite(cfg)
    _check(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"must be float32, bfloat16 or float16, got {m.dtype!r}")
    validate_precision(cfg)
    _check(m.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
           f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {m.attn_implementation!r}")
    _check(m.lm_head_chunk_size is None or m.lm_head_chunk_size > 0, "model.lm_head_chunk_size", "must be > 0")
    _check(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    _check(d.max_len > 1, "data.max_len", "must be > 1")
    _check(o.lr >= 0, "optim.lr", "must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    _check(o.eps > 0, "optim.eps", "must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.schedule in ("constant", "linear", "cosine"), "optim.schedule", f"must be constant, linear or cosine, got {o.schedule!r}")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0 or null")
    _check(run.epochs > 0, "run.epochs", "must be > 0")
    _check(run.max_steps is None or run.max_steps > 0, "run.max_steps", "must be > 0 or null")
    _check(run.batch_size > 0, "run.batch_size", "must be > 0")
    _check(run.micro_batch_size > 0, "run.micro_batch_size", "must be > 0")
    _check(run.batch_size % run.micro_batch_size == 0, "run.micro_batch_size",
           f"must divide run.batch_size ({run.batch_size}), got {run.micro_batch_size}")
    _check(run.eval_every >= 0, "run.eval_every", "must be >= 0")
    _check(run.eval_batch_size > 0, "run.eval_batch_size", "must be > 0")
    _check(run.log_every > 0, "run.log_every", "must be > 0")
    _check(run.max_nonfinite_in_a_row >= 1, "run.max_nonfinite_in_a_row", "must be >= 1")
    _check(run.backend in (None, "triton", "torch"), "run.backend", f"must be null, triton or torch, got {run.backend!r}")
    _check(DEVICE_NAME.fullmatch(run.device) is not None, "run.device", f"must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    _check(run.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "run.log_level", "must be DEBUG, INFO, WARNING or ERROR")
    _check_lora(m.lora, "model.lora")
    _check(not run.export_adapter or m.lora is not None, "run.export_adapter", "needs model.lora (there is no adapter)")
    if isinstance(cfg, RMConfig):
        _check(cfg.loss.lm_coef >= 0, "loss.lm_coef", "must be >= 0")
        _check(cfg.loss.margin_reg >= 0, "loss.margin_reg", "must be >= 0")
