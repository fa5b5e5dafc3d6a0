"""The run directory: a fresh run never touches an earlier run's files, the directory is locked, `--resume`
checks the checkpoint (damage, config, models), and failed saves clean up and say why."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastppo import checkpoint, run_dir
from fastppo.checkpoint import load_checkpoint, resolve_resume, resume_point, save_checkpoint, verify_checkpoint
from fastppo.cli import main
from fastppo.config import load_config
from fastppo.run_dir import RunDirError, claim, fingerprint_changes, model_fingerprint
from fastppo.train import train
from fastppo_testing.trainer import tiny_setups  # noqa: F401  (fixture)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tiny_setups, tmp_path_factory):
    """A finished 2-iteration run with checkpoints iter_1 and iter_2 (copied by each test that changes it)."""
    setup = tiny_setups("llama")
    out = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, setup.overrides(**{"run.output_dir": out, "run.iterations": 2, "run.save_every": 1,
                                                "run.keep_last": 5, "run.export_at_end": False})))
    return SimpleNamespace(setup=setup, out=out)


def copy_run(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished.out, out, ignore=shutil.ignore_patterns(run_dir.LOCK_NAME))
    return out


def cfg_for(finished, out: Path, **extra):
    return load_config(None, finished.setup.overrides(**{"run.output_dir": out, "run.iterations": 2,
                                                         "run.export_at_end": False, **extra}))


def cli_train(finished, out: Path, capsys, *args, **extra) -> tuple[int, str]:
    """`fastppo train` on the tiny setup; (exit code, stderr)."""
    rc = main(["train", *finished.setup.overrides(**{"run.output_dir": out, "run.export_at_end": False, **extra}),
               *args])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Digest of every file under root (train.log and the lock excepted: appending a log line is allowed)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("train.log", run_dir.LOCK_NAME)}


@pytest.fixture
def warnings_of_fastppo(caplog):
    """caplog for the "fastppo" logger (setup_logging turns its propagation off)."""
    logger = logging.getLogger("fastppo")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


class Linear2(torch.nn.Linear):
    """A stand-in model for checkpoint writes: save_checkpoint needs modules and optimizers, not language models."""

    def __init__(self):
        super().__init__(2, 2)


def tiny_training_state():
    policy, critic = Linear2(), Linear2()
    return dict(policy=policy, critic=critic, policy_opt=torch.optim.SGD(policy.parameters(), lr=0.1),
                critic_opt=torch.optim.SGD(critic.parameters(), lr=0.1))


def save(out: Path, iteration: int, keep_last: int = 2, trainer_state: dict | None = None, **models) -> Path:
    return save_checkpoint(out, iteration, **(models or tiny_training_state()), trainer_state=trainer_state or {},
                           config_yaml="run: {}\n", keep_last=keep_last)


# ----------------------------------------------------------------------------
# A fresh run and an earlier run's files
# ----------------------------------------------------------------------------

def test_a_fresh_run_refuses_a_folder_holding_a_run_and_changes_nothing(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    rc, err = cli_train(finished, out, capsys, **{"run.iterations": 2})
    line = one_line(err)
    assert rc == 2 and "run.output_dir" in line and "already holds a run" in line and "--resume" in line, line
    assert "checkpoints/iter_00000002" in line
    assert snapshot(out) == before


def test_resume_auto_without_a_checkpoint_never_replaces_an_earlier_runs_files(tiny_setups, tmp_path):
    """run.resume=auto starts fresh when there is no checkpoint, but not over the metrics or export of another run
    (a fresh start deletes metrics.jsonl and the export at the end replaces export/)."""
    out = tmp_path / "run"
    (out / "export" / "policy").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    before = snapshot(out)
    cfg = load_config(None, tiny_setups("llama").overrides(**{"run.output_dir": out, "run.resume": "auto"}))
    with pytest.raises(RunDirError, match="already holds a run \\(metrics.jsonl, export\\): run.resume=auto found no"):
        resume_point(cfg)
    assert snapshot(out) == before
    empty = load_config(None, tiny_setups("llama").overrides(**{"run.output_dir": tmp_path / "new", "run.resume": "auto"}))
    assert resume_point(empty) is None


def test_a_fresh_run_over_a_run_without_checkpoints_does_not_suggest_resume(tiny_setups, tmp_path):
    """A run killed before its first checkpoint left metrics: --resume could not continue it, so it is not offered."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    cfg = load_config(None, tiny_setups("llama").overrides(**{"run.output_dir": out}))
    with pytest.raises(RunDirError) as err:
        resume_point(cfg)
    assert "already holds a run (metrics.jsonl)" in str(err.value) and "--resume" not in str(err.value)
    assert "no checkpoint to continue" in str(err.value)


def test_a_save_removes_what_crashed_saves_and_re_saves_left(tmp_path):
    out = tmp_path / "run"
    save(out, 1)
    root = checkpoint.checkpoint_dir(out)
    # killed mid-save; killed after a re-save's replacement; killed between its two renames (the only copy)
    for junk in (".tmp-iter_00000002", ".old-iter_00000001-4242", ".old-iter_00000000-4242"):
        (root / junk / "model").mkdir(parents=True)
    save(out, 2, keep_last=3)
    assert sorted(p.name for p in root.iterdir()) == [".old-iter_00000000-4242", "iter_00000001", "iter_00000002"]


def test_keep_last_never_deletes_the_new_checkpoint_or_a_later_one(tmp_path):
    out = tmp_path / "run"
    save(out, 30, keep_last=1)
    save(out, 5, keep_last=1)          # an older iteration next to a later checkpoint
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["iter_00000005", "iter_00000030"]
    save(out, 6, keep_last=2)
    save(out, 7, keep_last=2)          # keeps 6 and 7 (the newest two up to 7); 5 goes; 30 stays
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["iter_00000006", "iter_00000007", "iter_00000030"]


# ----------------------------------------------------------------------------
# --resume: which checkpoint, and what may change
# ----------------------------------------------------------------------------

def test_resume_refuses_fewer_iterations_than_the_checkpoint(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    rc, err = cli_train(finished, out, capsys, "--resume", **{"run.iterations": 1})
    line = one_line(err)
    assert rc == 2 and "run.iterations=1" in line and "(2)" in line and "iter_00000002" in line, line


def test_resume_refuses_another_model_path(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    other = tmp_path / "other_policy"
    shutil.copytree(finished.setup.policy, other)
    rc, err = cli_train(finished, out, capsys, "--resume", **{"run.iterations": 3, "model.policy_path": other})
    line = one_line(err)
    assert rc == 2 and "model.policy_path" in line and str(other) in line, line


def test_resume_names_each_harmless_change(finished, tmp_path, warnings_of_fastppo):
    out = copy_run(finished, tmp_path)
    cfg = cfg_for(finished, out, **{"run.resume": "latest", "run.iterations": 4, "optim.policy_lr": 5e-4})
    assert resume_point(cfg) == out / "checkpoints" / "iter_00000002"
    text = warnings_of_fastppo.text
    assert "changed settings" in text
    for change in ("optim.policy_lr: 0.001 -> 0.0005", "run.iterations: 2 -> 4", f"run.output_dir: {finished.out} -> {out}"):
        assert change in text, (change, text)
    assert "run.resume" not in text


def test_resume_refuses_to_mix_histories(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    # An older checkpoint of this folder while a later one exists: saving would interleave the two.
    with pytest.raises(RunDirError, match="later checkpoints \\(iter_00000002\\)"):
        resume_point(cfg_for(finished, out, **{"run.resume": out / "checkpoints" / "iter_00000001"}))
    # A checkpoint from elsewhere continues into an empty folder, not into one holding another run.
    elsewhere = finished.out / "checkpoints" / "iter_00000001"
    with pytest.raises(RunDirError, match="already holds a run"):
        resume_point(cfg_for(finished, out, **{"run.resume": elsewhere}))
    assert resume_point(cfg_for(finished, tmp_path / "fork", **{"run.resume": elsewhere})) == elsewhere


def test_resume_refuses_a_checkpoint_of_other_models(tiny_setups, tmp_path):
    """Llama weights must not load into a Mistral (same shapes, same parameter names) behind an unchanged path."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    def models(arch):
        s = tiny_setups(arch)
        return SimpleNamespace(policy=AutoModelForCausalLM.from_pretrained(s.policy),
                               critic=AutoModelForSequenceClassification.from_pretrained(s.reward),
                               reward=AutoModelForSequenceClassification.from_pretrained(s.reward),
                               tokenizer=AutoTokenizer.from_pretrained(s.policy))

    llama, mistral = model_fingerprint(models("llama")), model_fingerprint(models("mistral"))
    assert fingerprint_changes(llama, llama) == [] and fingerprint_changes(None, llama) == []
    changes = fingerprint_changes(llama, mistral)
    assert any(c.startswith("policy (model.policy_path): llama") and "-> mistral" in c for c in changes), changes
    ckpt = save(tmp_path / "run", 1, trainer_state={"models": llama})
    with pytest.raises(RunDirError, match="models differ.*policy \\(model.policy_path\\): llama"):
        load_checkpoint(ckpt, **tiny_training_state(), models=mistral)


# ----------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model/__0_0.distcp"])
def test_resume_skips_a_truncated_newest_checkpoint(damaged, finished, tmp_path, capsys, warnings_of_fastppo):
    out = copy_run(finished, tmp_path)
    newest = out / "checkpoints" / "iter_00000002"
    _truncate(newest / damaged)
    assert resolve_resume("latest", out) == out / "checkpoints" / "iter_00000001"
    assert resolve_resume("auto", out) == out / "checkpoints" / "iter_00000001"
    text = warnings_of_fastppo.text
    assert f"skipping damaged checkpoint {newest}" in text and str(newest / damaged) in text, text
    assert "resuming from" in text and "iter_00000001" in text
    # Named explicitly: one clear error naming the file.
    capsys.readouterr()
    rc, err = cli_train(finished, out, capsys, "--resume", str(newest), **{"run.iterations": 3})
    line = one_line(err)
    assert rc == 2 and str(newest / damaged) in line and "truncated" in line, line


def _flip_bytes(path: Path) -> None:
    """Damage without truncation: a few bytes in the middle of the file changed, its length kept."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model/__0_0.distcp", "model/.metadata", "config.yaml"])
def test_resume_skips_a_newest_checkpoint_with_changed_bytes(damaged, finished, tmp_path, capsys, warnings_of_fastppo):
    """Bytes changed in place (a bad disk, a faulty copy) are found by the checksums written with the checkpoint:
    resume falls back to the previous checkpoint, with a warning naming the damaged file, and goes on."""
    out = copy_run(finished, tmp_path)
    newest = out / "checkpoints" / "iter_00000002"
    _flip_bytes(newest / damaged)
    assert resolve_resume("latest", out) == out / "checkpoints" / "iter_00000001"
    text = warnings_of_fastppo.text
    assert f"skipping damaged checkpoint {newest}" in text and str(newest / damaged) in text, text
    assert "CRC-32 mismatch" in text
    capsys.readouterr()
    rc, err = cli_train(finished, out, capsys, "--resume", str(newest), **{"run.iterations": 3})
    line = one_line(err)
    assert rc == 2 and str(newest / damaged) in line and "damaged" in line, line


def test_resume_drops_a_metrics_record_cut_short_by_a_crash(finished, tmp_path, warnings_of_fastppo):
    """A crash (kill -9, full disk) in the middle of a metrics.jsonl write leaves a partial last line: resuming
    drops it, with a warning naming the line, instead of failing with a JSONDecodeError traceback."""
    from fastppo.metrics import MetricWriter

    out = copy_run(finished, tmp_path)
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text().splitlines()
    metrics.write_text("\n".join(whole) + '\n{"iteration": 3, "loss')
    MetricWriter(out, tensorboard=False, resume_from=2).close()
    assert metrics.read_text().splitlines() == whole
    assert f"{metrics}:{len(whole) + 1}: dropping an incomplete metrics record" in warnings_of_fastppo.text


def test_resume_with_every_checkpoint_damaged_fails_naming_them(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    for ckpt in checkpoint.list_checkpoints(out):
        _truncate(ckpt / "trainer_state.pt")
    for mode in ("latest", "auto"):  # auto must not start afresh over damaged checkpoints
        with pytest.raises(RunDirError, match=f"run.resume={mode}: no intact checkpoint.*iter_00000002.*iter_00000001"):
            resolve_resume(mode, out)


# ----------------------------------------------------------------------------
# Failed saves
# ----------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _zip_writer_failure(*args, **kwargs):
    # What torch.save's zip writer raises when the disk fills up mid-write (no errno attached).
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("failure", ["enospc", "zip_writer"])
def test_a_full_disk_save_says_so_cleans_up_and_keeps_the_previous_checkpoint(failure, tmp_path, monkeypatch):
    out = tmp_path / "run"
    state = tiny_training_state()
    first = save(out, 1, **state)
    if failure == "enospc":
        monkeypatch.setattr(torch, "save", _enospc)
    else:
        monkeypatch.setattr(torch, "save", _zip_writer_failure)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    with pytest.raises(RunDirError) as info:
        save(out, 2, **state)
    message = str(info.value)
    assert str(out / "checkpoints" / "iter_00000002") in message and "no space left on device" in message, message
    assert "iter_00000001 is kept" in message
    monkeypatch.undo()
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / "checkpoints" / "iter_00000002").exists()
    assert checkpoint.list_checkpoints(out) == [first]
    verify_checkpoint(first)


def test_a_failed_export_removes_its_partial_copy(tmp_path):
    def save_part_then_fill_the_disk(path, **kwargs):
        Path(path).mkdir()
        (Path(path) / "model-00001.safetensors").write_text("partial")
        _enospc()

    model = Linear2()
    model.save_pretrained = save_part_then_fill_the_disk
    with pytest.raises(RunDirError, match=f"cannot export to {tmp_path / 'export'}: no space left on device"):
        checkpoint.export_hf(model, SimpleNamespace(save_pretrained=None), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# The lock, and exports over a model the run reads
# ----------------------------------------------------------------------------

def test_a_second_run_in_a_locked_folder_stops_and_the_lock_dies_with_its_holder(finished, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fastppo.run_dir import claim; c = claim(sys.argv[1]); "
         "c.__enter__(); print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = cli_train(finished, out, capsys, **{"run.iterations": 1})
        line = one_line(err)
        assert rc == 2 and "run.output_dir" in line and "in use by another run" in line, line
        assert run_dir.earlier_run(out) == []
    finally:
        holder.kill()                                      # SIGKILL: no clean-up code runs in the holder
        holder.wait(timeout=60)
    with claim(out):                                       # the kernel dropped the lock with the process
        pass


def test_an_export_never_replaces_a_model_the_run_reads(finished, tmp_path, capsys):
    # train: the policy read from the directory the PPO export would replace.
    out = tmp_path / "ppo"
    policy = out / "export" / "policy"
    shutil.copytree(finished.setup.policy, policy)
    before = snapshot(policy)
    rc, err = cli_train(finished, out, capsys, **{"run.iterations": 1, "run.export_at_end": True,
                                                 "model.policy_path": policy})
    line = one_line(err)
    assert rc == 2 and f"model.policy_path={policy}" in line and "export" in line, line
    # train-rm into the SFT folder, starting from the SFT export.
    sft_dir = tmp_path / "sft"
    shutil.copytree(finished.setup.policy, sft_dir / "export")
    (sft_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before_sft = snapshot(sft_dir)
    rc = main(["train-rm", f"model.path={sft_dir / 'export'}", f"data.train_path={finished.setup.sft}",
               f"run.output_dir={sft_dir}", "run.device=cpu", "run.progress_bar=false"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and f"model.path={sft_dir / 'export'}" in line and "export" in line, line
    assert snapshot(sft_dir) == before_sft and snapshot(policy) == before


def test_a_stage_refuses_a_folder_holding_a_run(finished, tmp_path, capsys):
    out = tmp_path / "sft"
    (out / "export").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    rc = main(["sft", f"model.path={finished.setup.policy}", f"data.train_path={finished.setup.sft}",
               f"run.output_dir={out}", "run.device=cpu", "run.progress_bar=false"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and f"run.output_dir={out} already holds a run (metrics.jsonl, export)" in line, line
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


# ----------------------------------------------------------------------------
# An unusable output folder
# ----------------------------------------------------------------------------

def test_a_file_in_place_of_the_output_folder_is_one_clear_error(finished, tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "nested"):
        rc, err = cli_train(finished, out, capsys, **{"run.iterations": 1})
        line = one_line(err)
        assert rc == 2 and f"run.output_dir={out}" in line, line
    rc = main(["sft", f"model.path={finished.setup.policy}", f"data.train_path={finished.setup.sft}",
               f"run.output_dir={blocker}", "run.device=cpu"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and f"run.output_dir={blocker} is a file" in line, line
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_folder_is_one_clear_error(finished, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        rc, err = cli_train(finished, out, capsys, **{"run.iterations": 1})
    finally:
        out.chmod(0o755)
    line = one_line(err)
    assert rc == 2 and f"run.output_dir={out}: cannot create or write there" in line, line


def test_an_unwritable_output_folder_is_one_clear_error(finished, tmp_path, capsys, monkeypatch):
    """The read-only case as any user (root included) sees it: the write probe fails with EACCES."""
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(run_dir, "tempfile", SimpleNamespace(TemporaryFile=denied))
    out = tmp_path / "run"
    rc, err = cli_train(finished, out, capsys, **{"run.iterations": 1})
    line = one_line(err)
    assert rc == 2 and f"run.output_dir={out}: cannot create or write there (Permission denied)" in line, line
