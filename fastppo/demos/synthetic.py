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


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """A small Llama: big enough to learn the task in seconds on a CPU (every demo vocabulary starts with
    SPECIAL_TOKENS)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index(PAD), eos_token_id=SPECIAL_TOKENS.index(EOS), bos_token_id=None,
    )
