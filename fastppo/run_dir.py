"""The run directory: claiming it for one run, and what a run may find in it.

Every command (`train`, `sft`, `train-rm`) claims its run.output_dir first:

- it must be a directory this process can write (created when missing);
- it is locked for the run's lifetime (`<output_dir>/.fastppo.lock`, an OS
  file lock the kernel drops when the process dies, kill -9 included), so a
  second run in the same directory stops at once instead of overwriting the
  first one's files;
- the run's export must not land on a model directory the run reads from.

A fresh start refuses a directory that already holds a run (checkpoints, a
non-empty metrics.jsonl, an export): nothing of an earlier run is ever
deleted or truncated. `train` continues a run with run.resume (`--resume`),
checked by `checkpoint.resume_point`; the comparison of the resumed config
with the checkpoint's is `config_changes` below.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from . import dist

log = logging.getLogger("fastppo")

LOCK_NAME = ".fastppo.lock"

# Settings a resumed run must share with its checkpoint: with another model the resumed run would continue the
# checkpoint's policy and critic against another reference, reward model or critic architecture; with other LoRA
# settings (or none) the checkpoint's trained parameters would not fit the models.
FIXED_ON_RESUME = ("model.policy_path", "model.reward_path", "model.critic_path", "model.lora", "model.critic_lora")
# Settings that differ by design between the saved config and the resuming one.
IGNORED_ON_RESUME = ("run.resume",)


class RunDirError(ValueError):
    """A problem with the run directory or a checkpoint or export in it; the message names the path or field."""


# ----------------------------------------------------------------------------
# Claiming the directory
# ----------------------------------------------------------------------------

def _is_same_or_inside(path: str | Path, container: Path) -> bool:
    p, c = Path(path).expanduser().resolve(), container.expanduser().resolve()
    return p == c or c in p.parents


def _claim(out: Path, field: str, reads: dict[str, str | None], export: Path | None) -> FileLock:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{field}={out} is a file, not a directory: choose another {field}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise RunDirError(f"{field}={out}: cannot create or write there ({exc.strerror or exc}): "
                          f"choose another {field}") from None
    if export is not None:
        for name, path in reads.items():
            if path and _is_same_or_inside(path, export):
                raise RunDirError(f"{name}={path} lies in this run's export directory {export}, which the export "
                                  f"would replace: choose another {field}")
    lock = FileLock(str(out / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(f"{field}={out} is in use by another run (it holds {out / LOCK_NAME}): wait for it to "
                          f"finish or choose another {field}") from None
    return lock


@contextlib.contextmanager
def claim(output_dir: str | Path, *, field: str = "run.output_dir", reads: dict[str, str | None] | None = None,
          export: Path | None = None, device="cpu") -> Iterator[Path]:
    """Create, check and lock output_dir for the duration of the block (see the module docstring).

    reads: config field -> model path the run reads; export: the directory the run will export to.
    Under torchrun rank 0 claims the directory and every rank raises when it fails (device: for that exchange).
    """
    out = Path(output_dir)
    lock, error = None, None
    if dist.is_main():
        try:
            lock = _claim(out, field, reads or {}, export)
        except RunDirError as exc:
            error = exc
    if dist.any_rank(error is not None, device):
        raise error or RunDirError(f"{field}={out}: refused on rank 0 (its error says why)")
    try:
        yield out
    finally:
        if lock is not None:
            lock.release()


def held_locks(root: Path) -> list[Path]:
    """The run locks under `root` (itself included) that a live process holds now."""
    held = []
    for path in sorted(root.rglob(LOCK_NAME)) if root.is_dir() else ():
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            held.append(path)
        else:
            lock.release()
    return held


def earlier_run(out: Path) -> list[str]:
    """What in `out` belongs to a run: checkpoints, a non-empty metrics.jsonl, an export (relative names)."""
    ckpts = out / "checkpoints"
    found = [f"checkpoints/{p.name}" for p in sorted(ckpts.glob("iter_*"))] if ckpts.is_dir() else []
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if (out / "export").exists():
        found.append("export")
    return found


def refuse_earlier_run(out: Path, hint: str, field: str = "run.output_dir") -> None:
    """RunDirError when `out` holds a run (a fresh start would overwrite or mix with it)."""
    found = earlier_run(out)
    if found:
        shown = ", ".join(found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise RunDirError(f"{field}={out} already holds a run ({shown}): {hint}")


def claimed_stage(run_stage):
    """Decorator for a one-model stage `f(cfg, ...)` (sft, train-rm): claim cfg.run.output_dir, refuse one that
    holds a run, and refuse an export (<output_dir>/export) over cfg.model.path."""

    @functools.wraps(run_stage)
    def wrapper(cfg, *args, **kwargs):
        out = Path(cfg.run.output_dir)
        with claim(out, reads={"model.path": cfg.model.path}, export=out / "export"):
            refuse_earlier_run(out, "choose another run.output_dir (a new run never replaces an earlier one's files)")
            return run_stage(cfg, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------
# Resuming: what changed since the checkpoint
# ----------------------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same_value(key: str, old, new) -> bool:
    if old == new:
        return True
    if key.endswith("_path") and old is not None and new is not None:   # one directory spelt two ways
        return Path(str(old)).expanduser().resolve() == Path(str(new)).expanduser().resolve()
    return False


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, changed): 'field: old -> new' for the fields of FIXED_ON_RESUME that differ, and for the others."""
    old, new = _flatten(saved), _flatten(now)
    missing = "(absent)"
    refused, changed = [], []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, missing), new.get(key, missing)
        if key in IGNORED_ON_RESUME or _same_value(key, a, b):
            continue
        fixed = key in FIXED_ON_RESUME or key.startswith(tuple(f"{f}." for f in FIXED_ON_RESUME))  # model.lora.rank
        (refused if fixed else changed).append(f"{key}: {a} -> {b}")
    return refused, changed


def model_fingerprint(models) -> dict[str, str]:
    """What the models and tokenizer are, beyond their paths: class, type and parameter count per model, and a
    digest of the tokenizer's vocabulary and special tokens (recorded in checkpoints, compared on resume)."""
    out = {}
    for role in ("policy", "critic", "reward"):
        model = getattr(models, role)
        if model is None:                                              # a critic-free run, or no reward model
            continue
        n = sum(p.numel() for p in model.parameters())                # DTensor.numel() is the global size
        out[role] = f"{model.config.model_type} {n} parameters"
    tok = models.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items())) + repr((tok.pad_token_id, tok.eos_token_id, tok.bos_token_id))
    out["tokenizer"] = f"{len(tok)} tokens, digest {hashlib.sha256(vocab.encode()).hexdigest()[:16]}"
    return out


# The config field each fingerprint entry comes from (for the error message).
FINGERPRINT_FIELDS = {"policy": "model.policy_path", "critic": "model.critic_path (null: model.reward_path)",
                      "reward": "model.reward_path", "tokenizer": "model.policy_path"}


def fingerprint_changes(saved: dict[str, str] | None, now: dict[str, str]) -> list[str]:
    """'role (field): saved -> now' for every model or tokenizer that differs (none for an older checkpoint)."""
    return [f"{role} ({FINGERPRINT_FIELDS.get(role, role)}): {saved[role]} -> {now.get(role)}"
            for role in (saved or {}) if saved[role] != now.get(role)]
