"""tools/gpu_check.py (`make gpu-check`) in its CPU mode: every check runs at tiny sizes under the Triton
interpreter and reports; a check over its time box is killed and fails while the others still run; and
the two things a bare GPU machine relies on: the checkout importable as fastppo without installing it,
and pure-Python wheels unpacked only where the machine lacks them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TOOLS = ROOT / "tools"


def load(name: str, folder: Path = TOOLS):
    """A tools/ (or bench/) script as a module (neither is a package)."""
    spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")


def summary_rows(path: Path) -> dict[str, list[str]]:
    """check -> its cells in the summary table of gpu_check.md."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in gpu_check.CHECKS:
            rows[cells[0]] = cells
    return rows


def committed_results() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (BENCH / "results").glob("*.*")}


def cpu_env() -> dict[str, str]:
    # CPU mode even on a machine with a GPU (there `make gpu-check` is the real check).
    return dict(os.environ, CUDA_VISIBLE_DEVICES="")


@pytest.mark.timeout(600)
def test_cpu_mode_runs_every_check_and_writes_the_summary(tmp_path):
    before = committed_results()
    proc = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--out", str(tmp_path)], cwd=ROOT,
                          env=cpu_env(), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "no CUDA device" in proc.stdout
    # One worker ran every check: nothing re-executed it (a bench re-executes itself only when run as a script).
    events = (tmp_path / "gpu_check.events.jsonl").read_text().splitlines()
    assert sum(json.loads(e)["event"] == "hello" for e in events if e.strip()) == 1

    rows = summary_rows(tmp_path / "gpu_check.md")
    assert sorted(rows) == sorted(gpu_check.CHECKS)
    for check, cells in rows.items():
        status = cells[1]
        assert status == ("SKIP" if check == "sync_counts" else "PASS"), (check, cells)
        if status == "PASS":
            assert cells[3], f"{check} reports no numbers"
    with open(tmp_path / "gpu_check.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["check"] for r in csv_rows} == set(gpu_check.CHECKS)
    assert all(r["commit"] and r["date"] and r["device"].startswith("cpu") and r["mode"] == "cpu" for r in csv_rows)
    by_metric = {(r["check"], r["metric"]): r["value"] for r in csv_rows}
    assert int(by_metric[("kernel_tests", "passed")]) > 0 and int(by_metric[("kernel_tests", "failed")]) == 0
    assert int(by_metric[("train_fsdp", "iterations")]) == int(by_metric[("train_no_fsdp", "iterations")]) == 3
    assert float(by_metric[("gae_long", "worst_error_over_budget")]) <= 1.0
    # The benches wrote their CSVs next to the summary, and the committed GPU results are untouched.
    for name in ("logprobs", "linear_logprobs", "linear_ppo_loss", "rl_math"):
        with open(tmp_path / f"{name}.csv", newline="") as f:
            assert any(r["provider"] == "fastppo" for r in csv.DictReader(f)), name
    assert committed_results() == before


@pytest.mark.timeout(300)
def test_a_check_over_its_box_fails_and_the_next_one_still_runs(tmp_path, monkeypatch):
    """A 0.2 s box: the training (it builds two models and runs 3 iterations: 0.7 s on an idle 2-core machine)
    is killed (FAIL, exit status 1) and a fresh worker runs the probe (a single GEMM, well inside the box)."""
    monkeypatch.setattr(gpu_check, "CPU_BOX_S", 0.2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(BENCH))                  # as when run as a script: common.py for the CSV
    rc = gpu_check.main(["--out", str(tmp_path), "--checks", "train_fsdp,fp32_gemm_probe"])
    assert rc == 1
    rows = summary_rows(tmp_path / "gpu_check.md")
    assert rows["train_fsdp"][1] == "FAIL" and "timed out" in rows["train_fsdp"][4]
    assert rows["fp32_gemm_probe"][1] == "PASS"


def test_an_uninstalled_checkout_is_imported_as_fastppo_beside_transformers(tmp_path):
    """In a fresh interpreter where fastppo is not installed (-S: no site-packages, so the editable install is
    not seen; the venv's site-packages then goes last, as a bare image's would be), prepare_imports makes
    fastppo and fastppo.kernels this checkout's, and transformers (which imports Hugging Face's `kernels` when
    installed) imports beside it."""
    import site as site_module
    code = (
        "import sys, importlib.util; sys.path.append(sys.argv[3]);"
        "assert importlib.util.find_spec('fastppo') is None, 'fastppo visible before prepare_imports';"
        "sys.path.insert(0, sys.argv[1]); import gpu_check;"
        "gpu_check.prepare_imports(__import__('pathlib').Path(sys.argv[2]));"
        "import fastppo.kernels, transformers.modeling_utils;"
        "print(fastppo.kernels.__file__)"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code, str(TOOLS), str(tmp_path), site_module.getsitepackages()[0]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.split()[-1]) == ROOT / "fastppo" / "kernels" / "__init__.py"


def test_wheels_are_unpacked_only_where_missing(tmp_path):
    """A wheel of a missing distribution is unpacked (without its .data/ scripts); one of an installed
    distribution (pytest here) is left alone, so the machine keeps its own version."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fastppo_probe_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fastppo_probe_pkg/__init__.py", "VALUE = 7\n")
        z.writestr("fastppo_probe_pkg-1.0.dist-info/METADATA", "Name: fastppo-probe-pkg\nVersion: 1.0\n")
        z.writestr("fastppo_probe_pkg-1.0.data/scripts/probe", "#!/bin/sh\n")
    with zipfile.ZipFile(wheels / "pytest-0.0.1-py3-none-any.whl", "w") as z:
        z.writestr("pytest/__init__.py", "raise ImportError('the shipped copy must not win')\n")
    assert gpu_check.unpack_wheels(wheels, site) == ["fastppo_probe_pkg-1.0-py3-none-any.whl"]
    assert (site / "fastppo_probe_pkg" / "__init__.py").read_text() == "VALUE = 7\n"
    assert (site / "fastppo_probe_pkg-1.0.dist-info" / "METADATA").exists()
    assert not (site / "fastppo_probe_pkg-1.0.data").exists() and not (site / "pytest").exists()


def test_shapes_option_errors_name_the_option(capsys):
    import argparse

    common = load("common", BENCH)
    parser = argparse.ArgumentParser()
    common.add_shapes_argument(parser, "NxV")
    assert parser.parse_args(["--shapes", "4096x32000, 16x8"]).shapes == [(4096, 32000), (16, 8)]
    assert parser.parse_args([]).shapes is None
    for bad in ("4096", "4096x0", "4096xV", "1x2x3"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--shapes", f"64x64,{bad}"])
        assert f"argument --shapes: '{bad}' is not NxV" in capsys.readouterr().err


def test_fastppo_bench_does_not_list_the_gpu_check(capsys):
    """`fastppo bench` (all benchmarks by default) leaves out the check and its worker."""
    from fastppo.cli import main

    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "logprobs" in listed and "gpu_check" not in listed and "gpu_checks" not in listed


def test_kernel_test_counts_are_pytests_own(tmp_path, monkeypatch):
    """The counts come from pytest's summary line, never from its per-test lines: a test whose teardown fails is
    one passed and one error there (its -v lines say PASSED and ERROR), and a run stopped by SIGINT (the check's
    time box) still reports the tests it ran."""
    import signal

    monkeypatch.syspath_prepend(str(TOOLS))
    checks = importlib.import_module("gpu_checks")
    (tmp_path / "test_probe.py").write_text(
        "import pytest, time\n"
        "@pytest.fixture\ndef breaks_on_teardown():\n    yield\n    raise RuntimeError('teardown')\n"
        "def test_a(breaks_on_teardown): pass\n"
        "def test_b(): assert 0\n"
        "def test_c(): pass\n"
        "@pytest.mark.skip\ndef test_d(): pass\n"
        "def test_slow(): time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pytest", "--verbosity=1", "-p", "no:cacheprovider", "-ra",
                             "test_probe.py"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=checks.interruptible)      # as the check starts it
    seen = b""
    while b"test_probe.py::test_slow" not in seen:                 # -v names a test before it runs
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, seen.decode()
        seen += chunk
    proc.send_signal(signal.SIGINT)
    text = (seen + proc.communicate(timeout=60)[0]).decode()
    assert "test_probe.py::test_a PASSED" in text and "test_probe.py::test_a ERROR" in text, text
    assert checks.pytest_counts(text) == {"passed": 2, "failed": 1, "skipped": 1, "errors": 1, "xfailed": 0,
                                          "xpassed": 0}, text
    assert checks.pytest_counts("collected 3 items\ntest_x.py ..") is None       # killed: no summary, no counts
