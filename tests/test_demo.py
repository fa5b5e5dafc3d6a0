"""A shortened `fastppo demo` (`--quick`: fewer examples and iterations, the same code path as the default):
PPO-max raises the held-out mean reward, and every promised output exists and reloads."""

import json

from fastppo.cli import main
from fastppo.demos.common import read_metrics


def test_quick_demo_improves_reward_and_writes_everything(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seed", "0", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "SFT (before PPO)" in printed and "ppo_max (after)" in printed and str(out.resolve()) in printed
    for stage in ("data", "sft", "reward", "ppo_max", "evaluate"):
        assert f"[demo] {stage}" in printed
    assert "health monitor, ppo_max: no warning" in printed                # `fastppo.health`'s verdict

    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["held_out"]["sft"], summary["held_out"]["ppo_max"]
    assert after["reward"] > before["reward"] + 0.5, (before, after)  # PPO raises the held-out mean reward
    assert summary["reward_model"]["eval/accuracy"] > 0.7
    assert summary["health"] == {"ppo_max": []}

    # plots, metrics JSONL (one record per PPO iteration), TensorBoard logs, samples
    for name in ("overview", "reward", "kl", "length", "perplexity", "entropy"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert len(read_metrics(out / "ppo_max")) == 30
    for stage in ("sft", "rm", "ppo_max"):
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
        assert any((out / stage / "tensorboard").iterdir())
    assert (out / "samples.jsonl").read_text().count('"policy": "ppo_max"') > 0

    # exported models reload through plain transformers
    AutoModelForCausalLM.from_pretrained(out / "sft" / "export")
    AutoModelForCausalLM.from_pretrained(out / "ppo_max" / "export" / "policy")
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "export")
    assert rm.config.num_labels == 1


def test_a_rerun_replaces_an_earlier_demo_but_never_another_folder(tmp_path):
    """`make demo` twice works (every stage refuses a used run folder, so the demo clears its own), while a folder
    that holds no earlier demo is refused and left as it was."""
    import pytest

    from fastppo.demos.common import DEMO_MARKER, replace_earlier_demo
    from fastppo.run_dir import RunDirError

    earlier = tmp_path / "demo"
    (earlier / "sft").mkdir(parents=True)
    (earlier / "sft" / "metrics.jsonl").write_text("{}\n")
    (earlier / DEMO_MARKER).write_text("{}")
    said = []
    replace_earlier_demo(earlier, said.append)
    assert not earlier.exists() and "replacing the earlier demo" in said[0]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="--output-dir .*holds no earlier demo"):
        replace_earlier_demo(other, said.append)
    assert (other / "notes.txt").read_text() == "keep me"
    replace_earlier_demo(tmp_path / "new", said.append)        # a new or empty folder: nothing to do


def test_a_demo_never_replaces_a_running_demo(tmp_path):
    """A second demo in the folder of a running one stops with one line and deletes nothing."""
    import pytest

    from fastppo.demos.common import DEMO_MARKER, replace_earlier_demo
    from fastppo.run_dir import RunDirError, claim

    running = tmp_path / "demo"
    (running / "sft").mkdir(parents=True)
    (running / DEMO_MARKER).write_text("{}")
    for locked in (running, running / "sft"):          # the demo's own lock, or a stage's
        with claim(locked):
            with pytest.raises(RunDirError, match="--output-dir .* is in use by a running demo or stage"):
                replace_earlier_demo(running, print)
        assert (running / DEMO_MARKER).is_file()
    replace_earlier_demo(running, print)               # once nothing runs there, it is replaced
    assert not running.exists()


def _demo_until(out, *args, stop_when=None):
    """`fastppo demo --quick` in a process of its own, sent SIGTERM once `stop_when()` holds (polled);
    (exit code, stdout, stderr)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = Path(sys.executable).with_name("fastppo")
    proc = subprocess.Popen([str(exe), "demo", "--quick", "--no-progress", "--output-dir", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    while stop_when is not None and proc.poll() is None:
        if stop_when():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    printed, err = proc.communicate(timeout=600)
    return proc.returncode, printed, err


def test_a_stopped_demo_says_how_to_continue_and_resume_finishes_it(tmp_path):
    """SIGTERM in a stage without a handler of its own (sft) and in a `train` (ppo_max, which saves a checkpoint and
    returns early): each stop says so in one line with the command that continues the demo, never with a failure
    of a later stage; `fastppo demo --resume` keeps the finished stages, resumes ppo_max from its checkpoint and
    completes the demo (its evaluation and report)."""
    out = tmp_path / "demo"
    rc, printed, err = _demo_until(out, stop_when=lambda: (out / "sft" / "metrics.jsonl").exists())
    assert rc == 130, (printed, err)
    continue_it = f"continue it with `fastppo demo --resume --output-dir {out}`"
    assert f"stopped during its sft stage (SIGTERM); {continue_it}" in err, err
    assert "Repo id" not in err and "Traceback" not in err, err

    rc, printed, err = _demo_until(out, "--resume", stop_when=lambda: (out / "ppo_max" / "metrics.jsonl").exists())
    assert rc == 130 and "[demo] data       kept from the earlier run" in printed, (printed, err)
    assert "[demo] sft        done" in printed and "[demo] reward     done" in printed, printed
    assert f"stopped during its ppo_max stage (a stop signal; its checkpoint is saved); {continue_it}" in err, err
    assert "Traceback" not in err, err
    stopped_at = len(read_metrics(out / "ppo_max"))

    rc, printed, err = _demo_until(out, "--resume")
    assert rc == 0, (printed, err)
    for stage in ("data", "sft", "reward"):
        assert f"[demo] {stage:<10} kept from the earlier run" in printed
    assert "[demo] ppo_max    done" in printed and "ppo_max (after)" in printed
    assert 0 < stopped_at < 30 and len(read_metrics(out / "ppo_max")) == 30   # 30 iterations across the stop
    assert (out / "summary.json").is_file() and (out / "plots" / "overview.png").is_file()


def test_out_of_range_arguments_are_refused_before_anything_runs(tmp_path, capsys):
    """--iterations 0 used to run the default 150 iterations, --iterations -1 failed after SFT and the reward model
    had trained, --seed -1 ended in NumPy's traceback."""
    import pytest

    from fastppo.cli import parse_args

    for argv, said in ((["--iterations", "0"], "argument --iterations: must be >= 1, got 0"),
                       (["--iterations", "-1"], "argument --iterations: must be >= 1, got -1"),
                       (["--seed", "-1"], r"argument --seed: must lie in [0, 2^32), got -1"),
                       (["--seed", str(2 ** 32)], "argument --seed: must lie in [0, 2^32), got 4294967296")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["demo", "-o", str(tmp_path / "demo"), *argv])
        assert exit_.value.code == 2
        assert f"fastppo demo: error: {said}" in capsys.readouterr().err
    assert parse_args(["demo", "--iterations", "1", "--seed", str(2 ** 32 - 1)]).iterations == 1
    assert not (tmp_path / "demo").exists()


def test_a_file_as_output_dir_is_named_a_file(tmp_path, capsys):
    out = tmp_path / "outfile"
    out.write_text("")
    for task in ("preferences", "arithmetic"):
        assert main(["demo", "-o", str(out), "--task", task, "--iterations", "1"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if ": error" in line]
        assert err == [f"fastppo demo: error: --output-dir {out} is a file, not a folder: choose another --output-dir"]
    assert out.read_text() == ""
