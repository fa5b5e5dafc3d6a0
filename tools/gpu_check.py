"""`make gpu-check`: every GPU path of fastppo in one command, within a time budget (8 minutes by default).

On CUDA, each check time-boxed, in this order (docs/gpu_check.md):
  kernel_tests          pytest tests/kernels with the kernels compiled (TRITON_INTERPRET=0): pass/fail counts
  fp32_gemm_probe       linear_token_logprobs' probe for cuBLAS's float32-output half GEMM (must be on)
  gae_long              the fused GAE at T up to 8192 (default BLOCK_T and BLOCK_T=2048) against float64
  sync_counts           host syncs of each fused op's forward and backward
  train_no_fsdp         3 PPO iterations of a tiny Llama, model.dtype=float32 + param_dtype=bfloat16,
  train_fsdp              parallel.shard=never, then =always (FSDP2 on one rank): finite, s/iter, peak MB
  roofline              a device copy and an 8192³ bf16 matmul, against the H200's 4.3 TB/s and 790 TFLOP/s
  bench_*               bench/logprobs.py, linear_logprobs.py, linear_ppo_loss.py, rl_math.py at GPU shapes
  gpu_iteration         bench/gpu_iteration.py: a GRPO and a PPO-max iteration of a Qwen2-1.5B-shaped model,
                          fastppo against naive logits (last: run it alone with --checks gpu_iteration)
Without CUDA the same checks run at tiny shapes under the Triton interpreter, in seconds.

The checks run in a worker process (tools/gpu_checks.py); this process only watches it: it prints the
worker's progress, enforces each check's time box and the global budget (a check over its box is
killed and FAILs; checks that no longer fit are SKIPped) and starts a fresh worker after a crash or a
failed check. Results are written as they arrive: rows to <out>/gpu_check.csv (device, commit, date;
bench/common.py), the benches' own CSVs, and the summary table <out>/gpu_check.md. Exit status 1 when
a check failed.

A bare GPU machine (no network, fastppo not installed) needs nothing but python3 with torch, triton and
transformers: this script makes the checkout importable as `fastppo` without installing it, and takes
the pure-Python packages the image lacks (omegaconf, pytest, ...) from the wheels in .wheels/, brought
along from a machine with network (`make gpu-wheels`).

Usage: python3 tools/gpu_check.py [--out DIR] [--budget-s S] [--checks a,b,...] [--kernel-tests 'PYTEST ARGS']
  --out: default bench/results on CUDA, bench/results/cpu_check elsewhere (the GPU results stay untouched)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TOOLS = ROOT / "tools"
sys.path.insert(0, str(BENCH))                       # bench/common.py writes the CSV rows
WHEELS = ROOT / ".wheels"

CHECKS = ["kernel_tests", "fp32_gemm_probe", "gae_long", "sync_counts", "train_no_fsdp", "train_fsdp",
          "roofline", "bench_logprobs", "bench_linear_logprobs", "bench_linear_ppo_loss", "bench_rl_math",
          "bench_sampler", "generate_compiled", "generate_static", "packed_forward", "gpu_iteration"]

# Seconds each check may take on a GPU (the sum is above the budget: checks that run short leave time to the
# rest, and those that no longer fit are skipped). Compiling the kernels dominates the first two entries.
BOX_S = {"kernel_tests": 200, "fp32_gemm_probe": 30, "gae_long": 60, "sync_counts": 60, "train_no_fsdp": 60,
         "train_fsdp": 60, "roofline": 30, "bench_logprobs": 60, "bench_linear_logprobs": 75,
         "bench_linear_ppo_loss": 75, "bench_rl_math": 60, "bench_sampler": 45,
         "generate_compiled": 120, "generate_static": 60, "packed_forward": 45, "gpu_iteration": 300}
# Without CUDA every check runs at tiny sizes in seconds; the interpreter is slow enough to keep a box.
CPU_BOX_S = 120
# A check is started only with at least this much of the budget left (a worker's start-up included).
MIN_START_S = 10

# The kernel tests without a GPU: one test per op family, interpreted (the full set takes minutes there).
CPU_KERNEL_TESTS = "tests/kernels/test_gae.py -k by_hand"


# ----------------------------------------------------------------------------
# Making fastppo importable on a bare machine
# ----------------------------------------------------------------------------

def unpack_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpack into site each pure-Python wheel in `wheels` whose distribution this Python lacks (PEP 427:
    such a wheel is a site-packages tree; its .data/ scripts are not needed here). Returns their names."""
    used = []
    for wheel in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        try:
            importlib.metadata.version(wheel.name.split("-")[0])
            continue                                          # the machine has it: keep its version
        except importlib.metadata.PackageNotFoundError:
            pass
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site, [n for n in z.namelist() if not n.split("/", 1)[0].endswith(".data")])
        used.append(wheel.name)
    return used


def prepare_imports(site: Path, wheels: Path = WHEELS) -> list[str]:
    """Make fastppo and its pure-Python dependencies importable here and in the worker (sys.path and
    PYTHONPATH get `site`). Returns the lines to print: what was set up, and what is still missing."""
    said = [f"using {name} from {wheels.name}/" for name in unpack_wheels(wheels, site)]
    paths = [str(site)] if said else []
    if importlib.util.find_spec("fastppo") is None:
        paths.append(str(ROOT))
        said.append(f"fastppo is not installed: importing it from {ROOT}")
    if paths:
        sys.path[:0] = paths
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
        importlib.invalidate_caches()
    for module, dist in (("omegaconf", "omegaconf"), ("pytest", "pytest"), ("pytest_timeout", "pytest-timeout")):
        if importlib.util.find_spec(module) is None:
            said.append(f"missing: {dist}: bring .wheels/ along (`make gpu-wheels` on a machine with network; "
                        "docs/gpu_check.md)")
    return said


# ----------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------

def _headline(result: dict, limit: int = 8) -> str:
    """The check's numbers in one cell: its own headline, else `metric value unit` for its first few metrics."""
    if result.get("headline"):
        return result["headline"]
    cells = [f"{m['metric']} {m['value']}{'' if m['unit'] in ('', 'bool', 'tests', 'syncs') else ' ' + m['unit']}"
             for m in result.get("metrics", [])]
    more = f" (+{len(cells) - limit} in gpu_check.csv)" if len(cells) > limit else ""
    return "; ".join(cells[:limit]) + more


def write_summary(path: Path, results: dict[str, dict], checks: list[str], header: dict) -> None:
    lines = ["# fastppo GPU check", "",
             f"Device: {header.get('device', '?')} · torch {header.get('torch', '?')} · triton "
             f"{header.get('triton', '?')} · commit {header.get('commit', '?')} · {header.get('date', '?')} · "
             f"budget {header.get('budget_s')} s, used {header.get('used_s', 0):.0f} s", "",
             f"Command: `{header.get('command', '')}`. All rows: gpu_check.csv; benches: their own CSVs.", "",
             "| check | status | s | numbers | note |", "|---|---|---|---|---|"]
    for name in checks:
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | … | | | not run yet |")
            continue
        note = r.get("note", "").replace("|", "/")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | {_headline(r).replace('|', '/')} | "
                     f"{note} |")
    path.write_text("\n".join(lines) + "\n")


class Report:
    """The results so far: gpu_check.md is rewritten and rows appended to gpu_check.csv at each new one."""

    def __init__(self, out: Path, checks: list[str], cpu: bool, *, budget_s: float, command: str) -> None:
        self.out, self.checks, self.cpu = out, checks, cpu
        self.summary = out / "gpu_check.md"
        self.results: dict[str, dict] = {}
        self.header = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_s": int(budget_s),
                       "command": command}
        self.t_start = time.monotonic()
        self._append_csv = None

    def _csv_writer(self):
        if self._append_csv is None:
            try:
                # Imported at the first result, not at the top: common imports fastppo, importable only after
                # prepare_imports (if at all), and its seconds of start-up then overlap the worker's.
                import common

                common.RESULTS = self.out
                self._append_csv = common.append_csv
                self.header["commit"] = common.git_commit()
            except Exception as exc:
                print(f"gpu-check: no gpu_check.csv: cannot import bench/common.py ({type(exc).__name__}: {exc})",
                      flush=True)
                self._append_csv = False
        return self._append_csv

    def add(self, check: str, result: dict, worker: dict | None = None) -> None:
        """Record a check's result ({status, seconds, metrics, note}); worker: the worker's hello (device, versions)."""
        self.results[check] = result
        self.header.update(worker or {}, used_s=time.monotonic() - self.t_start)
        mark = {"PASS": "ok", "FAIL": "FAILED", "SKIP": "skipped"}.get(result["status"], result["status"])
        print(f"gpu-check: {check}: {mark} ({result.get('seconds', 0):.1f}s) {result.get('note', '')}", flush=True)
        append_csv = self._csv_writer()
        write_summary(self.summary, self.results, self.checks, self.header)
        if append_csv:
            append_csv("gpu_check", [
                {"check": check, "status": result["status"], "seconds": round(result.get("seconds", 0), 2),
                 "metric": m["metric"], "value": m["value"], "unit": m["unit"], "note": result.get("note", ""),
                 "device": self.header.get("device", "?"), "mode": "cpu" if self.cpu else "cuda"}
                for m in result.get("metrics") or [{"metric": "", "value": "", "unit": ""}]])


# ----------------------------------------------------------------------------
# Watching the worker
# ----------------------------------------------------------------------------

class Runner:
    def __init__(self, args, out: Path, cpu: bool, events: Path, log: Path, report: Report) -> None:
        self.args, self.out, self.cpu, self.events, self.log, self.report = args, out, cpu, events, log, report
        self.deadline = time.monotonic() + args.budget_s
        self.worker_info: dict = {}
        self._events_read = 0
        self._log_read = 0

    def _record(self, check: str, result: dict) -> None:
        self.report.add(check, result, self.worker_info)

    def box(self, check: str, start: float) -> float:
        """Seconds for a check that starts at `start` (time.monotonic): its box, cut by the budget left then."""
        return min(CPU_BOX_S if self.cpu else BOX_S[check], self.deadline - start)

    def _new_events(self) -> list[dict]:
        if not self.events.exists():
            return []
        text = self.events.read_text()
        # Only complete lines: the worker may be half-way through writing the last one.
        complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        new, self._events_read = complete[self._events_read:], len(complete)
        return [json.loads(line) for line in new if line.strip()]

    def _echo_log(self) -> str:
        """Print what the worker wrote since the last call; returns its last lines (for a crash note)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        sys.stdout.write(text[self._log_read:])
        sys.stdout.flush()
        self._log_read = len(text)
        return text[-2000:]

    def run(self, todo: list[str]) -> None:
        while todo:
            if self.deadline - time.monotonic() < MIN_START_S:
                break
            # pytest's own timeout stops it a little before the box, so that its counts so far come back.
            pytest_s = max(5.0, self.box("kernel_tests", time.monotonic()) - 5)
            cmd = [sys.executable, str(TOOLS / "gpu_checks.py"), "--out", str(self.out), "--events",
                   str(self.events), "--checks", ",".join(todo), "--kernel-tests", self.args.kernel_tests,
                   "--kernel-tests-timeout", str(pytest_s)]
            with open(self.log, "a") as log:
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            current, started, finished, progressed, killed = None, 0.0, False, False, False
            try:
                while not finished:
                    time.sleep(0.2)
                    finished = proc.poll() is not None
                    self._echo_log()
                    for ev in self._new_events():
                        if ev["event"] == "hello":
                            self.worker_info = {k: v for k, v in ev.items() if k != "event"}
                        elif ev["event"] == "start":
                            current, started = ev["check"], time.monotonic()
                        elif ev["event"] == "result" and ev["check"] in todo:   # (not one already failed by a kill)
                            todo.remove(ev["check"])
                            self._record(ev["check"], {k: v for k, v in ev.items() if k not in ("event", "check")})
                            current, progressed = None, True
                    over_box = current is not None and time.monotonic() - started > self.box(current, started)
                    if not finished and (over_box or time.monotonic() > self.deadline):
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        finished = killed = True
                        if current is not None:
                            why = (f"timed out after {time.monotonic() - started:.0f}s (its box)"
                                   if over_box else "stopped: the global budget ran out")
                            todo.remove(current)
                            self._record(current, {"status": "FAIL", "seconds": time.monotonic() - started,
                                                   "note": why})
                            current = None
            finally:                                          # Ctrl-C / SIGTERM: the worker goes too
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            tail = self._echo_log()
            if current is not None:                           # the worker died inside a check
                todo.remove(current)
                last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
                self._record(current, {"status": "FAIL", "seconds": time.monotonic() - started,
                                      "note": f"worker exited with status {proc.returncode} ({last[0][:200]})"})
            elif not (killed or progressed) and proc.returncode != 0:   # it cannot even start: no use retrying
                for name in list(todo):
                    todo.remove(name)
                    self._record(name, {"status": "FAIL", "seconds": 0.0,
                                        "note": f"the worker did not start (status {proc.returncode}): "
                                                "see gpu_check.log"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results directory (see above)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total seconds for all checks (default 480)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated subset, in the order given (default: all, {','.join(CHECKS)})")
    parser.add_argument("--kernel-tests", default=None,
                        help="pytest arguments of kernel_tests (default: tests/kernels; a small selection on CPU)")
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"--checks: unknown check(s) {unknown}; known: {CHECKS}")

    with tempfile.TemporaryDirectory(prefix="fastppo-gpu-check-site-") as site:
        for line in prepare_imports(Path(site)):
            print(f"gpu-check: {line}", flush=True)
        cpu = not torch.cuda.is_available()
        out = (args.out or (BENCH / "results" / ("cpu_check" if cpu else ""))).resolve()
        out.mkdir(parents=True, exist_ok=True)
        args.kernel_tests = args.kernel_tests or (CPU_KERNEL_TESTS if cpu else "tests/kernels")
        if cpu:
            # The worker's kernels run in the Triton interpreter; it reads this when they are defined.
            os.environ["TRITON_INTERPRET"] = "1"
            print("gpu-check: no CUDA device: running every check at tiny sizes under the Triton interpreter "
                  f"(the real check needs a GPU); results in {out}", flush=True)
        else:
            os.environ["TRITON_INTERPRET"] = "0"
        report = Report(out, checks, cpu, budget_s=args.budget_s,
                        command=" ".join(["python3", "tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]))
        events, log = out / "gpu_check.events.jsonl", out / "gpu_check.log"
        events.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        runner = Runner(args, out, cpu, events, log, report)
        todo = list(checks)
        runner.run(todo)
        for name in todo:
            report.add(name, {"status": "SKIP", "seconds": 0.0,
                              "note": f"not started: under {MIN_START_S}s of the {args.budget_s:.0f}s budget left"})

    summary = report.summary
    failed = [c for c in checks if report.results[c]["status"] == "FAIL"]
    print(f"\ngpu-check: {len(checks) - len(failed)}/{len(checks)} checks passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; summary: {summary}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the worker, in its own session, is killed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
