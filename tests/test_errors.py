"""What a user sees when things go wrong: one line `fastppo <cmd>: error: <message>` on stderr and in the
run's train.log, a non-zero exit code; config values that cannot work fail at start-up naming the field;
a second Ctrl-C stops at once and keeps the last checkpoint; no progress-bar frames in redirected logs."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import signal
import sys

import pytest
import torch

import fastppo.engine as engine_module
import fastppo.update as update
from fastppo import cli
from fastppo import logs as sft_module
from fastppo.checkpoint import list_checkpoints, read_weights
from fastppo.cli import main
from fastppo.config import ConfigError, RMConfig, SFTConfig, load_config, validate, validate_device
from fastppo.logs import GracefulStop
from fastppo_testing.trainer import nan_value_loss, read_metrics, tiny_setups  # noqa: F401  (fixture)

train_module = sys.modules["fastppo.train"]
PATHS = ["model.policy_path=p", "model.reward_path=r", "data.prompt_path=d"]
STAGE_PATHS = ["model.path=m", "data.train_path=t"]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error" in line]


def _one_error_line(capsys, command: str) -> str:
    """The command's stderr holds exactly one error line and no traceback; returns it."""
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"fastppo {command}: error: "), err
    assert "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------

def _float_fields(cfg, prefix=""):
    """(owner dataclass, field name, dotted name) of every float-typed field (float, Optional[float], list[float])."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{f.name}.")
        elif "float" in str(f.type):
            yield cfg, f.name, f"{prefix}{f.name}"


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("schema", ["ppo", "sft", "rm"])
def test_every_float_field_must_be_finite(schema, bad):
    if schema == "ppo":
        base = load_config(None, PATHS)
    else:
        base = load_config(schema=SFTConfig if schema == "sft" else RMConfig, overrides=STAGE_PATHS)
    fields = list(_float_fields(base))
    assert len(fields) >= (20 if schema == "ppo" else 8)
    for _, name, dotted in fields:
        cfg = copy.deepcopy(base)
        owner = next(o for o, n, d in _float_fields(cfg) if d == dotted)
        value = getattr(owner, name)
        setattr(owner, name, [value[0], bad] if isinstance(value, list) else bad)
        with pytest.raises(ConfigError, match=f"field '{dotted}(\\[1\\])?': must be a finite number"):
            validate(cfg)


def test_infinite_values_from_the_command_line_fail_naming_the_field(capsys):
    assert main(["train", *PATHS, "reward.kl_coef=inf"]) == 2
    assert "field 'reward.kl_coef': must be a finite number, got inf" in _one_error_line(capsys, "train")
    assert main(["sft", *STAGE_PATHS, "optim.betas=[0.9,.nan]"]) == 2
    assert "field 'optim.betas[1]': must be a finite number" in _one_error_line(capsys, "sft")
    assert main(["train-rm", *STAGE_PATHS, "loss.lm_coef=-inf"]) == 2
    assert "field 'loss.lm_coef'" in _one_error_line(capsys, "train-rm")


@pytest.mark.parametrize("schema", [SFTConfig, RMConfig])
def test_stage_configs_check_the_attention_implementation(schema):
    with pytest.raises(ConfigError, match="field 'model.attn_implementation': must be one of sdpa, eager"):
        load_config(schema=schema, overrides=[*STAGE_PATHS, "model.attn_implementation=flash"])
    cfg = load_config(schema=schema, overrides=[*STAGE_PATHS, "model.attn_implementation=eager"])
    assert cfg.model.attn_implementation == "eager"


def test_run_device_is_checked_against_the_machine():
    validate_device("cpu", 0)
    validate_device("auto", 0)
    validate_device("cuda:1", 2)
    validate_device("cuda", 2, local_rank=1)
    with pytest.raises(ConfigError, match="field 'run.device': is 'cuda', but CUDA is not available"):
        validate_device("cuda", 0)
    with pytest.raises(ConfigError, match="field 'run.device': is 'cuda:2', but this machine has 2 CUDA device\\(s\\): "
                                          "cuda:0 to cuda:1"):
        validate_device("cuda:2", 2)
    with pytest.raises(ConfigError, match="is 'cuda' \\(LOCAL_RANK 2\\), but this machine has 2"):
        validate_device("cuda", 2, local_rank=2)
    for name in ("cuda:x", "cudafoo", "gpu"):
        with pytest.raises(ConfigError, match="field 'run.device': must be auto, cpu, cuda or cuda:N"):
            load_config(None, [*PATHS, f"run.device={name}"])


@pytest.mark.parametrize("command", ["train", "sft", "train-rm"])
def test_a_cuda_device_this_machine_lacks_fails_at_start_up(command, tmp_path, capsys):
    """cuda:<device count> exists on no machine: without CUDA, CUDA is missing; with it, the index is out of range."""
    paths = PATHS if command == "train" else STAGE_PATHS
    rc = main([command, *paths, f"run.device=cuda:{torch.cuda.device_count()}", f"run.output_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "field 'run.device': is 'cuda:" in _one_error_line(capsys, command)


# ----------------------------------------------------------------------------
# One line on stderr and in train.log, exit codes
# ----------------------------------------------------------------------------

def test_a_data_error_after_start_up_also_lands_in_train_log(tmp_path, capsys, tiny_setups):
    out = tmp_path / "run"
    rc = main(["train", *tiny_setups("llama").overrides(**{"run.output_dir": out,
                                                           "data.prompt_path": tmp_path / "missing.jsonl"})])
    assert rc in (1, 2)
    line = _one_error_line(capsys, "train")
    assert "missing.jsonl" in line
    assert line in (out / "train.log").read_text()


def test_a_non_finite_abort_is_one_line_naming_what_and_the_fields(tmp_path, capsys, monkeypatch, tiny_setups):
    """A NaN value loss makes every step's loss non-finite: the run stops after run.max_nonfinite_in_a_row steps.
    (NaN reward-model scores or score-phase forwards no longer do: those rows are dropped, see test_inputs.py
    and test_packing.py.)"""
    monkeypatch.setattr(update, "ppo_loss", nan_value_loss(update.ppo_loss))
    out = tmp_path / "run"
    rc = main(["train", *tiny_setups("llama").overrides(**{"run.output_dir": out, "run.max_nonfinite_in_a_row": 2})])
    assert rc == 1
    line = _one_error_line(capsys, "train")
    assert "non-finite loss" in line and "in 2 optimizer steps in a row" in line, line
    for name in ("run.max_nonfinite_in_a_row=2", "optim.policy_lr", "optim.critic_lr", "optim.max_grad_norm"):
        assert name in line, (name, line)
    assert line in (out / "train.log").read_text()


def test_ctrl_c_before_the_loop_exits_130_with_one_line(tmp_path, capsys, monkeypatch, tiny_setups):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "load_prompts", interrupted)
    out = tmp_path / "run"
    assert main(["train", *tiny_setups("llama").overrides(**{"run.output_dir": out})]) == 130
    line = _one_error_line(capsys, "train")
    assert line == "fastppo train: error: interrupted (Ctrl-C)"
    assert line in (out / "train.log").read_text()


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, tiny_setups):
    """Two SIGINTs during the rollout of iteration 2: no save of iteration 2, exit 130, checkpoint 1 untouched."""
    real_generate, calls = engine_module.generate, []

    def generate_then_ctrl_c_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)      # the first: save after this iteration ...
            os.kill(os.getpid(), signal.SIGINT)      # ... the second: stop now
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine_module, "generate", generate_then_ctrl_c_twice)
    handler_before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    rc = main(["train", *tiny_setups("llama").overrides(**{"run.output_dir": out, "run.save_every": 1,
                                                           "run.log_level": "INFO"})])
    assert rc == 130
    line = _one_error_line(capsys, "train")
    assert "second Ctrl-C" in line and "last checkpoint is intact" in line, line
    assert [p.name for p in list_checkpoints(out)] == ["iter_00000001"]
    assert read_weights(list_checkpoints(out)[0], "policy")                    # complete and readable
    assert [r["iteration"] for r in read_metrics(out)] == [1]
    assert line in (out / "train.log").read_text()
    assert signal.getsignal(signal.SIGINT) is handler_before                  # handlers restored


def test_graceful_stop_first_signal_sets_a_flag_second_sigint_raises():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)


def test_an_unexpected_error_keeps_its_traceback_and_reaches_train_log(tmp_path, monkeypatch, tiny_setups):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine_module, "generate", broken)
    out = tmp_path / "run"
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["train", *tiny_setups("llama").overrides(**{"run.output_dir": out})])
    text = (out / "train.log").read_text()
    assert "fastppo train: unexpected ZeroDivisionError: a bug" in text and "Traceback" in text, text


def test_an_error_class_added_to_the_list_gets_one_line(tmp_path, capsys, monkeypatch, tiny_setups):
    class RunDirTaken(RuntimeError):
        pass

    def taken(*args, **kwargs):
        raise RunDirTaken("run dir in use")

    monkeypatch.setattr(engine_module, "generate", taken)
    monkeypatch.setattr(cli, "KNOWN_ERRORS", (*cli.KNOWN_ERRORS, RunDirTaken))
    assert main(["train", *tiny_setups("llama").overrides(**{"run.output_dir": tmp_path / "run"})]) == 1
    assert _one_error_line(capsys, "train") == "fastppo train: error: run dir in use"


def test_an_earlier_runs_log_is_not_written_by_a_later_command(tmp_path, capsys, tiny_setups):
    first = tmp_path / "first"
    assert main(["train", *tiny_setups("llama").overrides(**{"run.output_dir": first, "run.iterations": 1,
                                                             "run.export_at_end": False})]) == 0
    assert main(["train", *PATHS, "reward.kl_coef=nan"]) == 2                     # fails before a run dir exists
    assert "fastppo train: error" not in (first / "train.log").read_text()


# ----------------------------------------------------------------------------
# Progress: a bar on a terminal, log lines elsewhere
# ----------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_off_elsewhere(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = sft_module.progress(3, "sft", True)
    assert not bar.disable                                                   # (closing disables it)
    bar.update(3)
    bar.close()
    assert "\r" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())                         # not a terminal
    bar = sft_module.progress(3, "sft", True)
    assert bar.disable is False and bar.fp is not sys.stderr and bar.mininterval == sft_module.PROGRESS_LOG_INTERVAL_S
    bar.close()
    assert sft_module.progress(3, "sft", False).disable


@pytest.mark.parametrize("interval, lines", [(0.0, ["0/3", "1/3", "2/3", "3/3", "3/3"]),
                                              (3600.0, ["0/3", "3/3"])])
def test_train_logs_progress_lines_instead_of_bar_frames(interval, lines, tmp_path, capsys, monkeypatch, tiny_setups):
    """Off a terminal, one line per interval (here: per iteration when iterations are slower than it)."""
    monkeypatch.setattr(sft_module, "PROGRESS_LOG_INTERVAL_S", interval)
    out = tmp_path / "run"
    overrides = tiny_setups("llama").overrides(**{"run.output_dir": out, "run.progress_bar": True,
                                                  "run.log_level": "INFO"})
    capsys.readouterr()                                                      # (building the tiny models)
    assert main(["train", *overrides]) == 0
    err = capsys.readouterr().err
    log_text = (out / "train.log").read_text()
    progress = [line.split(" INFO ", 1)[1] for line in log_text.splitlines() if " INFO ppo: " in line]
    assert [p.split()[1] for p in progress] == lines, log_text
    assert "reward=" in progress[-1] and "kl=" in progress[-1] and "tok_s=" in progress[-1]
    assert "\r" not in err and "\r" not in log_text and "█" not in err


def test_overrides_after_resume_are_overrides(monkeypatch, capsys):
    """`fastppo train --resume run.iterations=300 run.save_every=10`: --resume takes the first override as its
    value and argparse left the second unrecognised; both are overrides, and --resume means the newest checkpoint."""
    seen = []

    def load_config(path, overrides, preset=None):
        seen.extend(overrides)
        raise ConfigError("stop here")

    monkeypatch.setattr(cli, "load_config", load_config)
    assert main(["train", "a.b=1", "--resume", "run.iterations=300", "run.save_every=10"]) == 2
    assert sorted(seen) == ["a.b=1", "run.iterations=300", "run.resume=latest", "run.save_every=10"], seen
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--resume", "run.iterations=300", "--no-such-flag"])


# ----------------------------------------------------------------------------
# The command line: what was meant, said in one line
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_second_config_file_is_refused_not_silently_dropped(command, tmp_path, capsys):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", str(first), "--config", str(second)])
    assert exit_.value.code == 2
    line = _one_error_line(capsys, command)
    assert f"argument --config/-c: given twice ({first}, {second}): give one file" in line, line


def test_a_config_file_without_config_and_a_preset_for_sft_say_so(tmp_path, capsys):
    assert main(["train", "base.yaml", *PATHS]) == 2
    assert "got 'base.yaml' (a YAML file? pass it as --config base.yaml)" in _one_error_line(capsys, "train")
    assert main(["train", "--config", str(tmp_path), *PATHS]) == 2
    assert f"config file {tmp_path} is a directory" in _one_error_line(capsys, "train")
    assert main(["sft", "--preset", "grpo", *STAGE_PATHS]) == 2
    assert "presets are for `fastppo train` only" in _one_error_line(capsys, "sft")


def test_a_checkpoint_given_twice_is_refused(capsys):
    assert main(["train", *PATHS, "--resume", "latest", "run.resume=/tmp/x"]) == 2
    line = _one_error_line(capsys, "train")
    assert "the checkpoint is given twice, by --resume (latest) and run.resume=/tmp/x: give one" in line, line


def test_the_triton_backend_without_cuda_is_refused_at_start_up(tmp_path, capsys, monkeypatch):
    """Without CUDA (and without Triton's CPU interpreter) run.backend=triton would fail in the first fused op, after
    the models loaded, blaming a `backend=` argument; now it stops first, naming the field."""
    from fastppo.config import validate_backend

    validate_backend("triton", "cuda", interpreter=False)
    validate_backend("triton", "cpu", interpreter=True)
    validate_backend(None, "cpu", interpreter=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for command, paths in (("train", PATHS), ("sft", STAGE_PATHS)):
        out = tmp_path / command
        assert main([command, *paths, "run.backend=triton", "run.device=cpu", f"run.output_dir={out}"]) == 2
        line = _one_error_line(capsys, command)
        assert "field 'run.backend': is 'triton', but this run is on cpu and the Triton kernels need CUDA" in line
    assert not (tmp_path / "train").exists()                      # before the run folder


def test_a_resume_value_that_is_not_a_checkpoint_says_what_it_is(tmp_path):
    from fastppo.checkpoint import resolve_resume
    from fastppo.run_dir import RunDirError

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "iter_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "file.yaml").write_text("")
    for resume, said in [
        ("latestt", r"run\.resume=latestt: no such folder; did you mean 'latest'\?"),
        (str(tmp_path / "nope"), "no such folder \\(run\\.resume takes latest, auto or a checkpoint folder"),
        (str(tmp_path / "file.yaml"), "is a file; give a checkpoint folder"),
        (str(run), f"is a run folder, not a checkpoint: continue it with run\\.output_dir={run} run\\.resume=latest "
                   f"\\(--resume\\), or give one of its checkpoints, e\\.g\\. {ckpt}"),
        (str(run / "checkpoints"), f"holds checkpoints: give one of them, e\\.g\\. the newest, {ckpt}"),
        (str(tmp_path), "not a fastppo checkpoint \\(no trainer_state\\.pt\\)"),
    ]:
        with pytest.raises(RunDirError, match=said):
            resolve_resume(resume, tmp_path / "elsewhere")
