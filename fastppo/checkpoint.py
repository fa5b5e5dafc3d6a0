"""Resumable checkpoints (torch.distributed.checkpoint) and Hugging Face export.

A checkpoint is a directory `<output_dir>/checkpoints/iter_<NNNNNNNN>/`:

    model/             DCP: policy and critic weights, both optimizers' state
    trainer_state.pt   schedulers, reward moments, KL controller, update counters, prompt and ptx
                       sampler positions, the iteration and every RNG state (written by rank 0)
    config.yaml

DCP writes each rank's shards of every tensor under the tensor's fully
qualified name, and a load reads whatever slices the loading run needs: a
checkpoint saved by N processes resumes in M processes (one process without
torchrun included), sharded or not. All ranks write into one temporary
sibling directory that rank 0 renames into place only when every rank is
done, so a crash mid-save leaves the previous checkpoint intact; the newest
`keep_last` are kept. With several nodes, output_dir must be on a
filesystem all nodes share.

The export (`export_hf`) is a plain Hugging Face directory (config,
safetensors weights, tokenizer) loadable with
`AutoModelForCausalLM.from_pretrained`; a sharded model is gathered to rank
0 for it, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

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


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'latest' -> the newest checkpoint in output_dir; 'auto' -> the same, or None when there is none yet;
    else the given directory."""
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
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


@contextlib.contextmanager
def _dcp_single_process_ok():
    """DCP warns on every save/load without a process group; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _training_state(policy, critic, policy_opt, critic_opt) -> dict:
    """The DCP state: model weights by FQN (DTensor shards under FSDP) and optimizer states by parameter FQN."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    for model in (policy, critic):
        dist.reshard(model)                                   # the shards, not a root FSDP keeps gathered
    state = {"policy": get_model_state_dict(policy), "critic": get_model_state_dict(critic)}
    for name, model, opt in (("policy_opt", policy, policy_opt), ("critic_opt", critic, critic_opt)):
        # An optimizer that has not stepped yet (the policy's during critic warm-up) has no state to save; reading
        # it through get_optimizer_state_dict would create some (a zero step) and shift Adam's bias correction.
        if opt.state:
            state[name] = get_optimizer_state_dict(model, opt)
    return state


def save_checkpoint(output_dir: str | Path, iteration: int, *, policy, critic, policy_opt, critic_opt,
                    trainer_state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `iteration` atomically and prune old ones; returns its directory. Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_dir(output_dir)
    final = root / f"iter_{iteration:08d}"
    tmp = root / f".tmp-iter_{iteration:08d}"                       # one name on every rank
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    state = _training_state(policy, critic, policy_opt, critic_opt)
    with _dcp_single_process_ok():
        dcp.save(state, checkpoint_id=str(tmp / "model"), no_dist=not dist.is_initialized())  # each rank its shards
    if dist.is_main():
        saved = {name: name in state for name in ("policy_opt", "critic_opt")}
        torch.save({**trainer_state, "optimizers_saved": saved, "rng": rng_state(), "iteration": iteration},
                   tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        for f in (tmp / "trainer_state.pt", tmp / "config.yaml"):  # data on disk before the rename makes it visible
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
            shutil.rmtree(junk, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    dist.barrier()                                                    # nobody reads it before it is complete
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


def load_checkpoint(path: Path, *, policy, critic, policy_opt, critic_opt) -> dict:
    """Load weights and optimizer states (resharded to this run's layout); return the trainer state (RNG not yet applied).

    Collective under FSDP: every rank calls it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if not (path / "model").is_dir():
        raise FileNotFoundError(f"{path}: no model/ directory (a checkpoint from before sharded checkpoints?)")
    trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    saved = trainer_state.get("optimizers_saved", {"policy_opt": True, "critic_opt": True})
    # Templates in this run's layout (fresh optimizers get their state created here, then overwritten).
    state = _training_state(policy, critic, policy_opt, critic_opt)
    for name, model, opt in (("policy_opt", policy, policy_opt), ("critic_opt", critic, critic_opt)):
        if saved.get(name) and name not in state:
            state[name] = get_optimizer_state_dict(model, opt)
        elif not saved.get(name):
            state.pop(name, None)
    with _dcp_single_process_ok():
        dcp.load(state, checkpoint_id=str(path / "model"), no_dist=not dist.is_initialized())
    set_model_state_dict(policy, state["policy"])
    set_model_state_dict(critic, state["critic"])
    for name, model, opt in (("policy_opt", policy, policy_opt), ("critic_opt", critic, critic_opt)):
        if name in state:
            set_optimizer_state_dict(model, opt, state[name])
    log.info("resumed from %s (iteration %d)", path, trainer_state["iteration"])
    return trainer_state


def read_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Full tensors of one model ("policy" or "critic") of a checkpoint, read in this process alone (tools, tests)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(Path(path) / "model"))
    prefix = f"{name}."
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with _dcp_single_process_ok():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def _plain_class_name(model) -> str:
    """The model's own class name (FSDP2 wraps it in a generated FSDP<Name> subclass)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls.__name__


def export_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """Save model + tokenizer as a Hugging Face directory (safetensors), atomically.

    A sharded model is gathered first: every rank takes part, rank 0 receives
    the full state dict on the CPU, the other ranks receive nothing and
    return at once.
    """
    out = Path(out_dir)
    state = None
    if dist.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return out
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    if state is not None:  # the config names the architecture, not the FSDP wrapper class
        model.config.architectures = [_plain_class_name(model)]
        model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported %s to %s", _plain_class_name(model), out)
    return out
