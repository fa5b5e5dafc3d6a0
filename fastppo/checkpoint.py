"""Resumable checkpoints (torch.distributed.checkpoint) and Hugging Face export.

A checkpoint is a directory `<output_dir>/checkpoints/iter_<NNNNNNNN>/`:

    model/             DCP: policy and critic weights, both optimizers' state
    trainer_state.pt   schedulers, reward moments, KL controller, update counters, prompt and ptx
                       sampler positions, the iteration and every RNG state (written by rank 0)
    config.yaml
    checksums.json     the CRC-32 of every other file (each rank sums the shard files it wrote)

DCP writes each rank's shards of every tensor under the tensor's fully
qualified name, and a load reads whatever slices the loading run needs: a
checkpoint saved by N processes resumes in M processes (one process without
torchrun included), sharded or not. All ranks write into one temporary
sibling directory that rank 0 renames into place only when every rank is
done, so a crash mid-save leaves the previous checkpoint intact, and a
failed save (a full disk) removes its temporary directory and says why. After
a save, checkpoints of earlier iterations beyond the newest `keep_last` are
deleted (never the one just written, never a later one). With several nodes,
output_dir must be on a filesystem all nodes share.

Resuming (`resume_point`) verifies a checkpoint before using it (every file
present, as long as its index says and with the checksum it was written
with) and falls back from a damaged newest checkpoint, truncated or with
changed bytes, to the newest intact one; it compares the run's config with
the checkpoint's (`run_dir.config_changes`). Checkpoints written before
checksums existed are verified without them.

The export (`export_hf`) is a plain Hugging Face directory (config,
safetensors weights, tokenizer) loadable with
`AutoModelForCausalLM.from_pretrained`; a sharded model is gathered to rank
0 for it, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import logging
import os
import random
import re
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from . import dist, lora, parallel
from .config import upgrade
from .models import rows_without_alignment
from .run_dir import RunDirError, config_changes, fingerprint_changes, refuse_earlier_run

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


def _iteration(path: Path) -> int | None:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


CHECKSUMS = "checksums.json"


def file_crc32(path: Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of a file's bytes, read in 16 MB pieces."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _checksums(root: Path) -> dict[str, int]:
    """{path relative to the checkpoint: CRC-32} of the files under `root` this rank sums: every rank the DCP shard
    files it wrote (`__<rank>_*`), rank 0 also every other file (DCP's .metadata, trainer_state.pt, config.yaml)."""
    mine = f"__{dist.rank()}_"
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        shard = f.name.startswith("__") and f.suffix == ".distcp"
        if f.name.startswith(mine) if shard else dist.is_main():
            out[str(f.relative_to(root))] = file_crc32(f)
    return out


def verify_checkpoint(path: Path, *, checksums: bool = True) -> dict:
    """The trainer state of checkpoint `path`, after checking that every file it needs is there and whole
    (DCP's index gives each shard file's length) and, with `checksums`, that every file has the CRC-32 it was
    written with; a RunDirError naming the damaged file otherwise."""
    state_file = path / "trainer_state.pt"
    sums = path / CHECKSUMS
    if checksums and sums.is_file():
        try:
            expected = json.loads(sums.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"{sums}: unreadable ({type(exc).__name__}: {exc})") from None
        for name, crc in sorted(expected.items()):
            f = path / name
            if not f.is_file():
                raise RunDirError(f"{f}: missing")
            if file_crc32(f) != crc:
                raise RunDirError(f"{f}: damaged (its bytes differ from those written: CRC-32 mismatch)")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated zip raises RuntimeError, EOFError or UnpicklingError, depending on where
        raise RunDirError(f"{state_file}: unreadable, probably truncated ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'})") from None
    if not isinstance(state, dict) or "iteration" not in state:
        raise RunDirError(f"{state_file}: not a fastppo trainer state (no iteration)")
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"{path / 'config.yaml'}: missing")
    model = path / "model"
    if not model.is_dir():
        raise RunDirError(f"{path}: no model/ directory (a checkpoint from before sharded checkpoints?)")
    try:
        storage = FileSystemReader(str(model)).read_metadata().storage_data or {}
    except Exception as exc:
        raise RunDirError(f"{model / '.metadata'}: unreadable ({type(exc).__name__}: {exc})") from None
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = model / name
        if not f.is_file():
            raise RunDirError(f"{f}: missing")
        if f.stat().st_size < size:
            raise RunDirError(f"{f}: truncated ({f.stat().st_size} of {size} bytes)")
    return state


def _not_a_checkpoint(path: Path) -> str:
    """What `path`, given as a checkpoint to resume, is instead, and what to give."""
    if not path.exists():
        typo = difflib.get_close_matches(str(path), ["latest", "auto"], n=1)
        return ("no such folder" + (f"; did you mean '{typo[0]}'?" if typo else "")
                + " (run.resume takes latest, auto or a checkpoint folder, checkpoints/iter_NNNNNNNN)")
    if not path.is_dir():
        return "is a file; give a checkpoint folder (checkpoints/iter_NNNNNNNN)"
    if checkpoint_dir(path).is_dir():
        found = list_checkpoints(path)
        return (f"is a run folder, not a checkpoint: continue it with run.output_dir={path} run.resume=latest "
                f"(--resume)" + (f", or give one of its checkpoints, e.g. {found[-1]}" if found else ""))
    if path.name == checkpoint_dir("").name and list_checkpoints(path.parent):
        return f"holds checkpoints: give one of them, e.g. the newest, {list_checkpoints(path.parent)[-1]}"
    return "not a fastppo checkpoint (no trainer_state.pt)"


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from, verified. 'latest': the newest intact one in output_dir (damaged newer ones
    are skipped with a warning); 'auto': the same, or None when there is none; else the given directory."""
    if resume not in ("auto", "latest"):
        path = Path(resume)
        if not (path / "trainer_state.pt").exists():
            raise RunDirError(f"run.resume={resume}: {_not_a_checkpoint(path)}")
        verify_checkpoint(path)
        return path
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except RunDirError as exc:
            damaged.append(str(exc))
            log.warning("skipping damaged checkpoint %s: %s", path, exc)
            continue
        if damaged:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        return path
    if damaged:
        raise RunDirError(f"run.resume={resume}: no intact checkpoint in {checkpoint_dir(output_dir)} "
                          f"({'; '.join(damaged)})")
    if resume == "auto":
        return None
    raise RunDirError(f"run.resume=latest but {checkpoint_dir(output_dir)} holds no complete checkpoint")


def resume_point(cfg) -> Path | None:
    """The checkpoint `train` continues from (None: a fresh start), after checking that continuing is sound:

    - a fresh start (run.resume=auto without a checkpoint included) needs a run.output_dir without an earlier
      run in it;
    - a checkpoint from elsewhere may continue only into such a directory, one from output_dir only when no
      intact later checkpoint exists there (saving would mix the two histories);
    - model paths must be the checkpoint's (`run_dir.FIXED_ON_RESUME`), run.iterations at least its iteration;
      other changed settings are logged, each by name.

    A torchrun restart (no run.resume given) resumes as run.resume=auto.
    """
    out = Path(cfg.run.output_dir)
    resume = cfg.run.resume
    if resume is None and dist.restart_count() > 0:
        resume = "auto"                                          # torchrun restarted us: continue from the last save
        log.warning("torchrun restart %d: resuming from the newest checkpoint, if any", dist.restart_count())
    if resume is None:
        refuse_earlier_run(out, "continue it with --resume (run.resume=latest), or choose another run.output_dir"
                           if list_checkpoints(out) else "it has no checkpoint to continue: choose another run.output_dir")
        return None
    path = resolve_resume(resume, out)
    if path is None:                                             # auto, and no checkpoint: a fresh start
        if dist.restart_count() == 0:                            # (after a torchrun restart the files are ours)
            refuse_earlier_run(out, "run.resume=auto found no checkpoint to continue: choose another run.output_dir")
        return None
    if path.resolve().parent != checkpoint_dir(out).resolve():
        refuse_earlier_run(out, f"to continue checkpoint {path} choose an empty run.output_dir")
    else:
        later = [p for p in list_checkpoints(out) if (_iteration(p) or 0) > (_iteration(path) or 0)]
        if intact := [p for p in later if _is_intact(p)]:
            raise RunDirError(f"run.resume={resume}: {out} holds later checkpoints ({', '.join(p.name for p in intact)}) "
                              "that the resumed run would overwrite: resume the newest (--resume), or continue "
                              f"{path.name} into another run.output_dir")
    done = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)["iteration"]
    if cfg.run.iterations < done:
        raise RunDirError(f"run.iterations={cfg.run.iterations} is below the iteration of checkpoint {path} ({done}): "
                          f"set run.iterations to {done} or more to continue it")
    saved = upgrade(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")))   # keys of older versions moved
    before, now = saved.get("advantage", {}).get("estimator", "gae"), cfg.advantage.estimator
    if (before == "gae") != (now == "gae"):
        raise RunDirError(f"cannot resume {path} with advantage.estimator={now}: it was saved by a run with "
                          f"advantage.estimator={before}, {'with' if before == 'gae' else 'without'} a critic (set "
                          f"advantage.estimator={before} to continue it, or start a fresh run in another "
                          "run.output_dir)")
    refused, changed = config_changes(saved, OmegaConf.to_container(OmegaConf.structured(cfg)))
    if refused:
        raise RunDirError(f"cannot resume {path} with other models: {'; '.join(refused)} (set them back, or start a "
                          "fresh run in another run.output_dir)")
    if changed:
        log.warning("resuming %s with changed settings: %s", path, "; ".join(changed))
    return path


def _is_intact(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except RunDirError:
        return False
    return True


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
    """The DCP state: model weights by FQN (DTensor shards under FSDP) and optimizer states by parameter FQN.
    critic and critic_opt are None in a critic-free run: the state then has no critic entries."""
    models = {"policy": policy} if critic is None else {"policy": policy, "critic": critic}
    for model in models.values():
        parallel.reshard(model)                                   # the shards, not a root FSDP keeps gathered
    # Frozen parameters (a LoRA model's base weights) are left out: they are the loaded model's, fixed on resume.
    trained = StateDictOptions(ignore_frozen_params=True)
    state = {name: get_model_state_dict(model, options=trained) for name, model in models.items()}
    for name, model, opt in (("policy_opt", policy, policy_opt), ("critic_opt", critic, critic_opt)):
        # An optimizer that has not stepped yet (the policy's during critic warm-up) has no state to save; reading
        # it through get_optimizer_state_dict would create some (a zero step) and shift Adam's bias correction.
        if opt is not None and opt.state:
            state[name] = get_optimizer_state_dict(model, opt)
    return state


def save_checkpoint(output_dir: str | Path, iteration: int, *, policy, critic, policy_opt, critic_opt,
                    trainer_state: dict, config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `iteration` atomically and prune old ones; returns its directory. Collective: every rank calls it.

    A failed write (a full disk) removes the temporary directory, keeps the previous checkpoints and raises a
    RunDirError naming the checkpoint and the reason, on every rank.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"iter_{iteration:08d}"
    tmp = root / f".tmp-iter_{iteration:08d}"                       # one name on every rank
    device = next(policy.parameters()).device                       # for the ranks' agreement on failure
    error = None
    if dist.is_main():
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            error = exc
    _raise_if_failed(error, "save checkpoint", final, tmp, device)  # also the barrier: tmp exists for everyone
    try:
        state = _training_state(policy, critic, policy_opt, critic_opt)
        with _dcp_single_process_ok():
            dcp.save(state, checkpoint_id=str(tmp / "model"), no_dist=not dist.is_initialized())  # each rank its shards
    except _WRITE_ERRORS as exc:
        error = exc
    if dist.is_main() and error is None:
        try:
            saved = {name: name in state for name in ("policy_opt", "critic_opt")}
            torch.save({**trainer_state, "optimizers_saved": saved, "has_critic": critic is not None,
                        "rng": rng_state(), "iteration": iteration},
                       tmp / "trainer_state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
        except _WRITE_ERRORS as exc:
            error = exc
    _raise_if_failed(error, "save checkpoint", final, tmp, device)  # also the barrier: every file is written
    # Every rank sums the shard files it wrote (in parallel), rank 0 the rest; rank 0 writes them all.
    sums = dist.gather_object_to_main(_checksums(tmp))
    if dist.is_main():
        try:
            (tmp / CHECKSUMS).write_text(json.dumps({k: v for part in sums for k, v in part.items()}, indent=0))
            for f in (tmp / "trainer_state.pt", tmp / "config.yaml", tmp / CHECKSUMS):  # on disk before the rename
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
        except _WRITE_ERRORS as exc:
            error = exc
    _raise_if_failed(error, "save checkpoint", final, tmp, device)  # also the barrier: nobody reads it before it is complete
    if dist.is_main():
        # Only earlier iterations are pruned: the checkpoint just written and any later one stay.
        earlier = [p for p in list_checkpoints(output_dir) if (_iteration(p) or 0) < iteration]
        for stale in earlier[:max(0, len(earlier) - (keep_last - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
        # Leftovers of crashed saves, and of re-saves whose replacement is in place (an .old- copy whose
        # iter_ directory is missing is the only copy of that iteration: it stays).
        replaced = [p for p in root.glob(".old-*") if (root / p.name[len(".old-"):].rsplit("-", 1)[0]).is_dir()]
        for junk in [*root.glob(".tmp-*"), *replaced]:
            shutil.rmtree(junk, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    return final


# What a failed write raises: OSError from Python's own writes, RuntimeError from torch.save's zip writer ("unexpected
# pos ..." on a full disk), CheckpointException (a BaseException) from DCP, with each rank's error inside.
_WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)
_FULL_DISK_BYTES = 1 << 20   # less free space than this after a failed write: the disk is (as good as) full


def _causes(exc: BaseException) -> list[BaseException]:
    """exc, its causes and contexts, and a CheckpointException's per-rank errors."""
    seen, todo = [], [exc]
    while todo:
        e = todo.pop()
        if isinstance(e, tuple):                      # CheckpointException.failures: rank -> (exception, traceback)
            e = e[0] if e else None
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        failures = getattr(e, "failures", None)
        todo += [e.__cause__, e.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    return seen


def write_failure_reason(exc: BaseException, where: Path) -> str:
    """Why a write under `where` failed, in a few words ("no space left on device" for a full disk or quota)."""
    causes = _causes(exc)
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in causes):
        return "no space left on device"
    try:
        probe = next(p for p in (where, *where.parents) if p.exists())
        if shutil.disk_usage(probe).free < _FULL_DISK_BYTES:
            return "no space left on device"
    except (OSError, StopIteration):
        pass
    os_error = next((e for e in causes if isinstance(e, OSError)), None)
    if os_error is not None:
        return os_error.strerror or str(os_error)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def _raise_if_failed(error: BaseException | None, what: str, final: Path, tmp: Path, device) -> None:
    """Agree on every rank whether a collective write failed; if so rank 0 removes `tmp` and all raise."""
    if not dist.any_rank(error is not None, device):
        return
    if dist.is_main():
        reason = write_failure_reason(error, tmp) if error is not None else "failed on another rank"
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [p.name for p in list_checkpoints(final.parent.parent) if p != final]
        raise RunDirError(f"cannot {what} {final}: {reason}; its partial copy was removed"
                          + (f", the previous checkpoint {kept[-1]} is kept" if kept else "")) from error
    raise RunDirError(f"cannot {what} {final}: " + (write_failure_reason(error, tmp) if error is not None
                                                    else "it failed on rank 0")) from error


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: Path, *, policy, critic, policy_opt, critic_opt, models: dict[str, str] | None = None) -> dict:
    """Load weights and optimizer states (resharded to this run's layout); return the trainer state (RNG not yet applied).

    models: this run's `run_dir.model_fingerprint`; a checkpoint that recorded other models (another architecture
    or tokenizer behind the same paths) is refused. Collective under FSDP: every rank calls it.
    """
    trainer_state = verify_checkpoint(path, checksums=False)     # `resume_point` has compared the checksums
    if trainer_state.get("has_critic", True) != (critic is not None):
        raise RunDirError(f"cannot resume {path}: it was saved {'with' if critic is None else 'without'} a critic and "
                          f"this run has {'none' if critic is None else 'one'}; a run resumes with its "
                          "advantage.estimator (gae trains a critic, the critic-free estimators do not)")
    if models is not None and (changed := fingerprint_changes(trainer_state.get("models"), models)):
        raise RunDirError(f"cannot resume {path}: its models differ from this run's: {'; '.join(changed)} "
                          "(the model directories changed since the checkpoint)")
    saved = trainer_state.get("optimizers_saved", {"policy_opt": True, "critic_opt": True})
    # Templates in this run's layout (fresh optimizers get their state created here, then overwritten).
    state = _training_state(policy, critic, policy_opt, critic_opt)
    for name, model, opt in (("policy_opt", policy, policy_opt), ("critic_opt", critic, critic_opt)):
        if opt is None:
            continue
        if saved.get(name) and name not in state:
            state[name] = get_optimizer_state_dict(model, opt)
        elif not saved.get(name):
            state.pop(name, None)
    try:
        with _dcp_single_process_ok():
            dcp.load(state, checkpoint_id=str(path / "model"), no_dist=not dist.is_initialized())
    except (RuntimeError, ValueError, OSError, CheckpointException) as exc:
        raise RunDirError(f"cannot load the weights of checkpoint {path}: {write_failure_reason(exc, path)} (a damaged "
                          "or foreign checkpoint: resume from an earlier one with run.resume=<its folder>)") from exc
    for name, model in (("policy", policy), ("critic", critic)):
        if model is not None:
            # Not strict for a LoRA model, whose checkpoint has no frozen weights (DCP has checked every saved key).
            set_model_state_dict(model, state[name], options=StateDictOptions(strict=not lora.is_lora(model)))
    for name, model, opt in (("policy_opt", policy, policy_opt), ("critic_opt", critic, critic_opt)):
        if name in state:
            set_optimizer_state_dict(model, opt, state[name])
    log.info("resumed from %s (iteration %d)", path, trainer_state["iteration"])
    return trainer_state


def read_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Full tensors of one model ("policy" or "critic") of a checkpoint, read in this process alone (tools, tests)."""
    reader = FileSystemReader(str(Path(path) / "model"))
    prefix = f"{name}."
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with _dcp_single_process_ok():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def _plain_class_name(model) -> str:
    return parallel.plain_class(model).__name__


def _without_alignment_rows(model, state: dict | None, rows: int) -> dict:
    """The model's state dict (`state`, or read from the unsharded model) with the input and output embeddings
    (and an lm_head bias) cut to their first `rows` rows: the embedding rows fastppo added for alignment are
    not exported. Read from the model, the tensors are views (tied tables keep sharing their storage, and
    nothing is copied), except for a LoRA export, whose merge writes into the tensors it is given."""
    if state is None:
        state = lora.cpu_state(model) if lora.is_lora(model) else model.state_dict()
    head = model.get_output_embeddings()                     # None for a sequence classifier
    tables = [model.get_input_embeddings().weight]
    if head is not None:
        tables += [head.weight, getattr(head, "bias", None)]
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if any(p is t for t in tables)}
    if not names or any(k not in state or state[k].size(0) <= rows for k in names):
        raise RuntimeError(f"export: cannot find the embedding tables of {_plain_class_name(model)} in its state "
                           f"dict to leave out the alignment rows ({sorted(names)})")
    return {k: v[:rows] if k in names else v for k, v in state.items()}


@contextlib.contextmanager
def _saved_vocab_size(model, rows: int | None):
    """While the export is written, the model's config states `rows` (when not None) as its vocabulary size."""
    if rows is None:
        yield
        return
    config = model.config.get_text_config()
    before, config.vocab_size = config.vocab_size, rows
    try:
        yield
    finally:
        config.vocab_size = before


def export_hf(model, tokenizer, out_dir: str | Path, *, adapter_only: bool = False) -> Path:
    """Save model + tokenizer as a Hugging Face directory (safetensors), atomically.

    A sharded model is gathered first: every rank takes part, rank 0 receives
    the full state dict on the CPU, the other ranks receive nothing and
    return at once. A LoRA model (`fastppo.lora`) is exported with its adapters
    merged into the weights, or with adapter_only as the adapter alone in PEFT's format. The embedding rows
    `load_models` added for alignment are left out (`models.rows_without_alignment`): the export has the
    rows of the checkpoint it started from, plus a pad token fastppo added.
    """
    out = Path(out_dir)
    state = None
    if parallel.is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return out
    rows = rows_without_alignment(model)
    if rows is not None:
        state = _without_alignment_rows(model, state, rows)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        with _saved_vocab_size(model, rows):
            if lora.is_lora(model):
                lora.save_export(model, tmp, state=state, adapter_only=adapter_only)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
                if parallel.is_sharded(model):  # the config names the architecture, not the FSDP wrapper class
                    model.config.architectures = [_plain_class_name(model)]
                    model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except _WRITE_ERRORS as exc:
        reason = write_failure_reason(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"cannot export to {out}: {reason}; its partial copy was removed") from exc
    log.info("exported %s to %s", _plain_class_name(model), out)
    return out
