"""The demo's synthetic instruction task, its tokenizer and tiny model configs.

Everything here is generated offline from a seed, so the demo downloads
nothing and repeats exactly.

The task: a prompt asks to describe an animal of some colour
("describe the red fox :"); a good response describes *that* animal with
pleasant adjectives ("the red fox is kind and quick . it runs ."). Human
preferences are simulated by a hidden rule (`rule_score`): more distinct
pleasant adjectives are better, talking about the wrong animal is worse, a
repeated adjective is worse. The SFT data are plausible but mediocre
responses; the preference pairs compare two well-formed, more varied
responses (1-4 adjectives, half of them pleasant), labelled by the rule with
Bradley-Terry noise like real annotators (`make_preference_data`). A quarter
of the (animal, colour) pairs never occur in training data: prompts made
from them are the held-out evaluation set (`is_held_out`).

Why this task shows what PPO-max is for: the reward model only ever sees
well-formed responses, so it learns "pleasant words are good" and, like real
reward models, extrapolates that far outside its data. A policy free to drift
(vanilla PPO, no KL penalty, raw scores) finds that repeating pleasant words
until the length limit scores higher than any real answer: the reward climbs
while the responses collapse into one repeated pattern, their length
saturates, their perplexity falls toward 1 and the KL to the SFT model
explodes (the paper's "pattern collapse", §5). PPO-max's token-level KL
penalty and score normalisation/clipping keep the policy near the SFT model,
where the reward model is right, and still improve the responses.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, PreTrainedTokenizerFast

ANIMALS = ["fox", "cat", "dog", "owl", "bear", "wolf", "deer", "hare"]
COLORS = ["red", "blue", "green", "brown", "white", "black", "grey", "gold"]
PLEASANT = ["kind", "bright", "happy", "gentle", "brave", "calm"]
PLAIN = ["big", "small", "old", "young", "quick", "slow", "tall", "short"]
VERBS = ["runs", "sleeps", "jumps", "sits", "walks", "eats", "sings", "hides"]
FUNCTION_WORDS = ["describe", "tell", "me", "about", "the", "a", "is", "and", "very", "it", "also", ":", "."]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]
VOCAB = SPECIAL_TOKENS + FUNCTION_WORDS + ANIMALS + COLORS + PLEASANT + PLAIN + VERBS

# How often an SFT response uses a pleasant adjective, and talks about another animal.
P_PLEASANT = 0.25
P_WRONG_ANIMAL = 0.15
# How often an adjective in a compared (preference-pair) response is pleasant.
P_PLEASANT_PAIRS = 0.5
# Annotator noise: P(a preferred over b) = sigmoid(PREFERENCE_BETA * (rule(a) - rule(b))).
PREFERENCE_BETA = 2.0


@dataclass(frozen=True)
class Prompt:
    text: str
    animal: str
    color: str


def is_held_out(animal: str, color: str) -> bool:
    """A quarter of the (animal, colour) pairs never appear in training data: the held-out prompts."""
    return (ANIMALS.index(animal) + COLORS.index(color)) % 4 == 0


def make_prompt(rng: random.Random, split: str = "train") -> Prompt:
    """A prompt from the train pairs, the held-out ("eval") pairs, or "all"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be train, eval or all, got {split!r}")
    while True:
        animal, color = rng.choice(ANIMALS), rng.choice(COLORS)
        if split == "all" or is_held_out(animal, color) == (split == "eval"):
            break
    template = rng.choice(["describe the {c} {a} :", "tell me about the {c} {a} :"])
    return Prompt(template.format(c=color, a=animal), animal, color)


def sft_response(rng: random.Random, prompt: Prompt, *, p_pleasant: float = P_PLEASANT,
                 n_adjectives_choices: tuple[int, ...] = (1, 2, 2, 3)) -> str:
    """A plausible, mediocre answer: mostly plain adjectives, sometimes the wrong animal."""
    animal = prompt.animal if rng.random() > P_WRONG_ANIMAL else rng.choice([a for a in ANIMALS if a != prompt.animal])
    n_adjectives = rng.choice(n_adjectives_choices)
    adjectives: list[str] = []
    while len(adjectives) < n_adjectives:
        word = rng.choice(PLEASANT if rng.random() < p_pleasant else PLAIN)
        if word not in adjectives:
            adjectives.append(word)
    words = ["the", prompt.color, animal, "is"]
    if rng.random() < 0.2:
        words.append("very")
    words += " and ".join(adjectives).split() + ["."]
    for _ in range(rng.choice([0, 1, 1, 2])):
        words += ["it", rng.choice(VERBS), "."]
    return " ".join(words)


def rule_score(prompt: Prompt, response: str) -> float:
    """The hidden preference rule (the 'human'): what the reward model must learn.

    +1 per distinct pleasant adjective, +1 for describing the prompt's animal,
    −1 per repeated word beyond the sentence scaffolding, −1 for no final '.'.
    """
    words = response.split()
    pleasant = [w for w in words if w in PLEASANT]
    score = float(len(set(pleasant)))
    score += 1.0 if prompt.animal in words and not any(a in words for a in ANIMALS if a != prompt.animal) else 0.0
    content = [w for w in words if w in PLEASANT or w in PLAIN]
    score -= float(len(content) - len(set(content)))
    score -= 0.0 if words[-1:] == ["."] else 1.0
    return score


def make_sft_data(n: int, seed: int, split: str = "train") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = make_prompt(rng, split)
        rows.append({"prompt": p.text, "response": sft_response(rng, p)})
    return rows


def make_preference_data(n: int, seed: int, split: str = "train", *, noisy: bool = True) -> list[dict]:
    """Pairs of responses ranked by `rule_score` (ties redrawn).

    The compared responses are well-formed like the SFT data but more varied
    (as when annotators compare several models' outputs): 1 to 4 adjectives,
    half of them pleasant. So the reward model learns a graded "more pleasant
    adjectives is better" (which it extrapolates), while it never sees a
    repeated adjective (which the rule punishes).

    noisy: the simulated annotator prefers a over b with probability
    sigmoid(PREFERENCE_BETA * (rule(a) - rule(b))) (Bradley-Terry), as human
    labels are noisy; a reward model fit to such labels learns calibrated,
    graded scores instead of saturating at the top of its data, which is what
    makes its extrapolation exploitable. noisy=False labels by the rule itself
    (the held-out pairs: accuracy then measures agreement with the rule).
    """
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        p = make_prompt(rng, split)
        a, b = (sft_response(rng, p, p_pleasant=P_PLEASANT_PAIRS, n_adjectives_choices=(1, 2, 3, 4)) for _ in range(2))
        sa, sb = rule_score(p, a), rule_score(p, b)
        if sa == sb:
            continue
        if noisy:
            a_wins = rng.random() < 1.0 / (1.0 + math.exp(-PREFERENCE_BETA * (sa - sb)))
        else:
            a_wins = sa > sb
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": p.text, "chosen": chosen, "rejected": rejected})
    return rows


def make_prompts(n: int, seed: int, split: str = "train") -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": make_prompt(rng, split).text} for _ in range(n)]


def parse_prompt(text: str) -> Prompt:
    """Recover the animal and colour from a prompt made by `make_prompt`."""
    words = text.split()
    return Prompt(text, words[-2], words[-3])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def build_tokenizer(out_dir: Path | None = None, vocab: list[str] = VOCAB):
    """A real Hugging Face fast tokenizer over a task's words (word level; this task's by default).

    Saved to `out_dir` when given, so that models and runs load it through
    AutoTokenizer like any user's tokenizer.
    """
    core = Tokenizer(WordLevel(vocab={word: i for i, word in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                        padding_side="left")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


@dataclass
class TinyPlan:
    """What the demos share: the tiny Llama's shape and its SFT schedule."""
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    sft_epochs: float = 2.0
    sft_lr: float = 3e-3


def run_overrides(out_dir: Path, seed: int, progress_bar: bool) -> list[str]:
    """The `run.*` overrides of every demo stage."""
    return [f"run.output_dir={out_dir}", f"run.seed={seed}", "run.device=cpu",
            f"run.progress_bar={str(progress_bar).lower()}", "run.log_level=WARNING"]


def sft_overrides(init: Path, data: Path, out_dir: Path, plan: TinyPlan, seed: int, progress_bar: bool) -> list[str]:
    """`fastppo sft` of a demo: the tiny model at `init` on the examples at `data`, by the plan's schedule."""
    return [f"model.path={init}", f"data.train_path={data}", "data.eval_fraction=0.05", f"optim.lr={plan.sft_lr}",
            "optim.warmup_steps=10", f"run.epochs={plan.sft_epochs}", "run.batch_size=32", "run.micro_batch_size=32",
            "run.eval_every=25", *run_overrides(out_dir, seed, progress_bar)]


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """A small Llama: big enough to learn the task in seconds on a CPU (every demo vocabulary starts with
    SPECIAL_TOKENS)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index(PAD), eos_token_id=SPECIAL_TOKENS.index(EOS), bos_token_id=None,
    )


# ----------------------------------------------------------------------------
# The demos' stages: timed, stoppable, resumable
# ----------------------------------------------------------------------------

class DemoStopped(KeyboardInterrupt):
    """A demo stopped by SIGTERM or Ctrl-C; the message names the stage and the command that continues it."""


class Stages:
    """A demo's stages, run in order and timed (`seconds`), stoppable and resumable.

    `run(name, fn, done=..., run_dir=...)` runs `fn(resume)`. With `resume` (`fastppo demo --resume`) a stage
    whose `done` file exists (its export's config.json) is kept; one whose `run_dir` holds a checkpoint continues
    from it (fn(True): `train` with run.resume=latest); any other starts afresh in an emptied `run_dir` (sft and
    train-rm take seconds here). SIGTERM, Ctrl-C, or a `train` that stopped early on one of them (its result says
    `interrupted`, with a checkpoint saved) raise DemoStopped: the later stages never read a missing export.
    """

    def __init__(self, out: Path, *, resume: bool, echo) -> None:
        self.out, self.resume, self.echo = out, resume, echo
        self.seconds: dict[str, float] = {}
        self.t_all = time.perf_counter()
        self.current, self.last = None, None                 # the stage running, the last one done
        self._old = None

    def stopped(self, why: str) -> DemoStopped:
        where = (f"during its {self.current} stage" if self.current else
                 f"after its {self.last} stage" if self.last else "before its first stage")
        return DemoStopped(f"the demo stopped {where} ({why}); continue it with "
                           f"`fastppo demo --resume --output-dir {self.out}`")

    def _on_sigterm(self, signum, frame) -> None:
        raise self.stopped("SIGTERM")

    def __enter__(self) -> "Stages":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        if exc_type is KeyboardInterrupt:                     # Ctrl-C in a stage without its own handler
            raise self.stopped("Ctrl-C") from None

    def run(self, name: str, fn, *, done: Path | None = None, run_dir: Path | None = None):
        from .checkpoint import list_checkpoints             # the demos' stages import the trainer anyway

        if self.resume and done is not None and done.exists():
            self.echo(f"[demo] {name:<10} kept from the earlier run")
            return None
        resumable = bool(self.resume and run_dir is not None and list_checkpoints(run_dir))
        if run_dir is not None and run_dir.exists() and not resumable:
            shutil.rmtree(run_dir)
        self.current = name
        t0 = time.perf_counter()
        result = fn(resumable)
        if getattr(result, "interrupted", False):
            raise self.stopped("a stop signal; its checkpoint is saved")
        self.seconds[name] = time.perf_counter() - t0
        self.current, self.last = None, name
        self.echo(f"[demo] {name:<10} done in {self.seconds[name]:6.1f}s  (total {time.perf_counter() - self.t_all:6.1f}s)")
        return result
