"""bench/common.py, the benchmark harness, and fastppo/memory.py, the one reader of process memory:
the statistics, the CUDA timing path's use of triton.testing.do_bench, the provider loop, the ratios and
the table; and every op bench still writes the CSV columns it wrote before the harness.
"""

from __future__ import annotations

import csv
import importlib
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # bench/ is not a package: its scripts import each other by name

import common  # noqa: E402

from fastppo import memory  # noqa: E402


def test_percentiles_interpolate_linearly_between_sorted_samples():
    # 5 samples, unsorted: the 20th percentile sits 0.8 of the way from the 1st to the 2nd sorted sample.
    assert common.percentiles([5.0, 1.0, 4.0, 2.0, 3.0]) == pytest.approx((3.0, 1.8, 4.2))
    assert common.percentiles([7.0]) == (7.0, 7.0, 7.0)


def test_time_ms_on_cpu_calls_warmup_then_rep_times():
    calls = []
    ms, p20, p80 = common.time_ms(lambda: calls.append(1), torch.device("cpu"), warmup=2, rep=5)
    assert len(calls) == 7
    assert 0 <= p20 <= ms <= p80


def test_time_ms_on_cuda_hands_do_bench_budgets_of_rep_calls(monkeypatch):
    """do_bench takes milliseconds, not counts: the budget is rep times one call's time, timed after one
    untimed call; a warm-up beyond the nine untimed calls (two here, seven in do_bench) adds to its budget."""
    seen = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.append((warmup, rep, quantiles))
        return [2.0, 1.0, 3.0]

    monkeypatch.setattr(common, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    clock = iter([0.0, 0.004, 1.0, 1.004])  # each timed call takes 4 ms
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    calls = []
    assert common.time_ms(lambda: calls.append(1), torch.device("cuda"), warmup=3, rep=10) == (2.0, 1.0, 3.0)
    assert len(calls) == 2
    common.time_ms(lambda: calls.append(1), torch.device("cuda"), warmup=12, rep=5)
    (w1, r1, q1), (w2, r2, _) = seen
    assert (w1, r1, w2, r2) == pytest.approx((0.0, 40.0, 12.0, 20.0))
    assert q1 == [0.5, 0.2, 0.8]


def test_run_providers_reports_a_failing_provider_and_drops_it(capsys):
    def case(name, fn, shape):
        return [{"provider": name, "N": shape[0], "ms": fn(shape[0])}]

    def broken(n):
        raise ValueError("no kernel for this\nsecond line")

    providers = {"eager": lambda n: float(n), "broken": broken}
    notes = {}
    rows = common.run_providers([(2, 3), (4, 5)], providers, case, torch.device("cpu"), dims="NxV", notes=notes)
    assert [(r["provider"], r["N"]) for r in rows] == [("eager", 2), ("eager", 4)]
    assert all(r["device"] == common.device_name(torch.device("cpu")) for r in rows)
    assert list(providers) == ["eager"]
    assert notes == {"broken": "failed: ValueError: no kernel for this"}
    assert "broken failed at N=2 V=3: ValueError: no kernel for this" in capsys.readouterr().err


def test_add_ratios_matches_the_baseline_row_by_key():
    rows = [{"provider": "eager", "N": 1, "ms": 4.0, "mb": 0.0},
            {"provider": "fast", "N": 1, "ms": 1.0, "mb": 2.0},
            {"provider": "fast", "N": 2, "ms": 1.0, "mb": 2.0}]  # no baseline at N=2
    common.add_ratios(rows, "eager", ("N",), {"t": "ms", "m": "mb"})
    assert [(r["t"], r["m"]) for r in rows] == [(1.0, None), (0.25, None), (None, None)]  # m: baseline 0 MB
    common.add_ratios(rows, "eager", ("N",), {"speedup": "ms"}, digits=2, inverse=True)
    assert [r["speedup"] for r in rows] == [1.0, 4.0, None]


def test_print_table_right_aligns_formats_and_prints_dash_for_none(capsys):
    common.print_table([{"a": 1.23456, "b": None}], [("A", "a", 6, ".2f"), ("B", "b", 3, "")])
    assert capsys.readouterr().out == "\n     A   B\n  1.23   -\n"


def test_process_memory_has_one_home():
    # fastppo.train (the module: the package exports its function train under the same name)
    assert importlib.import_module("fastppo.train").peak_memory_mb is memory.peak_memory_mb
    cpu = torch.device("cpu")
    assert memory.peak_memory_mb(cpu) >= memory.status_mb("VmRSS") > 0
    assert math.isnan(memory.status_mb("NoSuchField"))


# The header of each op bench's CSV before the harness (bench/results/*.csv): the harness keeps it.
COLUMNS = {
    "linear_logprobs": ("64x32x100", "commit,date,op,provider,mode,N,H,V,dtype,ms,p20,p80,TFLOP/s,pct_mm_peak,"
                                     "peak_extra_MB,device,time_vs_naive,mem_vs_naive"),
    "linear_ppo_loss": ("64x32x100", "commit,date,op,provider,mode,N,H,V,dtype,ms,p20,p80,TFLOP/s,pct_mm_peak,"
                                     "peak_extra_MB,device,time_vs_naive,mem_vs_naive,time_vs_composed,"
                                     "mem_vs_composed"),
    "logprobs": ("16x50", "commit,date,op,provider,mode,N,V,dtype,ms,p20,p80,GB/s,pct_copy_bw,peak_extra_MB,device,"
                          "time_vs_eager,mem_vs_eager"),
    "rl_math": ("2x8", "commit,date,op,provider,mode,mask,B,T,dtype,ms,p20,p80,GB/s,pct_copy_bw,peak_extra_MB,host_us,"
                       "gpu_us,device,threads,speedup_vs_baseline"),
}


@pytest.mark.parametrize("name", sorted(COLUMNS))
def test_op_bench_writes_its_csv_columns_and_a_png(name, tmp_path, monkeypatch, capsys):
    module = __import__(name)
    shapes, header = COLUMNS[name]
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = module.main(["--no-compile", "--rep", "2", "--shapes", shapes])
    assert rows and "fastppo" in {r["provider"] for r in rows}
    with open(tmp_path / f"{name}.csv", newline="") as f:
        assert next(csv.reader(f)) == header.split(",")
    pytest.importorskip("matplotlib")
    assert (tmp_path / f"{name}.png").exists()


def test_trl_worker_reads_memory_through_fastppo_memory_without_the_package():
    """bench/trl_workload.py runs in a venv without fastppo: it loads the one file fastppo/memory.py by path."""
    probe = ("import importlib.util, sys\n"
             f"spec = importlib.util.spec_from_file_location('trl_workload', {str(BENCH / 'trl_workload.py')!r})\n"
             "module = importlib.util.module_from_spec(spec)\n"
             "spec.loader.exec_module(module)\n"
             "import torch\n"
             "print(module.memory.peak_memory_mb(torch.device('cpu')) > 0, 'fastppo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         check=True).stdout.split()
    assert out == ["True", "False"]
