"""Run configuration: one schema of nested dataclasses, presets, YAML + dotted overrides.

Every knob lives in one dataclass below with a docstring under it. `train`, `sft` and `train-rm` share
the sections whose fields mean the same in each (`BaseModelConfig`, `BaseDataConfig`, `BaseOptimConfig`,
`BaseRunConfig`): such a field is declared once, and its check is written once. A run's config is built
in layers, later ones winning:

    defaults (train: a preset, ppo_max by default)  <-  YAML file  <-  dotted CLI overrides

`load_config` merges the layers onto the schema with OmegaConf, so an unknown key, a value of the wrong
type or a choice outside its `Choice` enum fails at start-up naming the field; `validate` then checks
every field (set, finite, one of its choices) in one walk, each section's ranges (`SECTION_CHECKS`) and
the constraints across sections. Derived quantities are computed in one place (`derived`), never stored.

Presets (Zheng et al. 2023 and the MOSS-RLHF scripts) are plain functions returning a full `Config`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("fastppo")


class ConfigError(ValueError):
    """A configuration problem; the message names the field."""


# ----------------------------------------------------------------------------
# Choices: a field that takes one of a fixed set of strings
# ----------------------------------------------------------------------------

class Choice(str, Enum):
    """A config value from a fixed set. Members are strings (`cfg.reward.kl_estimator == "k1"` holds) and
    print as their value; OmegaConf reads a YAML or command-line string by member name, so name == value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choice(name: str, *values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


DType = _choice("DType", "float32", "bfloat16", "float16")
ComputeDType = _choice("ComputeDType", "auto", "float32", "bfloat16", "float16")
AttnImplementation = _choice("AttnImplementation", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                             "flex_attention")
OpBackend = _choice("OpBackend", "triton", "torch")
PromptFormat = _choice("PromptFormat", "auto", "chat", "plain")
KLEstimator = _choice("KLEstimator", "k1", "k2", "k3", "abs")
Schedule = _choice("Schedule", "constant", "linear", "cosine")
Shard = _choice("Shard", "auto", "always", "never")
CommBackend = _choice("CommBackend", "auto", "nccl", "gloo")
OldLogprobs = _choice("OldLogprobs", "recompute", "reuse")
RolloutEngine = _choice("RolloutEngine", "hf", "static")
RolloutCorrection = _choice("RolloutCorrection", "none", "token", "sequence")
Advantage = _choice("Advantage", "gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
LossAgg = _choice("LossAgg", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
FunctionErrors = _choice("FunctionErrors", "raise", "invalid")
ObservationRole = _choice("ObservationRole", "user", "tool")
RatioLevel = _choice("RatioLevel", "token", "sequence")
PolicyLoss = _choice("PolicyLoss", "ppo", "cispo")
HealthAction = _choice("HealthAction", "warn", "stop")


# ----------------------------------------------------------------------------
# Sections shared by train, sft and train-rm
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
class BaseModelConfig:
    dtype: DType = DType.float32
    """Storage dtype of the models: the master weights of the trained ones (their AdamW state has it too). Keep float32 (`train` then computes in bfloat16 with parallel.param_dtype); bfloat16/float16 with a learning rate under 1e-5 is refused (the updates round away)."""
    attn_implementation: AttnImplementation = AttnImplementation.sdpa
    """Attention implementation passed to from_pretrained: sdpa, eager, flash_attention_2 (GPU, when installed), flash_attention_3 or flex_attention."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model directories."""
    gradient_checkpointing: bool = False
    """Recompute activations of the trained models in backward to save memory."""
    lm_head_chunk_size: Optional[int] = None
    """Rows per chunk for the fused lm_head + logprob op; null = the op's default."""
    lora: Optional[LoraConfig] = None
    """LoRA adapters (through PEFT) instead of full fine-tuning, e.g. model.lora.rank=16; null = full fine-tuning. train: the policy's, and the reference is then the policy with its adapters disabled (no second copy is loaded); train-rm: the scalar head stays fully trained."""


@dataclass
class BaseDataConfig:
    prompt_field: str = "prompt"
    """Field holding the prompt: a string (plain text) or a list of {role, content} messages (chat template)."""
    shuffle: bool = True
    """Reshuffle the prompts (train) or the training records (sft, train-rm) every epoch (seeded by run.seed)."""
    max_unknown_token_frac: float = 0.05
    """Largest fraction of a text field's tokens (first 64 records) that may be the tokenizer's unknown token; more stops the run naming the field (often not the text, or the wrong tokenizer). 1 = no check."""


@dataclass
class BaseOptimConfig:
    weight_decay: float = 0.0
    """AdamW weight decay (every trained model)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear LR warmup, in optimizer steps of each model."""
    schedule: Schedule = Schedule.constant
    """LR after warmup: constant, linear or cosine (decaying to min_lr_ratio at the last step)."""
    min_lr_ratio: float = 0.0
    """Final LR as a fraction of the peak for linear/cosine."""
    max_grad_norm: Optional[float] = 1.0
    """Global gradient-norm clip, applied per model; null = off."""


@dataclass
class BaseRunConfig:
    output_dir: str = "runs/fastppo"
    """Run directory: the resolved config, metrics.jsonl, TensorBoard logs, train.log, checkpoints (train) and the export."""
    seed: int = 0
    """Seed of every random choice (data order and split, sampling, minibatch shuffles, new head initialisation), in [0, 2^32)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    backend: Optional[OpBackend] = None
    """Fused-op backend: null (triton on CUDA, torch elsewhere), triton or torch."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress_bar: bool = True
    """Show a tqdm progress bar on a terminal; elsewhere (a log file, a pipe) log a progress line every 30 s instead."""
    max_nonfinite_in_a_row: int = 5
    """Abort after this many consecutive optimizer steps with a non-finite loss or gradient (each is skipped)."""
    log_level: str = "INFO"
    """Python logging level: DEBUG, INFO, WARNING or ERROR (any case)."""
    export_adapter: bool = False
    """With model.lora: export the adapter alone in PEFT's format (adapter_config.json + weights, loaded with peft.PeftModel.from_pretrained over the base model) instead of a merged Hugging Face model."""


# ----------------------------------------------------------------------------
# `fastppo train`: PPO-max
# ----------------------------------------------------------------------------

@dataclass
class ModelConfig(BaseModelConfig):
    policy_path: str = MISSING
    """SFT model (local Hugging Face directory or hub id): initialises the policy and the frozen reference."""
    reward_path: Optional[str] = None
    """Reward model (AutoModelForSequenceClassification, num_labels=1), e.g. the export of `fastppo train-rm`; null = reward.functions alone score (one of the two is required)."""
    critic_path: Optional[str] = None
    """Sequence-classification model the critic starts from; null = reward_path (PPO-max: critic from the reward model)."""
    critic_lora: Optional[LoraConfig] = None
    """LoRA adapters for the critic; its scalar head stays fully trained. null = full fine-tuning."""


@dataclass
class DataConfig(BaseDataConfig):
    prompt_path: str = MISSING
    """Prompts: a JSON Lines file (.jsonl or .json, one object per line) or a .parquet file, or a directory (a saved `datasets` dataset, or such files, all read; files named like held-out splits, test.jsonl or eval.parquet, are refused there)."""
    prompt_format: PromptFormat = PromptFormat.auto
    """auto: strings are plain text and message lists use the chat template; chat: strings become one user message; plain: never use the template."""
    max_prompt_len: int = 256
    """Prompts longer than this many tokens keep their last max_prompt_len tokens (the end holds the generation prompt), counted in a warning; data in which every prompt would lose more than half its tokens is refused."""
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
    """Prompts sampled per PPO iteration, all ranks together (each rank generates rollout_batch_size / world_size of them, n_samples_per_prompt responses each)."""
    generation_batch_size: Optional[int] = None
    """Rows (responses) per generate() call on each rank (bounds the KV cache); null = the rank's whole share."""
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
    old_logprobs: OldLogprobs = OldLogprobs.recompute
    """pi_old of the PPO ratio: recompute (the score phase runs the policy again and logs its mismatch with the generator's logprobs, rollout/*) or reuse (pi_old := the generator's logprobs; no policy forward when scoring). See docs/engines.md."""
    compile: bool = False
    """Generate with a static KV cache and a compiled decode step: with engine hf, torch.compile through HF generate; with engine static, the decode step captured as a CUDA graph (CUDA only)."""
    engine: RolloutEngine = RolloutEngine.hf
    """Generation engine: hf (HF generate on the policy, the reference) or static (one KV cache for generation_batch_size slots, continuous batching, each prompt prefilled once for its G samples; the same tokens as hf for a seed; Llama, Qwen2, Mistral and GPT-2 policies, repetition_penalty 1). See docs/rollout.md."""
    forward_batch_tokens: Optional[int] = None
    """Token budget of each no-grad forward when scoring experience (sequences bin-packed, longest first); replaces forward_batch_size when set. Counts packed tokens with ppo.packing, else rows x padded width."""
    n_samples_per_prompt: int = 1
    """G responses per prompt (a group, each with its own sampling noise): a rollout batch is rollout_batch_size prompts x G rows. grpo, rloo and reinforce_pp_baseline need G >= 2."""
    dynamic_sampling: bool = False
    """Drop groups whose raw rewards are all equal (no signal) and sample more prompts until the batch is full (DAPO, Yu et al. 2025); needs n_samples_per_prompt >= 2."""
    dynamic_sampling_max_tries: int = 4
    """Generation rounds per iteration with dynamic_sampling (the first included); still short after them, the batch is filled with dropped groups masked out of the update (logged as rollout/groups_short)."""


@dataclass
class RewardFunctionConfig:
    name: str = MISSING
    """The function as "module:function" (importable in the worker processes), e.g. fastppo.rewards:math_answer."""
    weight: float = 1.0
    """Its weight in the summed reward."""


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
    kl_estimator: KLEstimator = KLEstimator.k1
    """Per-token KL estimator: k1, k2, k3 or abs."""
    kl_clamp: Optional[float] = None
    """Clamp the per-token KL estimate to [-c, c]; null = off."""
    adaptive_kl: bool = False
    """Adapt beta towards kl_target (proportional controller of Ziegler et al.)."""
    kl_target: float = 6.0
    """Target sequence KL (nats) for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (rollouts) of the adaptive controller."""
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    """Verifiable reward functions, e.g. [{name: "fastppo.rewards:math_answer", weight: 1.0}]: each called as fn(prompt_text, response_text, record) -> float | None, summed with their weights (and the reward model's score when model.reward_path is set)."""
    invalid_score: float = 0.0
    """A reward function's value when it returns None, times out (or raises, with function_errors=invalid)."""
    function_timeout_s: Optional[float] = 30.0
    """Seconds a reward function call may take before it is scored invalid_score (its worker process is replaced); null = no limit."""
    function_errors: FunctionErrors = FunctionErrors["raise"]
    """A reward function that raises: raise (stop the run, naming the prompt and the function) or invalid (score it invalid_score, with a warning)."""
    function_workers: int = 4
    """Worker processes running the reward functions on each rank."""
    overlong_buffer: Optional[int] = None
    """DAPO's overlong reward shaping (Yu et al. 2025): a response of L sampled tokens longer than L_max - overlong_buffer loses (L - (L_max - overlong_buffer)) / overlong_buffer * overlong_penalty from its raw score (the whole penalty at the cap L_max: rollout.max_new_tokens, times env.max_turns with an environment; a buffer longer than L_max is L_max); null = off."""
    overlong_penalty: float = 1.0
    """The overlong shaping's penalty at the length cap (in raw-score units)."""


@dataclass
class AdvantageConfig:
    estimator: Advantage = Advantage.gae
    """Advantage estimator: gae (PPO with a critic) or a critic-free one (no critic loaded): grpo, rloo, reinforce_pp, reinforce_pp_baseline (docs/estimators.md)."""
    gamma: float = 1.0
    """Discount (GAE; the returns-to-go of reinforce_pp)."""
    lam: float = 0.9
    """lambda of GAE."""
    whiten: bool = False
    """gae: whiten the advantages over the whole rollout batch (masked, global)."""
    clip: Optional[float] = None
    """Clamp the advantages to [-c, c] (after whitening); null = off."""
    scale_by_std: bool = True
    """grpo: divide by the group's reward std; false = Dr. GRPO (Liu et al. 2025)."""


@dataclass
class PPOConfig:
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    minibatch_size: int = 32
    """Rollouts per optimizer step, all ranks together."""
    micro_batch_size: int = 8
    """Rollouts per forward/backward on each rank (gradient accumulation inside a minibatch); also the ptx batch per rank and step."""
    micro_batch_tokens: Optional[int] = None
    """Token budget of each forward/backward of the update (sequences bin-packed, longest first; a longer sequence gets one alone); replaces micro_batch_size when set (which still sizes the ptx batch). Counts packed tokens with packing, else rows x padded width."""
    packing: bool = True
    """Padding-free forwards in the score phase, the update and the ptx loss: each micro-batch's sequences back to back (in one row with flash-attn, else in rows as wide as the longest sequence), positions restarting per sequence, attention confined to each (docs/packing.md). Same numbers as padded rows up to float32 summation order."""
    clip_eps: float = 0.2
    """Policy ratio clip epsilon."""
    clip_eps_high: Optional[float] = None
    """Upper ratio clip 1 + clip_eps_high (clip-higher, DAPO); clip_eps stays the lower side; null = clip_eps."""
    dual_clip: Optional[float] = None
    """Dual-clip constant c > 1 for negative advantages; null = off."""
    ratio_level: RatioLevel = RatioLevel.token
    """Importance ratio of the policy loss: token (PPO) or sequence (GSPO, Zheng et al. 2025: exp of the mean token log-ratio of each response, clipped per response, at the small clip_eps GSPO uses, e.g. 3e-4 / 4e-4 with clip_eps_high)."""
    policy_loss: PolicyLoss = PolicyLoss.ppo
    """ppo (the clipped surrogate) or cispo (MiniMax-M1 2025: -sg(min(ratio, 1 + clip_eps_high)) * A * logprob: the weight truncated and detached, every token keeps its gradient; clip_eps_high, else clip_eps, sets the cap)."""
    loss_agg: LossAgg = LossAgg.token_mean
    """Aggregation of the policy loss (and the KL loss) over a minibatch: token_mean (all valid tokens), seq_mean_token_mean (mean per sequence, then over sequences) or seq_mean_token_sum_norm (each sequence's token sum / max_new_tokens, mean over sequences; Dr. GRPO)."""
    value_clip: Optional[float] = 0.2
    """Value clip epsilon around the old values; null = off."""
    vf_coef: float = 1.0
    """Weight of the value loss in the total loss (it only reaches the critic's gradients)."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    kl_loss_coef: float = 0.0
    """beta of a KL-to-reference loss term (DeepSeekMath's GRPO): loss += beta * the aggregated per-token estimate of KL(pi_theta || pi_ref), gradient through pi_theta only; logged as loss/kl. Distinct from reward.kl_coef (the KL penalty inside the token rewards): either, both or neither may be on. 0 = off."""
    kl_loss_estimator: KLEstimator = KLEstimator.k3
    """Per-token estimator of the KL loss: k3 (DeepSeekMath: exp(ref - lp) - (ref - lp) - 1), k1, k2 or abs."""
    fused_policy_loss: bool = True
    """Policy loss + entropy bonus (+ KL loss) in one pass from the backbone's hidden states (`linear_ppo_loss`: gradients computed with the loss, no logits recompute); false = `linear_token_logprobs` + `ppo_loss`. Same numbers either way; lm_heads that are not a plain matmul always use full logits."""
    ptx_coef: float = 0.1
    """Weight of the ptx LM loss; used only when data.ptx_path is set."""
    critic_warmup_steps: int = 0
    """Iterations at the start during which only the critic trains (policy frozen; PPO-max §5.4)."""


@dataclass
class CorrectionConfig:
    importance: RolloutCorrection = RolloutCorrection.none
    """Off-policy correction of the generator/trainer mismatch (needs rollout.old_logprobs=recompute): the policy surrogate weighted by w = pi_old / pi_rollout (no gradient), per token truncated at importance_cap (token, TIS) or per response, prod_t w_t truncated at the cap (sequence); none = off."""
    importance_cap: float = 2.0
    """Truncation C of the importance weight (>= 1)."""
    mask: RolloutCorrection = RolloutCorrection.none
    """Drop from the policy loss the tokens (token) or whole responses (sequence, on the geometric mean of w_t) whose w = pi_old / pi_rollout is outside mask_bounds; they still count in the token-mean normaliser. none = off."""
    mask_bounds: list[float] = field(default_factory=lambda: [0.5, 2.0])
    """[low, high] of the mask, with low < 1 < high."""


@dataclass
class EnvConfig:
    name: Optional[str] = None
    """Environment class "module:Class" for multi-turn rollouts (docs/environments.md), e.g. fastppo.envs:ToolEnv; built once per trajectory with kwargs, reset(record) gives the first user turn and step(response) -> (observation, reward, done). null = single-turn prompts."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor."""
    max_turns: int = 4
    """Policy answers per trajectory at most; a trajectory still running after them is truncated."""
    max_tokens: Optional[int] = None
    """Tokens of the whole trajectory (first turn, answers, observations) at most; null = no limit beyond max_turns x rollout.max_new_tokens."""
    observation_role: ObservationRole = ObservationRole.user
    """Role of an observation turn in the chat template: user or tool (templates with a tool role). Plain prompts append the observation's text."""
    truncation_reward: Optional[float] = None
    """Step rewards of a truncated trajectory sum to this; null = the sum so far."""
    timeout_s: Optional[float] = 30.0
    """Seconds an environment call (reset, step) may take before it is killed; it then counts as an error (reward.function_errors decides)."""
    workers: int = 4
    """Worker processes running the environments on each rank."""


@dataclass
class OptimConfig(BaseOptimConfig):
    policy_lr: float = 5e-7
    """Peak AdamW learning rate of the policy."""
    critic_lr: float = 1.65e-6
    """Peak AdamW learning rate of the critic."""


@dataclass
class RunConfig(BaseRunConfig):
    iterations: int = 100
    """PPO iterations (rollout + update) to run."""
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
    wandb: bool = False
    """Also log every metric and the resolved config to Weights & Biases (the optional `wandb` extra: pip install fastppo[wandb]); WANDB_MODE=offline writes the run locally (wandb sync uploads it later). docs/monitoring.md."""
    wandb_project: str = "fastppo"
    """The wandb project."""
    wandb_name: Optional[str] = None
    """The wandb run name; null = the name of run.output_dir."""
    wandb_tags: list[str] = field(default_factory=list)
    """Tags of the wandb run."""


@dataclass
class EvalConfig:
    data_path: Optional[str] = None
    """Held-out prompts (a file or folder as data.prompt_path reads, with data.prompt_field, data.prompt_format and data.max_prompt_len), evaluated by `train` before the first update, every `every` iterations and at the end (docs/monitoring.md); null = no evaluation during training. `fastppo eval --data` sets it."""
    every: int = 0
    """Evaluate every N iterations during `train`; 0 = only before the first update and at the end."""
    n_samples: int = 4
    """k: responses sampled per prompt (eval/mean@k, and the n of the pass@k estimator)."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation (top-p, top-k and max_new_tokens are rollout's)."""
    pass_k: list[int] = field(default_factory=lambda: [1, 4])
    """The k of each eval/pass@k, each in [1, n_samples] (the unbiased estimator of Chen et al. 2021)."""
    pass_threshold: float = 1.0
    """A response is correct when its outcome score (reward model + weighted reward functions) is >= this (1.0: a verifiable 0/1 reward such as fastppo.rewards:math_answer)."""
    max_prompts: Optional[int] = None
    """Evaluate the first N prompts of data_path only; null = all."""
    seed: int = 0
    """Seed of the evaluation's sampling noise, its own stream: evaluating never changes what training samples (and the same seed samples the same responses from the same weights)."""


@dataclass
class HealthConfig:
    """Thresholds of the health monitor (`fastppo.health`, docs/monitoring.md): each check fires once, with a
    one-line message naming the metric, its value and the threshold; null turns a check off. The defaults come
    from the demo's ppo_max (healthy) and vanilla (collapsing) runs."""
    action: HealthAction = HealthAction.warn
    """warn: log the message and go on; stop: also save a checkpoint and stop the run (resumable)."""
    warmup: int = 5
    """Iterations ignored at the start by every check but non-finite steps (the first rollouts and the critic warm-up are noisy)."""
    entropy_floor: Optional[float] = 0.2
    """Entropy collapse: policy/entropy (nats per token, at rollout.temperature) below this."""
    kl_ceiling: Optional[float] = 15.0
    """Drift from the reference: kl/ref_per_sequence (nats) above this."""
    window: int = 10
    """Iterations averaged by the trend checks (pattern collapse, reward hacking): the mean of the last `window` iterations is compared with that of the first `window` after warmup."""
    clipped_rise: Optional[float] = 0.25
    """Pattern collapse (Zheng et al. 2023): response/clipped_frac up by this much (and response/repeat_frac up by repeat_rise) while policy/perplexity falls by perplexity_drop, over the windows."""
    repeat_rise: float = 0.1
    """Pattern collapse: the rise of response/repeat_frac (responses repeating a token trigram) it needs."""
    perplexity_drop: float = 0.2
    """Pattern collapse: the relative fall of policy/perplexity it needs (0.2: to 80% of the first window's)."""
    mismatch_kl_ceiling: Optional[float] = 0.01
    """Rollout mismatch: rollout/kl_k3 (per token, generator vs trainer logprobs; rollout.old_logprobs=recompute) above this."""
    mismatch_frac_ceiling: Optional[float] = 0.05
    """Rollout mismatch: rollout/diff_gt_0.1_frac (tokens whose probabilities differ by more than 0.1) above this."""
    clip_frac_ceiling: Optional[float] = 0.3
    """policy/clipfrac (tokens whose ratio is clipped) above this: the update moves the policy too far per step."""
    nonfinite_steps: Optional[int] = 1
    """Non-finite steps: train/skipped_steps (optimizer steps skipped for a NaN/inf loss or gradient) reaching this; also score/nonfinite (rollouts scored NaN/inf) as often."""
    hacking_reward_rise: Optional[float] = 0.5
    """Reward hacking: score/raw/mean up by this (raw-score units) over the windows while eval/reward_mean falls by hacking_eval_drop between the first and the last evaluation (needs eval.data_path)."""
    hacking_eval_drop: float = 0.1
    """Reward hacking: the fall of eval/reward_mean (raw-score units) it needs."""


@dataclass
class ParallelConfig:
    shard: Shard = Shard.auto
    """FSDP2 sharding of the four models: auto (whenever torchrun starts more than one process, and on CUDA also in one: FSDP2's mixed precision gives float32 master weights and bfloat16 compute), always (also in one CPU process), never (one process only; compute in param_dtype by torch.autocast)."""
    replicate_degree: int = 1
    """HSDP: size of the replicate dimension of a (replicate, shard) mesh, usually the number of nodes; models are sharded within a group of world_size / replicate_degree ranks and replicated across groups. 1 = plain FSDP over all ranks."""
    param_dtype: ComputeDType = ComputeDType.auto
    """Compute dtype: auto (bfloat16 on CUDA, model.dtype on CPU), float32, bfloat16 or float16. Under FSDP it is MixedPrecisionPolicy.param_dtype (also the all-gather dtype): the trained models keep model.dtype shards (the optimizer's copy), the frozen ones are stored in it. With shard=never the transformer blocks of all four models run under torch.autocast(param_dtype) over model.dtype weights. Logits that feed a logprob, an entropy or the sampler are float32 either way."""
    reduce_dtype: DType = DType.float32
    """Dtype of the gradient reduce-scatter / all-reduce under FSDP (MixedPrecisionPolicy.reduce_dtype)."""
    offload_frozen: bool = False
    """Keep the shards of the reference and reward models in CPU memory (CPUOffloadPolicy), copied to the GPU for each forward. CUDA only."""
    reshard_after_forward: bool = True
    """Free the all-gathered blocks of the trained models after forward (re-gathered in backward); false keeps them until backward (less communication, more memory)."""
    unshard_for_generation: bool = True
    """All-gather the whole policy once per rollout and keep it gathered while generating, instead of all-gathering every block for every token."""
    backend: CommBackend = CommBackend.auto
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
    """Outcome scores (reward functions), their reparameterisation and the KL penalty of the token rewards."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """The advantage estimator: GAE or a critic-free one."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The update: batching, losses, critic warm-up."""
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    """Off-policy correction of the generator/trainer mismatch."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn rollouts against an environment (null name: single-turn prompts)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers and schedules."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run control, logging, checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation on held-out prompts (`train`, `fastppo eval`): pass@k, mean@k, reward, length."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """The health monitor: entropy and pattern collapse, KL, rollout mismatch, clipping, non-finite steps, reward hacking."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Multi-GPU / multi-node: process group, FSDP2 sharding, mixed precision."""


# ----------------------------------------------------------------------------
# Presets (Zheng et al. 2023)
# ----------------------------------------------------------------------------

def ppo_max() -> Config:
    """PPO-max as in the paper: token KL 0.05, reward scale+norm+clip 0.8, value clip, critic warm-up."""
    cfg = Config()
    cfg.reward = RewardConfig(reward_scale=True, reward_norm=True, reward_clip=0.8, kl_coef=0.05, kl_estimator=KLEstimator.k1)
    cfg.advantage = AdvantageConfig(estimator=Advantage.gae, gamma=1.0, lam=0.9, whiten=False)
    cfg.ppo = PPOConfig(clip_eps=0.2, value_clip=0.2, ptx_coef=0.1, critic_warmup_steps=10)
    cfg.optim = OptimConfig(policy_lr=5e-7, critic_lr=1.65e-6, max_grad_norm=1.0)
    return cfg


def moss_release() -> Config:
    """The MOSS-RLHF reference scripts: KL 0.01, reward scaling only, lambda 0.95, no ptx."""
    cfg = Config()
    cfg.reward = RewardConfig(reward_scale=True, reward_norm=False, reward_clip=None, kl_coef=0.01, kl_estimator=KLEstimator.k1)
    cfg.advantage = AdvantageConfig(estimator=Advantage.gae, gamma=1.0, lam=0.95, whiten=False)
    cfg.ppo = PPOConfig(clip_eps=0.2, value_clip=0.2, ptx_coef=0.0, critic_warmup_steps=0)
    cfg.optim = OptimConfig(policy_lr=5e-7, critic_lr=1.5e-6, max_grad_norm=1.0)
    return cfg


def vanilla() -> Config:
    """Plain PPO: no KL penalty, raw scores, advantage whitening, no value or grad-norm clipping."""
    cfg = Config()
    cfg.reward = RewardConfig(reward_scale=False, reward_norm=False, reward_clip=None, kl_coef=0.0, kl_estimator=KLEstimator.k1)
    cfg.advantage = AdvantageConfig(estimator=Advantage.gae, gamma=1.0, lam=0.95, whiten=True)
    cfg.ppo = PPOConfig(clip_eps=0.2, value_clip=None, ptx_coef=0.0, critic_warmup_steps=0)
    cfg.optim = OptimConfig(policy_lr=5e-7, critic_lr=1.5e-6, max_grad_norm=None)
    return cfg


# Critic-free presets: no critic is loaded; the outcome reward is used raw (no running scale, norm or clip), sampling
# at temperature 1 without top-p as these papers do. GRPO keeps DeepSeekMath's KL loss term (beta 0.04, k3);
# reinforce_pp's KL is in its token rewards; the others have none (and load no reference model).

def _critic_free(estimator: str, n_samples: int, *, policy_lr: float, kl_coef: float = 0.0,
                 kl_loss_coef: float = 0.0) -> Config:
    cfg = Config()
    cfg.rollout = RolloutConfig(temperature=1.0, top_p=1.0, n_samples_per_prompt=n_samples)
    cfg.reward = RewardConfig(reward_scale=False, reward_norm=False, reward_clip=None, kl_coef=kl_coef, kl_estimator="k1")
    cfg.advantage = AdvantageConfig(estimator=estimator, gamma=1.0, whiten=False)
    cfg.ppo = PPOConfig(clip_eps=0.2, value_clip=None, ptx_coef=0.0, critic_warmup_steps=0, kl_loss_coef=kl_loss_coef,
                        kl_loss_estimator=KLEstimator.k3)
    cfg.optim = OptimConfig(policy_lr=policy_lr, max_grad_norm=1.0)
    return cfg


def grpo() -> Config:
    """GRPO (Shao et al. 2024, DeepSeekMath): 64 samples per question, (R - mean) / std within the group, a KL loss
    to the reference (beta 0.04, the k3 estimator), policy lr 1e-6, 1024 responses per iteration (16 questions x 64)
    and one policy update per iteration."""
    cfg = _critic_free("grpo", 64, policy_lr=1e-6, kl_loss_coef=0.04)
    cfg.rollout.rollout_batch_size, cfg.rollout.max_new_tokens = 16, 1024
    cfg.ppo.minibatch_size = 1024
    return cfg


def dr_grpo() -> Config:
    """Dr. GRPO (Liu et al. 2025): GRPO without the std division and without per-response length normalisation
    (each response's token sum / max_new_tokens), no KL term; 8 samples per question, policy lr 1e-6."""
    cfg = _critic_free("grpo", 8, policy_lr=1e-6)
    cfg.advantage.scale_by_std, cfg.ppo.loss_agg = False, "seq_mean_token_sum_norm"
    return cfg


def rloo() -> Config:
    """RLOO (Ahmadian et al. 2024): k = 4 samples per prompt, leave-one-out baseline, REINFORCE on the whole
    batch (one update per iteration: the ratio is 1 and clipping never acts)."""
    cfg = _critic_free("rloo", 4, policy_lr=1e-6)
    cfg.ppo.minibatch_size = cfg.rollout.rollout_batch_size * 4
    return cfg


def reinforce_pp() -> Config:
    """REINFORCE++ (Hu 2025): token-level KL penalty in the reward (beta 0.01, k1), returns-to-go with gamma 1,
    advantages whitened over the whole batch, PPO's clipped surrogate; one sample per prompt."""
    return _critic_free("reinforce_pp", 1, policy_lr=5e-7, kl_coef=0.01)


def dapo() -> Config:
    """DAPO (Yu et al. 2025): GRPO's group advantages with clip-higher (0.2 / 0.28), token-level loss, dynamic
    sampling, overlong reward shaping (a 4096-token buffer, penalty 1), no KL term; 512 prompts x 16 samples per
    iteration, 512 responses per update, policy lr 1e-6, responses up to 20480 tokens."""
    cfg = _critic_free("grpo", 16, policy_lr=1e-6)
    cfg.rollout.rollout_batch_size, cfg.rollout.max_new_tokens = 512, 20480
    cfg.rollout.dynamic_sampling, cfg.rollout.dynamic_sampling_max_tries = True, 10
    cfg.ppo.minibatch_size, cfg.ppo.clip_eps_high, cfg.ppo.loss_agg = 512, 0.28, "token_mean"
    cfg.reward.overlong_buffer, cfg.reward.overlong_penalty = 4096, 1.0
    return cfg


PRESETS = {"ppo_max": ppo_max, "moss_release": moss_release, "vanilla": vanilla, "grpo": grpo, "dr_grpo": dr_grpo,
           "rloo": rloo, "reinforce_pp": reinforce_pp, "dapo": dapo}


# ----------------------------------------------------------------------------
# The stages before PPO: `fastppo sft` and `fastppo train-rm`
# ----------------------------------------------------------------------------

@dataclass
class StageModelConfig(BaseModelConfig):
    path: str = MISSING
    """Model to start from (local Hugging Face directory or hub id). sft: a causal LM. train-rm: a causal LM (e.g. the SFT export; a fresh scalar head is added) or a sequence-classification model."""


@dataclass
class StageDataConfig(BaseDataConfig):
    train_path: str = MISSING
    """Training records: .jsonl, .json (JSON Lines), .parquet or a directory (as data.prompt_path of `train`)."""
    eval_path: Optional[str] = None
    """Held-out records; null = hold out eval_fraction of train_path (a seeded split)."""
    eval_fraction: float = 0.05
    """Fraction of train_path held out when eval_path is null (0 = no evaluation)."""
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


@dataclass
class StageOptimConfig(BaseOptimConfig):
    lr: float = 1e-5
    """Peak AdamW learning rate."""


@dataclass
class StageRunConfig(BaseRunConfig):
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
    log_every: int = 1
    """Write a metrics record every N optimizer steps."""
    packing: bool = True
    """Padding-free forwards: each micro-batch's sequences back to back (docs/packing.md); same numbers as padded rows up to float32 summation order."""


def _stage_optim() -> StageOptimConfig:
    """A stage's optimizer defaults: a cosine decay to a tenth of the peak."""
    return StageOptimConfig(schedule=Schedule.cosine, min_lr_ratio=0.1)


@dataclass
class SFTConfig:
    model: StageModelConfig = field(default_factory=StageModelConfig)
    """The causal LM to fine-tune."""
    data: StageDataConfig = field(default_factory=StageDataConfig)
    """{prompt, response} records or chat messages."""
    optim: StageOptimConfig = field(default_factory=_stage_optim)
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
    optim: StageOptimConfig = field(default_factory=_stage_optim)
    """Optimizer and schedule."""
    run: StageRunConfig = field(default_factory=lambda: StageRunConfig(output_dir="runs/rm"))
    """Run control and logging."""


SCHEMAS = (Config, SFTConfig, RMConfig)
"""The configs `load_config` builds: `fastppo train`, `fastppo sft`, `fastppo train-rm`."""


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def _choice_enum(tp: Any) -> type[Choice] | None:
    """The Choice enum a field type names (Optional[X] included), else None."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and issubclass(t, Choice):
            return t
    return None


def _one_of(choices: type[Choice], value: Any) -> str:
    return f"must be one of {', '.join(c.value for c in choices)}, got {value!r}"


MOVED = {
    "ppo.advantage": "advantage.estimator", "ppo.gamma": "advantage.gamma", "ppo.lam": "advantage.lam",
    "ppo.whiten_advantages": "advantage.whiten", "ppo.advantage_clip": "advantage.clip",
    "ppo.scale_by_std": "advantage.scale_by_std", "ppo.rollout_is": "correction.importance",
    "ppo.rollout_is_cap": "correction.importance_cap", "ppo.rollout_mask": "correction.mask",
    "ppo.rollout_mask_bounds": "correction.mask_bounds",
}
"""Fields that moved to another section: old dotted key -> new. An old key in a config is an error naming the new
one; a checkpoint's saved config is read with them moved (`upgrade`)."""


def upgrade(saved: dict) -> dict:
    """A config dict written before fields moved (a checkpoint's config.yaml), with each moved field at its new key."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for old, new in MOVED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if old_key in out.get(old_section, {}):
            out.setdefault(new_section, {})[new_key] = out[old_section].pop(old_key)
    return out


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether the field may be None)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _flow(value: Any) -> str:
    """A value as an override writes it (YAML flow style)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _list_form(elem: Any, value: Any) -> str:
    """What was given for a list field (a value, a string, the items of an indexed override `a.0.b=...`), written
    as the list it stands for: items of a section class get its fields, a string its first required one."""
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
    if dataclasses.is_dataclass(elem):
        fields = dataclasses.fields(elem)
        first = next((f.name for f in fields if f.default == MISSING), fields[0].name)
        items = [{f.name: given.get(f.name, f"<{f.name}>" if f.default == MISSING else f.default) for f in fields}
                 for given in (v if isinstance(v, dict) else {first: v} for v in items)]
    return _flow(items)


def _check_layer(cls: type, layer: dict, what: str, prefix: str = "") -> None:
    """What OmegaConf's merge reports as '?' or a raw TypeError, or lets through, in a layer (a YAML file, the
    overrides, a dict) about to be merged onto section class `cls`: a section set to a value, a list set to anything
    but a list (an indexed override `a.0.b=...` included), a bool field given a number other than 0 or 1 (read as
    true) and a string field given true or false (stored as 'True' or 'False'). Unknown keys are the merge's."""
    hints = typing.get_type_hints(cls)
    for key, value in layer.items():
        if key not in hints or (isinstance(value, str) and "${" in value):          # unknown, or an interpolation
            continue
        name, (tp, optional), problem = f"{prefix}{key}", _unwrap(hints[key]), None
        if value is None:
            continue
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problem = (f"is a section, not a value: set its fields, e.g. {name}.{dataclasses.fields(tp)[0].name}=..."
                           + (f", or {name}=null" if optional else ""))
            else:
                _check_layer(tp, value, what, f"{name}.")
        elif typing.get_origin(tp) is list:
            elem = typing.get_args(tp)[0]
            if not isinstance(value, list) or (dataclasses.is_dataclass(elem)
                                               and not all(isinstance(v, dict) for v in value)):
                problem = f"is a list: set it whole, e.g. {name}={_list_form(elem, value)}"
            elif dataclasses.is_dataclass(elem):
                for i, v in enumerate(value):
                    _check_layer(elem, v, what, f"{name}[{i}].")
        elif tp is bool and isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            problem = f"must be true or false, got {value}"
        elif tp is str and isinstance(value, bool):
            problem = f"must be a string{' or null' if optional else ''}, got {_flow(value)}"
        if problem:
            raise ConfigError(f"invalid config in {what}: field '{name}': {problem}")


def _merge(base: Any, layer: Any, what: str) -> Any:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        key, owner = getattr(exc, "key", None), getattr(exc, "object_type", None)
        name = getattr(exc, "full_key", None) or key or "?"
        if name in MOVED:
            raise ConfigError(f"invalid config in {what}: field '{name}' has moved: it is '{MOVED[name]}' now") from None
        choices = (_choice_enum(typing.get_type_hints(owner).get(str(key)))
                   if key is not None and dataclasses.is_dataclass(owner) else None)
        msg = _one_of(choices, getattr(exc, "value", None)) if choices else str(exc).splitlines()[0]
        raise ConfigError(f"invalid config in {what}: field '{name}': {msg}") from None


PATH_FIELDS = ("policy_path", "reward_path", "critic_path", "path", "prompt_path", "ptx_path", "train_path",
               "eval_path", "output_dir", "resume")
"""Fields holding a file or folder: a leading `~` in them is the home folder (`_expand_user`)."""


def _expand_user(cfg: Any) -> None:
    """A leading `~` of every path field (PATH_FIELDS) made the home folder, as a shell does, in place. The shell
    leaves `key=~/x` alone, and a YAML file is no shell: without this, run.output_dir=~/x would create a folder
    named `~` in the working folder."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _expand_user(value)
        elif f.name in PATH_FIELDS and isinstance(value, str) and value.startswith("~"):
            setattr(cfg, f.name, os.path.expanduser(value))


def _build(base: Any, layers: list[tuple[Any, str]]) -> Any:
    """`base` (a schema instance) <- each (layer, where it comes from), then validated."""
    merged = OmegaConf.structured(base)
    for layer, what in layers:
        _check_layer(type(base), OmegaConf.to_container(layer), what)
        merged = _merge(merged, layer, what)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config field(s) not set: {', '.join(missing)}")
    cfg = OmegaConf.to_object(merged)
    _expand_user(cfg)
    validate(cfg)
    if (isinstance(cfg, Config) and cfg.ppo.ptx_coef > 0 and cfg.data.ptx_path is None
            and any(OmegaConf.select(layer, "ppo.ptx_coef") is not None for layer, _ in layers)):
        log.warning("ppo.ptx_coef=%g but data.ptx_path is not set: the ptx loss is off", cfg.ppo.ptx_coef)
    return cfg


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None,
                *, schema: type = Config) -> Any:
    """A validated `schema` (Config for `train`, SFTConfig, RMConfig): defaults <- YAML <- dotted overrides
    (`ppo.clip_eps=0.1`).

    Config's defaults are a preset: `preset`, else the YAML's top-level `preset:` key, else ppo_max. The
    stages have no presets (a `preset:` key is an unknown field there).
    """
    if schema not in SCHEMAS:
        raise ConfigError(f"schema must be one of {', '.join(s.__name__ for s in SCHEMAS)}, got {schema!r}")
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple, type(None))):
        raise TypeError(f"overrides must be a list of 'key.sub=value' strings, got {type(overrides).__name__} "
                        f"{overrides!r}")
    layers = []
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory, not a YAML file")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml parse errors
            raise ConfigError(f"cannot parse config file {path}: {exc}") from None
        if not OmegaConf.is_dict(file_cfg):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        if schema is Config:
            file_preset = file_cfg.pop("preset", None)
            preset = preset or file_preset
        layers.append((file_cfg, str(path)))
    if overrides:
        bad = [o for o in overrides if not isinstance(o, str) or not o.split("=", 1)[0].strip() or "=" not in o]
        if bad:
            yaml_file = isinstance(bad[0], str) and bad[0].endswith((".yaml", ".yml"))
            raise ConfigError(f"overrides must look like key.sub=value, got {bad[0]!r}"
                              + (f" (a YAML file? pass it as --config {bad[0]})" if yaml_file else ""))
        try:
            layers.append((OmegaConf.from_dotlist(list(overrides)), "command-line overrides"))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse overrides: {exc}") from None
    if schema is not Config:
        if preset is not None:
            raise ConfigError(f"presets are for `fastppo train` only; {schema.__name__} has none, "
                              f"got preset {preset!r}")
        return _build(schema(), layers)
    preset = preset or "ppo_max"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return _build(PRESETS[preset](), layers)


def from_dict(d: dict, preset: str | None = None) -> Config:
    """Config from a nested dict (Python API), validated like a YAML file: its top-level `preset` key (or
    `preset`) names the preset it starts from, ppo_max by default."""
    d = dict(d)
    preset = preset or d.pop("preset", None) or "ppo_max"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return _build(PRESETS[preset](), [(OmegaConf.create(d), "dict")])


def to_yaml(cfg: Any) -> str:
    """Any of the SCHEMAS as YAML (choices by value); `load_config` reads it back unchanged."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config: field '{name}': {msg}")


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _type_problem(tp: Any, value: Any) -> str | None:
    """Why `value` cannot be the value of a field of type `tp`, or None. OmegaConf has checked the types of a loaded
    config; one built or edited in Python has only had this."""
    tp, optional = _unwrap(tp)
    if value is None:
        ok = optional
    elif dataclasses.is_dataclass(tp):
        ok = isinstance(value, tp)
    elif typing.get_origin(tp) is list:
        ok = isinstance(value, (list, tuple))
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp in (int, float):
        ok = isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    else:                                                           # str and the Choice enums
        ok = not isinstance(tp, type) or isinstance(value, tp) or (issubclass(tp, str) and isinstance(value, str))
    if ok:
        return None
    want = (f"a {tp.__name__}" if dataclasses.is_dataclass(tp) else "a list" if typing.get_origin(tp) is list
            else {bool: "true or false", int: "an int", float: "a number"}.get(tp, "a string"))
    return f"must be {want}{' or None' if optional else ''}, got {type(value).__name__} {value!r}"


def _check_fields(cfg: Any, prefix: str = "") -> None:
    """Every field of a config in one walk: of its type, set (not MISSING), finite, and one of its choices.

    YAML and OmegaConf accept `.inf`, `inf` and `nan` for float fields; no field of fastppo gives them a meaning
    (an infinite kl_coef or timeout would only fail later, or silently poison the run). The types and choices are
    also checked here for configs built in Python, which OmegaConf has not seen.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        problem = _type_problem(hints[f.name], value)
        _check(problem is None, name, problem)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{name}.")
            continue
        if value is MISSING or (isinstance(value, str) and value == "???"):
            raise ConfigError(f"required config field not set: {name}")
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        elem = typing.get_args(_unwrap(hints[f.name])[0])[0] if isinstance(value, (list, tuple)) else None
        for i, v in items:
            where = name if i is None else f"{name}[{i}]"
            if elem is not None:
                problem = _type_problem(elem, v)
                _check(problem is None, where, problem)
                if dataclasses.is_dataclass(v):
                    _check_fields(v, f"{where}.")
            _check(not isinstance(v, float) or math.isfinite(v), where, f"must be a finite number, got {v}")
        choices = _choice_enum(hints[f.name])
        if choices is not None and value is not None:
            _check(value in [c.value for c in choices], name, _one_of(choices, value))


def _check_lora(lc: "LoraConfig | None", name: str) -> None:
    if lc is None:
        return
    _check(lc.rank > 0, f"{name}.rank", f"must be > 0, got {lc.rank}")
    _check(lc.alpha > 0, f"{name}.alpha", f"must be > 0, got {lc.alpha}")
    _check(0 <= lc.dropout < 1, f"{name}.dropout", f"must be in [0, 1), got {lc.dropout}")
    _check(len(lc.target_modules) > 0 and all(t for t in lc.target_modules), f"{name}.target_modules",
           "must name at least one module (or be [all-linear])")


def _check_base_model(m: BaseModelConfig) -> None:
    _check(m.lm_head_chunk_size is None or m.lm_head_chunk_size > 0, "model.lm_head_chunk_size", "must be > 0")
    _check_lora(m.lora, "model.lora")


def _check_model(m: ModelConfig) -> None:
    _check_lora(m.critic_lora, "model.critic_lora")


def _check_base_data(d: BaseDataConfig) -> None:
    _check(0 <= d.max_unknown_token_frac <= 1, "data.max_unknown_token_frac",
           f"must be in [0, 1], got {d.max_unknown_token_frac}")


def _check_data(d: DataConfig) -> None:
    _check(d.max_prompt_len > 0, "data.max_prompt_len", "must be > 0")
    _check(d.max_ptx_len > 1, "data.max_ptx_len", "must be > 1")


def _check_stage_data(d: StageDataConfig) -> None:
    _check(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    _check(d.max_len > 1, "data.max_len", "must be > 1")


def _check_rollout(r: RolloutConfig) -> None:
    _check(r.rollout_batch_size > 0, "rollout.rollout_batch_size", "must be > 0")
    _check(r.generation_batch_size is None or r.generation_batch_size > 0, "rollout.generation_batch_size", "must be > 0")
    _check(r.forward_batch_size is None or r.forward_batch_size > 0, "rollout.forward_batch_size", "must be > 0")
    _check(r.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0 (logprobs use logits / T), got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.top_k >= 0, "rollout.top_k", "must be >= 0")
    _check(r.repetition_penalty > 0, "rollout.repetition_penalty", "must be > 0")
    _check(r.engine != "static" or r.repetition_penalty == 1.0, "rollout.engine",
           "static samples without a repetition penalty: set rollout.repetition_penalty=1.0 or rollout.engine=hf")
    _check(r.forward_batch_tokens is None or r.forward_batch_tokens > 0, "rollout.forward_batch_tokens",
           "must be > 0 or null")


def _check_env(e: EnvConfig) -> None:
    _check(e.name is None or REWARD_FUNCTION_NAME.fullmatch(e.name) is not None, "env.name",
           f"must look like module:Class, got {e.name!r}")
    _check(e.max_turns >= 1, "env.max_turns", f"must be >= 1, got {e.max_turns}")
    _check(e.max_tokens is None or e.max_tokens > 1, "env.max_tokens", "must be > 1 or null")
    _check(e.timeout_s is None or e.timeout_s > 0, "env.timeout_s", "must be > 0 or null")
    _check(e.workers >= 1, "env.workers", "must be >= 1")


def _check_reward(rw: RewardConfig) -> None:
    _check(rw.reward_clip is None or rw.reward_clip > 0, "reward.reward_clip", "must be > 0 or null")
    _check(rw.kl_coef >= 0, "reward.kl_coef", "must be >= 0")
    _check(rw.kl_clamp is None or rw.kl_clamp > 0, "reward.kl_clamp", "must be > 0 or null")
    _check(rw.kl_target > 0, "reward.kl_target", "must be > 0")
    _check(rw.kl_horizon > 0, "reward.kl_horizon", "must be > 0")
    _check(rw.overlong_buffer is None or rw.overlong_buffer > 0, "reward.overlong_buffer", "must be > 0 or null")
    _check(rw.overlong_penalty >= 0, "reward.overlong_penalty", "must be >= 0")


def _check_ppo(p: PPOConfig) -> None:
    _check(p.ppo_epochs > 0, "ppo.ppo_epochs", "must be > 0")
    _check(p.minibatch_size > 0, "ppo.minibatch_size", "must be > 0")
    _check(p.micro_batch_size > 0, "ppo.micro_batch_size", "must be > 0")
    _check(p.micro_batch_tokens is not None or p.minibatch_size % p.micro_batch_size == 0, "ppo.micro_batch_size",
           f"must divide ppo.minibatch_size ({p.minibatch_size}), got {p.micro_batch_size} (or set ppo.micro_batch_tokens)")
    _check(p.clip_eps > 0, "ppo.clip_eps", "must be > 0")
    _check(p.value_clip is None or p.value_clip > 0, "ppo.value_clip", "must be > 0 or null")
    _check(p.dual_clip is None or p.dual_clip > 1, "ppo.dual_clip", "must be > 1 or null")
    _check(p.vf_coef >= 0, "ppo.vf_coef", "must be >= 0")
    _check(p.ent_coef >= 0, "ppo.ent_coef", "must be >= 0")
    _check(p.ptx_coef >= 0, "ppo.ptx_coef", "must be >= 0")
    _check(p.critic_warmup_steps >= 0, "ppo.critic_warmup_steps", "must be >= 0")
    _check(p.micro_batch_tokens is None or p.micro_batch_tokens > 0, "ppo.micro_batch_tokens", "must be > 0 or null")
    _check(p.clip_eps_high is None or p.clip_eps_high > 0, "ppo.clip_eps_high", "must be > 0 or null")
    _check(p.kl_loss_coef >= 0, "ppo.kl_loss_coef", "must be >= 0")
    _check(p.policy_loss == "ppo" or p.dual_clip is None, "ppo.dual_clip",
           "bounds PPO's surrogate; with ppo.policy_loss=cispo set it to null")


def _check_advantage(a: AdvantageConfig) -> None:
    _check(0 <= a.gamma <= 1, "advantage.gamma", "must be in [0, 1]")
    _check(0 <= a.lam <= 1, "advantage.lam", "must be in [0, 1]")
    _check(a.clip is None or a.clip > 0, "advantage.clip", "must be > 0 or null")


def _check_correction(c: CorrectionConfig) -> None:
    _check(c.importance_cap >= 1, "correction.importance_cap",
           f"must be >= 1 (a cap below 1 down-weights on-policy tokens), got {c.importance_cap}")
    bounds = list(c.mask_bounds)
    _check(len(bounds) == 2 and 0 <= bounds[0] < 1 < bounds[1], "correction.mask_bounds",
           f"must be [low, high] with 0 <= low < 1 < high, got {bounds}")


def _peak_lrs(o: BaseOptimConfig) -> list[tuple[str, float]]:
    """(dotted name, value) of the section's peak learning rates: optim.lr, or optim.policy_lr and optim.critic_lr."""
    return [(f"optim.{f.name}", getattr(o, f.name)) for f in dataclasses.fields(o) if f.name.endswith("lr")]


def _check_base_optim(o: BaseOptimConfig) -> None:
    for name, lr in _peak_lrs(o):
        _check(lr >= 0, name, "must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {o.betas}")
    _check(o.eps > 0, "optim.eps", "must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0 or null")


SEED_LIMIT = 2 ** 32
"""run.seed lies in [0, SEED_LIMIT): the range NumPy's global generator accepts (`logs.seed_everything`)."""


def _check_base_run(run: BaseRunConfig) -> None:
    _check(0 <= run.seed < SEED_LIMIT, "run.seed", f"must lie in [0, 2^32), got {run.seed}")
    _check(DEVICE_NAME.fullmatch(run.device) is not None, "run.device", f"must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    _check(run.max_nonfinite_in_a_row >= 1, "run.max_nonfinite_in_a_row", "must be >= 1")
    _check(run.log_level.upper() in LOG_LEVELS, "run.log_level", f"must be {', '.join(LOG_LEVELS)} (any case), "
           f"got {run.log_level!r}")


def _check_run(run: RunConfig) -> None:
    _check(run.iterations >= 0, "run.iterations", "must be >= 0")
    _check(run.save_every >= 0, "run.save_every", "must be >= 0")
    _check(run.stop_after is None or run.stop_after > 0, "run.stop_after", "must be > 0 or null")
    _check(run.keep_last >= 1, "run.keep_last", "must be >= 1")
    _check(bool(run.wandb_project), "run.wandb_project", "must not be empty")
    _check(all(t for t in run.wandb_tags), "run.wandb_tags", f"must be non-empty strings, got {list(run.wandb_tags)}")


def _check_stage_run(run: StageRunConfig) -> None:
    _check(run.epochs > 0, "run.epochs", "must be > 0")
    _check(run.max_steps is None or run.max_steps > 0, "run.max_steps", "must be > 0 or null")
    _check(run.batch_size > 0, "run.batch_size", "must be > 0")
    _check(run.micro_batch_size > 0, "run.micro_batch_size", "must be > 0")
    _check(run.batch_size % run.micro_batch_size == 0, "run.micro_batch_size",
           f"must divide run.batch_size ({run.batch_size}), got {run.micro_batch_size}")
    _check(run.eval_every >= 0, "run.eval_every", "must be >= 0")
    _check(run.eval_batch_size > 0, "run.eval_batch_size", "must be > 0")
    _check(run.log_every > 0, "run.log_every", "must be > 0")


def _check_eval(e: EvalConfig) -> None:
    _check(e.every >= 0, "eval.every", f"must be >= 0, got {e.every}")
    _check(e.n_samples >= 1, "eval.n_samples", f"must be >= 1, got {e.n_samples}")
    _check(e.temperature > 0, "eval.temperature", f"must be > 0, got {e.temperature}")
    _check(len(e.pass_k) > 0 and all(1 <= k <= e.n_samples for k in e.pass_k), "eval.pass_k",
           f"must be one or more k in [1, eval.n_samples={e.n_samples}], got {list(e.pass_k)}")
    _check(e.max_prompts is None or e.max_prompts >= 1, "eval.max_prompts", "must be >= 1 or null")
    _check(0 <= e.seed < SEED_LIMIT, "eval.seed", f"must lie in [0, 2^32), got {e.seed}")


def _check_health(h: HealthConfig) -> None:
    _check(h.warmup >= 0, "health.warmup", f"must be >= 0, got {h.warmup}")
    _check(h.window >= 1, "health.window", f"must be >= 1, got {h.window}")
    for name in ("entropy_floor", "kl_ceiling", "clipped_rise", "mismatch_kl_ceiling", "mismatch_frac_ceiling",
                 "clip_frac_ceiling", "hacking_reward_rise"):
        value = getattr(h, name)
        _check(value is None or value > 0, f"health.{name}", f"must be > 0 or null, got {value}")
    for name in ("repeat_rise", "hacking_eval_drop"):
        _check(getattr(h, name) >= 0, f"health.{name}", f"must be >= 0, got {getattr(h, name)}")
    _check(0 <= h.perplexity_drop < 1, "health.perplexity_drop", f"must be in [0, 1), got {h.perplexity_drop}")
    _check(h.nonfinite_steps is None or h.nonfinite_steps >= 1, "health.nonfinite_steps", "must be >= 1 or null")


def _check_parallel(par: ParallelConfig) -> None:
    _check(par.replicate_degree >= 1, "parallel.replicate_degree", "must be >= 1")
    _check(par.timeout_s > 0, "parallel.timeout_s", "must be > 0")


def _check_rm_loss(loss: RMLossConfig) -> None:
    _check(loss.lm_coef >= 0, "loss.lm_coef", "must be >= 0")
    _check(loss.margin_reg >= 0, "loss.margin_reg", "must be >= 0")


SECTION_CHECKS: dict[type, Callable[[Any], None]] = {
    BaseModelConfig: _check_base_model,
    ModelConfig: _check_model,
    BaseDataConfig: _check_base_data,
    DataConfig: _check_data,
    StageDataConfig: _check_stage_data,
    RolloutConfig: _check_rollout,
    RewardConfig: _check_reward,
    PPOConfig: _check_ppo,
    AdvantageConfig: _check_advantage,
    EnvConfig: _check_env,
    CorrectionConfig: _check_correction,
    BaseOptimConfig: _check_base_optim,
    BaseRunConfig: _check_base_run,
    RunConfig: _check_run,
    EvalConfig: _check_eval,
    HealthConfig: _check_health,
    StageRunConfig: _check_stage_run,
    ParallelConfig: _check_parallel,
    RMLossConfig: _check_rm_loss,
}
"""The range checks of each section class (a section runs those of its shared base first). The choices,
finiteness and required fields of every section are checked by `_check_fields`."""


def validate(cfg: Any) -> None:
    """Every check of a Config, SFTConfig or RMConfig: fields, sections, then across sections. Every failure
    names the field."""
    if not isinstance(cfg, SCHEMAS):
        raise ConfigError(f"expected a fastppo.config.Config, SFTConfig or RMConfig, got {type(cfg).__name__}")
    _check_fields(cfg)
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        for cls in reversed(type(section).__mro__):
            if cls in SECTION_CHECKS:
                SECTION_CHECKS[cls](section)
    _check(not cfg.run.export_adapter or cfg.model.lora is not None, "run.export_adapter",
           "needs model.lora (there is no adapter)")
    if isinstance(cfg, Config):
        r, p = cfg.rollout, cfg.ppo
        _check(r.rollout_batch_size * r.n_samples_per_prompt % p.minibatch_size == 0, "ppo.minibatch_size",
               f"must divide the rollouts per iteration, rollout.rollout_batch_size x rollout.n_samples_per_prompt "
               f"({r.rollout_batch_size} x {r.n_samples_per_prompt}), got {p.minibatch_size}")
        validate_critic_free(cfg)
        _check(cfg.eval.data_path is None or cfg.env.name is None, "eval.data_path",
               f"evaluates single-turn prompts; with env.name={cfg.env.name} set it to null")
        for name in ("importance", "mask"):
            mode = getattr(cfg.correction, name)
            _check(mode == "none" or r.old_logprobs == "recompute", f"correction.{name}",
                   f"is '{mode}', but rollout.old_logprobs is '{r.old_logprobs}': the correction weighs "
                   "pi_old / pi_rollout, which is 1 when pi_old is the rollout's logprobs; set "
                   "rollout.old_logprobs=recompute")
    validate_precision(cfg)


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


def validate_backend(backend: str | None, device: str, interpreter: bool) -> None:
    """run.backend against the run's device type (`dist.resolve_device` calls it): the Triton kernels need CUDA
    tensors, or Triton's CPU interpreter (TRITON_INTERPRET=1, the tests' set-up)."""
    _check(backend != "triton" or device == "cuda" or interpreter, "run.backend",
           f"is 'triton', but this run is on {device} and the Triton kernels need CUDA: set run.backend=torch, or "
           "null (triton on CUDA, torch elsewhere)")


GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")
REWARD_FUNCTION_NAME = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def uses_critic(cfg: Config) -> bool:
    """Only GAE needs a value model: the critic-free estimators load, shard, step and checkpoint no critic."""
    return cfg.advantage.estimator == "gae"


def uses_reference(cfg: Config) -> bool:
    """Whether anything reads the reference model's logprobs: the KL penalty of the token rewards
    (reward.kl_coef or the adaptive controller, which starts from it) or the KL loss (ppo.kl_loss_coef). Without
    either no reference is loaded and the score phase runs no reference forward."""
    return cfg.reward.kl_coef > 0 or cfg.reward.adaptive_kl or cfg.ppo.kl_loss_coef > 0


def validate_critic_free(cfg: Config) -> None:
    """Checks of the estimators, groups, dynamic sampling and reward functions (docs/estimators.md)."""
    r, rw, p, est = cfg.rollout, cfg.reward, cfg.ppo, cfg.advantage.estimator
    _check(r.n_samples_per_prompt >= 1, "rollout.n_samples_per_prompt", "must be >= 1")
    _check(est not in GROUP_ESTIMATORS or r.n_samples_per_prompt >= 2, "rollout.n_samples_per_prompt",
           f"must be >= 2 with advantage.estimator={est} (its baseline is the rest of the group), "
           f"got {r.n_samples_per_prompt}")
    _check(not r.dynamic_sampling or r.n_samples_per_prompt >= 2, "rollout.dynamic_sampling",
           f"needs groups: rollout.n_samples_per_prompt >= 2, got {r.n_samples_per_prompt}")
    _check(r.dynamic_sampling_max_tries >= 1, "rollout.dynamic_sampling_max_tries", "must be >= 1")
    _check(est not in ("grpo", "rloo") or (rw.kl_coef == 0 and not rw.adaptive_kl), "reward.kl_coef",
           f"has no effect with advantage.estimator={est}: its advantages come from the outcome rewards alone; a "
           "KL to the reference enters the loss through ppo.kl_loss_coef (DeepSeekMath's GRPO); set 0")
    if not uses_critic(cfg):
        _check(p.critic_warmup_steps == 0, "ppo.critic_warmup_steps",
               f"must be 0 with advantage.estimator={est} (no critic), got {p.critic_warmup_steps}")
        _check(not cfg.advantage.whiten, "advantage.whiten",
               f"must be false with advantage.estimator={est} (its advantages are already normalised)")
    _check(not uses_critic(cfg) or cfg.model.reward_path is not None or cfg.model.critic_path is not None,
           "model.critic_path", "advantage.estimator=gae trains a critic: set model.critic_path (or model.reward_path)")
    _check(cfg.model.reward_path is not None or any(f.weight != 0 for f in rw.functions) or cfg.env.name is not None,
           "model.reward_path", f"is null and reward.functions is {'empty' if not rw.functions else 'all weight 0'}: "
           "give a reward model, reward functions, an environment, or several")
    for i, f in enumerate(rw.functions):
        _check(REWARD_FUNCTION_NAME.fullmatch(f.name) is not None, f"reward.functions[{i}].name",
               f"must look like module:function, got {f.name!r}")
        first = next(j for j, g in enumerate(rw.functions) if g.name == f.name)
        _check(first == i, f"reward.functions[{i}].name", f"repeats reward.functions[{first}] ({f.name}): list each "
               "function once, with its total weight (its metrics are reported per function)")
    _check(rw.function_timeout_s is None or rw.function_timeout_s > 0, "reward.function_timeout_s", "must be > 0 or null")
    _check(rw.function_workers >= 1, "reward.function_workers", "must be >= 1")


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
    remedy = ("use model.dtype=float32 with parallel.param_dtype=bfloat16 (float32 master weights, bfloat16 compute)"
              if isinstance(cfg, Config) else "use model.dtype=float32")
    for name, lr in _peak_lrs(o):
        _check(not 0 < lr < MIN_LR_16BIT_MASTER, "model.dtype",
               f"{m.dtype} master weights (and AdamW state) round away updates of {name}={lr:g} "
               f"(< {MIN_LR_16BIT_MASTER:g}): {remedy}")


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes: the global batch sizes must split evenly over ranks."""
    r, p = cfg.rollout, cfg.ppo
    # Prompts, not rows, split over ranks: each rank holds whole groups of n_samples_per_prompt rows, so group
    # statistics (grpo, rloo, dynamic sampling) need no collective.
    _check(r.rollout_batch_size % world_size == 0, "rollout.rollout_batch_size",
           f"must be divisible by the number of processes ({world_size}) so that each rank holds whole groups of "
           f"rollout.n_samples_per_prompt rows, got {r.rollout_batch_size}")
    # With a token budget the micro-batches are planned by tokens: a rank's share need only be whole.
    per_rank = world_size if p.micro_batch_tokens is not None else world_size * p.micro_batch_size
    _check(p.minibatch_size % per_rank == 0, "ppo.minibatch_size",
           f"must be divisible by the number of processes ({world_size})" if p.micro_batch_tokens is not None else
           f"must be divisible by processes x ppo.micro_batch_size ({world_size} x {p.micro_batch_size})"
           + f", got {p.minibatch_size}")
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
    groups_per_rank: int
    """Prompts (groups of rollout.n_samples_per_prompt rows) each rank generates: groups are never split over ranks."""
    max_sampled_tokens: int
    """Tokens a response samples at most: rollout.max_new_tokens, times env.max_turns with an environment (the cap of
    the overlong shaping, the constant of the seq_mean_token_sum_norm aggregation)."""


def derived(cfg: Config, world_size: int = 1) -> Derived:
    G = cfg.rollout.n_samples_per_prompt
    mb_per_epoch = cfg.rollout.rollout_batch_size * G // cfg.ppo.minibatch_size
    steps_per_iter = mb_per_epoch * cfg.ppo.ppo_epochs
    rollouts_per_rank = cfg.rollout.rollout_batch_size // world_size * G
    return Derived(
        world_size=world_size,
        rollouts_per_rank=rollouts_per_rank,
        minibatch_per_rank=cfg.ppo.minibatch_size // world_size,
        minibatches_per_epoch=mb_per_epoch,
        micro_batches_per_minibatch=cfg.ppo.minibatch_size // (cfg.ppo.micro_batch_size * world_size),
        generation_batch_size=cfg.rollout.generation_batch_size or rollouts_per_rank,
        forward_batch_size=cfg.rollout.forward_batch_size or cfg.ppo.micro_batch_size,
        policy_optimizer_steps=max(0, cfg.run.iterations - cfg.ppo.critic_warmup_steps) * steps_per_iter,
        critic_optimizer_steps=cfg.run.iterations * steps_per_iter if uses_critic(cfg) else 0,
        groups_per_rank=cfg.rollout.rollout_batch_size // world_size,
        max_sampled_tokens=cfg.rollout.max_new_tokens * (1 if cfg.env.name is None else cfg.env.max_turns),
    )
