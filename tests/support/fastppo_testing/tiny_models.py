"""Tiny Hugging Face models and a real tokenizer, built from configs (no downloads).

`make_tiny_setup(root, arch)` writes, under `root`:

    policy/   AutoModelForCausalLM + tokenizer (the "SFT model")
    reward/   AutoModelForSequenceClassification (num_labels=1) + tokenizer
    prompts.jsonl, sft.jsonl

and returns their paths plus config overrides for a fast CPU run. The
tokenizer is a WordLevel `tokenizers` model wrapped in
PreTrainedTokenizerFast, with a chat template; for GPT-2 it has no pad token
(EOS doubles as BOS), to exercise the "add a pad token" path.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "gpt2", "mistral")

WORDS = (
    "the a red blue green small big fox cat dog bird fish runs jumps sleeps eats sings is and very quick slow "
    "kind happy sad bright dark it they we you describe tell me about story of in on with . , ? ! : user assistant "
    "system hello good bad yes no one two three"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer(*, gpt2_style: bool = False):
    """A real fast tokenizer: WordLevel over WORDS, whitespace pre-tokenisation, BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if gpt2_style:
        specials = ["<|endoftext|>", "<unk>"]
    else:
        specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    bos = "<|endoftext|>" if gpt2_style else "<s>"
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    if gpt2_style:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      unk_token="<unk>")
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def model_configs(arch: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, bos_id=None,
                  eos_id=None, pad_id=None):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=max(1, heads // 2), max_position_embeddings=256, tie_word_embeddings=False, **common)
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **kw)
    raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")


def synthetic_prompts(n: int, seed: int = 0, *, chat_every: int = 3) -> list[dict]:
    rng = random.Random(seed)
    animals, colours = ["fox", "cat", "dog", "bird", "fish"], ["red", "blue", "green"]
    out = []
    for i in range(n):
        text = f"tell me about the {rng.choice(colours)} {rng.choice(animals)}"
        if chat_every and i % chat_every == 2:
            out.append({"prompt": [{"role": "user", "content": text}]})
        else:
            out.append({"prompt": text + " :"})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass
class TinySetup:
    root: Path
    policy: Path
    reward: Path
    prompts: Path
    sft: Path
    arch: str

    def overrides(self, **extra) -> list[str]:
        """Dotted overrides for a fast CPU run on this setup."""
        base = {
            "model.policy_path": self.policy, "model.reward_path": self.reward,
            "data.prompt_path": self.prompts, "data.max_prompt_len": 16,
            "rollout.rollout_batch_size": 4, "rollout.max_new_tokens": 6, "rollout.temperature": 1.0,
            "rollout.top_p": 1.0,
            "ppo.minibatch_size": 2, "ppo.micro_batch_size": 1, "ppo.critic_warmup_steps": 0,
            "optim.policy_lr": 1e-3, "optim.critic_lr": 1e-3,
            "run.output_dir": self.root / "run", "run.iterations": 3, "run.save_every": 0,
            "run.progress_bar": False, "run.tensorboard": False, "run.log_level": "WARNING",
        }
        base.update(extra)
        return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def make_tiny_setup(root: Path, arch: str = "llama", *, seed: int = 0, n_prompts: int = 12) -> TinySetup:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(gpt2_style=arch == "gpt2")
    cfg = model_configs(arch, len(tok), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = AutoModelForCausalLM.from_config(cfg)
        cfg_rm = model_configs(arch, len(tok), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        cfg_rm.num_labels = 1
        reward = AutoModelForSequenceClassification.from_config(cfg_rm)
    paths = {}
    for name, model in (("policy", policy), ("reward", reward)):
        out = root / name
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paths[name] = out
    prompts = write_jsonl(root / "prompts.jsonl", synthetic_prompts(n_prompts, seed))
    sft = write_jsonl(root / "sft.jsonl", [{"prompt": "tell me about the red fox :", "response": "the red fox is quick ."},
                                           {"prompt": "describe the blue cat :", "response": "the blue cat sleeps ."}])
    return TinySetup(root, paths["policy"], paths["reward"], prompts, sft, arch)
