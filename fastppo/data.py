"""Prompt and SFT (ptx) datasets, chat templates, left-padding collate, a resumable sampler.

Records come from a JSON Lines file (.jsonl or .json: one object per line), a .parquet file, or a directory
holding a saved `datasets` dataset (its train split) or such files (all of them, in name order; a directory with
files named like held-out splits, test.jsonl or eval.parquet, is refused). Every record is validated and
tokenised up front, so a malformed file fails at start-up with its path, line (JSONL; row for Parquet) and field.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import dist
from .models import ModelError

log = logging.getLogger("fastppo")


class DataError(ValueError):
    """A data problem; the message names the file, line and field."""


# ----------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------

def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM (Windows editors) is no JSON
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if lineno == 1 and line.lstrip().startswith("["):      # a JSON array written over several lines
                    raise DataError(_json_array(where, path)) from None
                raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(rec, dict):
                if lineno == 1 and isinstance(rec, list):
                    raise DataError(_json_array(where, path))
                raise DataError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
            yield where, rec


def _json_array(where: str, path: Path) -> str:
    return (f"{where}: each line must be a JSON object, and this file holds a JSON array: .json and .jsonl files are "
            f"read as JSON Lines, one object per line; convert it, e.g. jq -c '.[]' {path} > "
            f"{path.with_name(path.stem + '_lines.jsonl')}")


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq  # lazy: heavy, and only Parquet inputs need it

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", rec


def _read_dataset_dir(path: Path) -> Iterator[tuple[str, dict]]:
    if _is_saved_dataset(path):
        try:
            import datasets  # lazy: an optional dependency, only saved `datasets` directories need it
        except ImportError:
            raise DataError(f"{path}: a saved `datasets` dataset needs the `datasets` package (pip install datasets)") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        for i, rec in enumerate(ds):
            yield f"{path}: row {i}", rec
        return
    for f in data_files(path)[0]:
        yield from read_records(f)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
HELD_OUT = re.compile(r"(^|[-_.])(test|tests|eval|evaluation|valid|validation|val|dev|heldout)([-_.]|$)")
"""A file name naming a held-out split (test.jsonl, prompts_eval.jsonl, validation-00000-of-00001.parquet)."""


def data_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(the data files a directory's records are read from, in name order; the other files, skipped). A file named
    like a held-out split is refused: reading it with the others would train on the held-out data."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    skipped = sorted(p for p in path.iterdir() if p.is_file() and p not in files and not p.name.startswith("."))
    held_out = [p.name for p in files if HELD_OUT.search(p.stem.lower())]
    if held_out:
        train = [p.name for p in files if p.name not in held_out]
        raise DataError(f"{path}: holds files named like held-out splits ({', '.join(held_out)}), which would be read "
                        f"together with the others: give the file to train on" +
                        (f" ({path / train[0]})" if len(train) == 1 else "") + ", or move the held-out files out")
    if not files:
        raise DataError(f"{path}: directory holds no saved dataset and no {'/'.join(DATA_SUFFIXES)} files"
                        + (f" (it holds {', '.join(p.name for p in skipped[:5])})" if skipped else ""))
    return files, skipped


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(location, record) pairs; location is 'file:line' for error messages."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _read_dataset_dir(path)
    if path.suffix == ".jsonl" or path.suffix == ".json":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported data format {path.suffix!r} (use .jsonl, .json, .parquet or a dataset "
                    "directory)")


# ----------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------

TOKENIZER_CHECK_RECORDS = 64
"""Records whose texts `check_tokenizer` encodes and decodes."""
MAX_UNK_FRACTION = 0.05
"""Default largest fraction of unknown tokens `check_tokenizer` accepts in that sample (data.max_unknown_token_frac)."""
MIN_ROUNDTRIP_FRACTION = 0.9
"""Smallest fraction of the sampled texts (those without unknown tokens) that must decode back to themselves."""


def _texts(value) -> list[str]:
    """The strings in a field's value: the string itself, or the contents of a list of messages."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return []


def _canonical(text: str) -> str:
    """Text modulo what tokenizers may legitimately change: whitespace, Unicode compatibility forms, case."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def loaded(items: list, what: str, tokenizer, path: str | Path, fields: dict[str, str],
           max_unknown_frac: float = MAX_UNK_FRACTION) -> list:
    """The end of every loader: `items` read from `path`, refused when there are none, the tokenizer checked on the
    texts of `fields` (check_tokenizer), and logged (for a directory, the files read and those skipped)."""
    if not items:
        raise DataError(f"{path}: no {what} found (empty file?)")
    check_tokenizer(tokenizer, path, fields, max_unknown_frac)
    folder = Path(path)
    if folder.is_dir() and not _is_saved_dataset(folder):
        files, skipped = data_files(folder)
        log.info("%d %s from %s: %s", len(items), what, path, ", ".join(p.name for p in files))
        if skipped:
            log.warning("%s: skipped %s (records are read from %s files)", path, ", ".join(p.name for p in skipped),
                        "/".join(DATA_SUFFIXES))
    else:
        log.info("%d %s from %s", len(items), what, path)
    return items


def check_tokenizer(tokenizer, path: str | Path, fields: dict[str, str],
                    max_unknown_frac: float = MAX_UNK_FRACTION) -> None:
    """Refuse data the tokenizer does not cover, and a tokenizer that does not round-trip the data:
    encode -> decode must give the texts back (modulo whitespace, NFKC and case).

    fields: record field -> the config key that chose it (named in the errors). More than `max_unknown_frac`
    of a field's tokens being the unknown token is a DataError naming the field, its config key and examples
    (often the field is not the text: an id, a label); 1 turns that check off. The round trip catches
    tokenizers that load as something else than what was saved (for example a word-level tokenizer read
    back as a byte-level BPE one), which would otherwise train on garbled prompts and export the garbled
    tokenizer. The texts are those of the first TOKENIZER_CHECK_RECORDS records of `path`.
    """
    texts: dict[str, list[tuple[str, str]]] = {f: [] for f in fields}       # field -> (where, text)
    for i, (where, rec) in enumerate(read_records(path)):
        if i == TOKENIZER_CHECK_RECORDS:
            break
        for f in fields:
            texts[f] += [(where, t) for t in (_texts(rec[f]) if f in rec else []) if t.strip()]
    unk = tokenizer.unk_token_id
    name = getattr(tokenizer, "name_or_path", "") or "?"
    checked, failed = 0, []
    for f, key in fields.items():
        n_tokens = n_unk = 0
        examples = []
        for where, text in texts[f]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            n_tokens += len(ids)
            k = sum(i == unk for i in ids) if unk is not None else 0
            n_unk += k
            if k:  # an unknown token cannot decode back: the text only counts in the unknown-token rate
                line = where[len(str(path)):].lstrip(": ") if where.startswith(str(path)) else where
                line = f"line {line}" if line.isdigit() else line
                examples.append(f"{text[:40]!r} -> {tokenizer.decode(ids)[:60]!r} ({line})")
                continue
            checked += 1
            back = tokenizer.decode(ids, skip_special_tokens=True)
            if _canonical(back) != _canonical(text):
                failed.append((text, back))
        if n_tokens and n_unk / n_tokens > max_unknown_frac:
            chosen = f" ({key})" if key else ""
            raise DataError(
                f"{path}: {n_unk} of the {n_tokens} tokens ({n_unk / n_tokens:.0%}) of field '{f}'{chosen} in the first "
                f"{TOKENIZER_CHECK_RECORDS} records are the unknown token {tokenizer.unk_token!r} of the tokenizer at "
                f"{name}, e.g. {'; '.join(examples[:2])}. Check that '{f}' holds the text{f' (set {key})' if key else ''}"
                f" and that the tokenizer is the model's; data.max_unknown_token_frac={max_unknown_frac:g} is the "
                "limit (1 turns the check off)")
    if failed and len(failed) > (1 - MIN_ROUNDTRIP_FRACTION) * checked:
        text, back = failed[0]
        raise ModelError(f"the tokenizer at {name} does not reproduce the data of {path}: {len(failed)} of {checked} "
                         f"sampled texts change under encode -> decode, e.g. {text[:80]!r} -> {back[:80]!r} "
                         f"(it loads as {type(tokenizer).__name__}; was it saved by another version of transformers?)")


CHAT_ROLES = ("system", "user", "assistant", "tool")
"""The roles of chat messages (what chat templates read; any other role is misread or dropped by them)."""


def check_messages(where: str, field: str, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{field}' message {j} must be an object with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: field '{field}' message {j}: role {m['role']!r} is not one of "
                            f"{', '.join(CHAT_ROLES)}" + (" (roles are lower case)" if m["role"].lower() in CHAT_ROLES
                                                          else ""))
    return messages


def apply_chat_template(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat messages need a tokenizer with a chat template, and this tokenizer has none")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, value, *, where: str, field: str, prompt_format: str) -> list[int]:
    """Token ids of one prompt: plain text, or messages through the chat template."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        if prompt_format == "chat":
            return apply_chat_template(tokenizer, [{"role": "user", "content": value}], where, True)
        return tokenizer(value, add_special_tokens=True)["input_ids"]
    if isinstance(value, list):
        if prompt_format == "plain":
            raise DataError(f"{where}: field '{field}' holds messages but data.prompt_format is 'plain'")
        return apply_chat_template(tokenizer, check_messages(where, field, value), where, True)
    raise DataError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")


def load_prompts(path: str | Path, tokenizer, *, field: str, prompt_format: str, max_len: int,
                 messages_field: str = "messages", records: list[dict] | None = None,
                 keys: tuple[str, str] = ("data.prompt_field", ""), max_unknown_frac: float = MAX_UNK_FRACTION,
                 max_len_key: str = "data.max_prompt_len") -> list[list[int]]:
    """Tokenised prompts, each truncated to its last max_len tokens.

    A record without `field` but with `messages_field` (the chat files `sft`
    reads) is a chat prompt. When a list of messages ends with the
    assistant's, that message is a reference response: the prompt is the
    turns before it, which must include a user message.

    Truncated prompts are counted in a warning; when every prompt loses more than half its tokens (the start, which
    holds the instruction) the data is refused, naming `max_len_key`.

    `records`, when given, receives each prompt's whole record (in prompt order): its other fields (e.g. a
    reference `answer`) are what reward functions see. keys: the config keys of `field` and `messages_field`
    (for the errors); max_unknown_frac: as in `check_tokenizer`.
    """
    prompts, lengths = [], []
    for where, rec in read_records(path):
        name = field if field in rec or messages_field not in rec else messages_field
        if name not in rec:
            raise DataError(f"{where}: missing field '{field}' (fields: {sorted(rec)}); set {keys[0]}")
        value = rec[name]
        if isinstance(value, list) and len(value) > 1 and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            value = value[:-1]  # an SFT-style conversation: the last turn is the reference response
        ids = encode_prompt(tokenizer, value, where=where, field=name, prompt_format=prompt_format)
        if isinstance(value, list) and not any(m["role"] == "user" for m in value):
            raise DataError(f"{where}: field '{name}' has no user message (roles: "
                            f"{', '.join(m['role'] for m in value)}): a prompt needs one")
        if not ids:
            raise DataError(f"{where}: field '{name}' tokenises to nothing")
        prompts.append(ids[-max_len:])
        lengths.append(len(ids))
        if records is not None:
            records.append(rec)
    cut = [n for n in lengths if n > max_len]
    if cut and all(n > 2 * max_len for n in lengths):
        raise DataError(f"{path}: every prompt is longer than {max_len_key}={max_len} tokens and would keep less than "
                        f"half of itself, the end ({min(lengths)} to {max(lengths)} tokens): raise {max_len_key}")
    if cut:
        log.warning("%d of %d prompts of %s are longer than %s=%d tokens and keep only their last %d (longest: %d)",
                    len(cut), len(lengths), path, max_len_key, max_len, max_len, max(cut))
    return loaded(prompts, "prompts", tokenizer, path, dict(zip((field, messages_field), keys)), max_unknown_frac)


def load_records(path: str | Path) -> list[dict]:
    """Every record of a prompt file, as it is (an environment's reset reads them: `fastppo.envs`)."""
    records = [rec for _, rec in read_records(path)]
    if not records:
        raise DataError(f"{path}: no records found (empty file?)")
    return records


@dataclass
class SFTExample:
    input_ids: list[int]
    """prompt + response tokens."""
    n_prompt: int
    """Leading tokens excluded from the LM loss."""


def fit_to_length(p_ids: list[int], r_ids: list[int], max_len: int) -> tuple[list[int], int]:
    """(prompt + response cut to max_len, prompt tokens kept): the prompt loses tokens from the left first (one
    is kept), then the response from the right."""
    ids, n_prompt = p_ids + r_ids, len(p_ids)
    if len(ids) > max_len:
        drop = min(len(ids) - max_len, max(0, n_prompt - 1))
        ids, n_prompt = ids[drop:][:max_len], n_prompt - drop
    return ids, n_prompt


def load_sft(path: str | Path, tokenizer, *, prompt_field: str, response_field: str, messages_field: str,
             max_len: int, keys: tuple[str, str, str] = ("data.prompt_field", "data.response_field",
                                                         "data.messages_field"),
             max_unknown_frac: float = MAX_UNK_FRACTION) -> list[SFTExample]:
    """{prompt, response} records (or chat messages whose last turn is the response), EOS appended. keys: the
    config keys of the three fields (for the errors); max_unknown_frac: as in `check_tokenizer`."""
    out = []
    eos = tokenizer.eos_token_id
    for where, rec in read_records(path):
        if prompt_field in rec:
            if response_field not in rec:
                raise DataError(f"{where}: missing field '{response_field}'")
            prompt, response = rec[prompt_field], rec[response_field]
            if not isinstance(response, str) or not response:
                raise DataError(f"{where}: field '{response_field}' must be a non-empty string")
            p_ids = encode_prompt(tokenizer, prompt, where=where, field=prompt_field, prompt_format="auto")
            r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        elif messages_field in rec:
            msgs = check_messages(where, messages_field, rec[messages_field])
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field '{messages_field}': the last message must be the assistant's response")
            p_ids = apply_chat_template(tokenizer, msgs[:-1], where, True)
            r_ids = tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        else:
            raise DataError(f"{where}: needs field '{prompt_field}' + '{response_field}' or '{messages_field}' (fields: {sorted(rec)})")
        out.append(SFTExample(*fit_to_length(p_ids, r_ids + [eos], max_len)))
    return loaded(out, "SFT examples", tokenizer, path, dict(zip((prompt_field, response_field, messages_field), keys)),
                  max_unknown_frac)


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------

@dataclass
class PromptBatch:
    """Left-padded prompts.

    input_ids:      (B, P) int64, pad on the left
    attention_mask: (B, P) int64, 1 on prompt tokens
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def collate_prompts(prompts: list[list[int]], pad_id: int) -> PromptBatch:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return PromptBatch(ids, mask)


@dataclass
class SFTBatch:
    """Right-padded SFT examples for the ptx loss.

    input_ids:      (B, L) int64
    attention_mask: (B, L) int64
    labels:         (B, L) int64, the next token at each position, -100 off the response
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def collate_sft(examples: list[SFTExample], pad_id: int, ignore_index: int = -100) -> SFTBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, ignore_index)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        t = torch.tensor(e.input_ids, dtype=torch.long)
        ids[i, :n] = t
        mask[i, :n] = 1
        # position j predicts token j+1; only response tokens (index >= n_prompt) are targets
        labels[i, max(0, e.n_prompt - 1):n - 1] = t[max(1, e.n_prompt):]
    return SFTBatch(ids, mask, labels)


class EpochSampler:
    """Draws batches of indices from a seeded per-epoch permutation; resumable.

    State is (epoch, position): the permutation of epoch e is a function of
    (seed, e) alone, so a resumed run draws exactly the same prompts.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(k - len(out), self.n - self.position)
            out += self._perm[self.position:self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        if d["n"] != self.n:
            raise DataError(f"the resumed run saw {d['n']} records but the data now has {self.n}; data changed since the checkpoint")
        self.epoch, self.position = d["epoch"], d["position"]
        self._perm = self._permutation(self.epoch)


def ptx_batches(dc, tokenizer, *, seed: int, batch_size: int, device) -> tuple[EpochSampler, Iterator[SFTBatch]]:
    """The ptx loss's data (`train`'s data.ptx_path and its fields, `DataConfig` dc): its resumable sampler (the
    state a checkpoint records) and endless batches. Each draw takes batch_size x world_size examples (the same on
    every rank) and keeps this rank's batch_size of them."""
    examples = load_sft(dc.ptx_path, tokenizer, prompt_field=dc.ptx_prompt_field, response_field=dc.ptx_response_field,
                        messages_field=dc.ptx_messages_field, max_len=dc.max_ptx_len,
                        keys=("data.ptx_prompt_field", "data.ptx_response_field", "data.ptx_messages_field"),
                        max_unknown_frac=dc.max_unknown_token_frac)
    sampler = EpochSampler(len(examples), seed=seed + 1, shuffle=True)

    def batches() -> Iterator[SFTBatch]:
        r = dist.rank()
        while True:
            drawn = sampler.next(batch_size * dist.world_size())
            b = collate_sft([examples[i] for i in drawn[r * batch_size:(r + 1) * batch_size]], tokenizer.pad_token_id)
            yield SFTBatch(*(t.to(device) for t in (b.input_ids, b.attention_mask, b.labels)))

    return sampler, batches()
