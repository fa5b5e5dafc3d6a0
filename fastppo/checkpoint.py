"""Resumable checkpoints and Hugging Face export.

A checkpoint is a directory `<output_dir>/checkpoints/iter_<NNNNNNNN>/`:

    policy.safetensors   critic.safetensors   trainer_state.pt   config.yaml

trainer_state.pt holds both optimizers and schedulers, the running reward
moments, the KL controller, the update counters, the prompt sampler position,
the iteration and every RNG state. It is written into a temporary sibling
directory that is renamed into place only when complete, so a crash
mid-save leaves the previous checkpoint intact; the newest `keep_last` are
kept.

The export (`export_hf`) is a plain Hugging Face directory (config,
safetensors weights, tokenizer) loadable with
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from . import dist

log = logging.getLogger("fastppo")

_NAME = re.compile(r"^iter_(\d{8})$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """'latest' -> the newest checkpoint in output_dir; else the given directory."""
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise FileNotFoundError(f"run.resume=latest but {checkpoint_dir(output_dir)} holds no complete checkpoint")
        return ckpts[-1]
    path = Path(resume)
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"run.resume={resume}: not a fastppo checkpoint (no trainer_state.pt)")
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, iteration: int, *, policy, critic, trainer_state: dict,
                    config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `iteration` atomically and prune old ones; returns its directory."""
    root = checkpoint_dir(output_dir)
    final = root / f"iter_{iteration:08d}"
    if not dist.is_main():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-iter_{iteration:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(policy, str(tmp / "policy.safetensors"))
    save_model(critic, str(tmp / "critic.safetensors"))
    torch.save({**trainer_state, "rng": rng_state(), "iteration": iteration}, tmp / "trainer_state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # re-saving the same iteration: move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for junk in root.glob(".tmp-*"):  # leftovers of crashed saves
        if junk != tmp:
            shutil.rmtree(junk, ignore_errors=True)
    log.info("checkpoint saved: %s", final)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: Path, *, policy, critic, device: torch.device) -> dict:
    """Load weights into policy and critic; return the trainer state (RNG not yet applied)."""
    for model, name in ((policy, "policy"), (critic, "critic")):
        missing, unexpected = load_model(model, str(path / f"{name}.safetensors"), strict=True, device=str(device))
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    log.info("resumed from %s (iteration %d)", path, state["iteration"])
    return state


def export_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model + tokenizer as a Hugging Face directory (safetensors), atomically."""
    out = Path(out_dir)
    if not dist.is_main():
        return out
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported %s to %s", type(model).__name__, out)
    return out
