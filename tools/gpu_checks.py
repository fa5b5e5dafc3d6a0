"""The checks of tools/gpu_check.py, run in a worker process that it starts (and restarts after a failure).

Each check is a function of a `Context` returning a `Result` (PASS / FAIL / SKIP, metrics, a note). The
worker runs the checks it is given in order and appends one JSON line per event to the events file:
{"event": "hello", ...} once, then {"event": "start", "check": name} and {"event": "result", ...} per
check. On CUDA it exits with status 3 after a failed check: a CUDA error can leave the context unusable,
so the parent starts a fresh worker for the checks that remain.

On CUDA the checks run at the GPU shapes; without CUDA, at tiny shapes under the Triton interpreter (the
parent sets TRITON_INTERPRET=1 before this module is imported), through the same code.

Usage (tools/gpu_check.py runs it): python tools/gpu_checks.py --out DIR --events FILE --checks a,b
    [--kernel-tests 'PYTEST ARGS'] [--kernel-tests-timeout S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))             # the benchmarks it runs, and their bench/common.py

import common  # noqa: E402
import gpu_iteration as bench_gpu_iteration
import linear_logprobs as bench_linear_logprobs
import linear_ppo_loss as bench_linear_ppo_loss
import logprobs as bench_logprobs
import packed_forward as bench_packed_forward
import rl_math as bench_rl_math
import sampler as bench_sampler
from common import device_name, matmul_peak_tflops, measured_copy_bandwidth_gbs, time_ms

from fastppo import algo
from fastppo.demos import synthetic
from fastppo.config import load_config
from fastppo.kernels import gae, kl_penalty, linear_ppo_loss, linear_token_logprobs, ppo_loss, token_logprobs
from fastppo.kernels.gae import _gae_triton
from fastppo.kernels.linear_token_logprobs import _has_fp32_out_gemm
from fastppo.train import train

# The H200 this project borrows, as measured (docs/gpu_check.md): device-to-device copy (bytes read +
# written) and an 8192³ bf16 matmul. The check also measures both in the same run.
H200_COPY_GBS = 4300.0
H200_BF16_TFLOPS = 790.0

# A pytest -v line of one test: "tests/kernels/test_gae.py::test_x[a-b] PASSED  [ 10%]".
_PYTEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
_PYTEST_SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
# pytest's final line: "==== 3 failed, 1200 passed in 9.12s ====", or without the rules under -q (also printed after
# a KeyboardInterrupt).
_PYTEST_FINAL = re.compile(r"^=*\s*(\d+ (passed|failed|errors?|skipped|xfailed|xpassed|warnings?|deselected)\b.*|no tests ran)"
                           r" in [\d.]+s\b")


@dataclass
class Result:
    status: str = "PASS"
    """PASS, FAIL or SKIP."""
    metrics: list[dict] = field(default_factory=list)
    """{metric, value, unit} rows, in the order they were measured."""
    note: str = ""
    """One line: why it failed or was skipped, or what the numbers mean."""
    headline: str = ""
    """The numbers for the summary table, when `metric value unit` of each would not read well."""

    def add(self, metric: str, value, unit: str = "") -> None:
        if isinstance(value, float):
            value = round(value, 4) if abs(value) < 1e4 else round(value, 1)
        self.metrics.append({"metric": metric, "value": value, "unit": unit})

    def fail(self, why: str) -> None:
        self.status = "FAIL"
        self.note = f"{self.note}; {why}" if self.note else why


@dataclass
class Context:
    device: torch.device
    out: Path
    """Where the benches write their CSV and PNG files, and pytest its log."""
    work: Path
    """A scratch directory (tiny models, training runs)."""
    kernel_tests: str
    """pytest arguments of the kernel-tests check."""
    kernel_tests_timeout: float

    @property
    def cpu(self) -> bool:
        return self.device.type != "cuda"


# ----------------------------------------------------------------------------
# 1. Kernel tests, compiled (on CUDA) or interpreted (CPU)
# ----------------------------------------------------------------------------

def pytest_counts(text: str) -> dict[str, int] | None:
    """The counts of pytest's own final summary line ("== 3 failed, 1200 passed, 7 skipped, 2 errors in 9.1s =="),
    as {passed, failed, skipped, errors, xfailed, xpassed}; None when the output has no summary line (pytest was
    killed). A test with a failing teardown counts as passed and as an error there, as pytest reports it."""
    lines = [line for line in text.splitlines() if _PYTEST_FINAL.match(line)]
    if not lines:
        return None
    counts = dict.fromkeys(("passed", "failed", "skipped", "errors", "xfailed", "xpassed"), 0)
    for n, what in _PYTEST_SUMMARY.findall(lines[-1]):
        counts["errors" if what.startswith("error") else what] += int(n)
    return counts


def interruptible() -> None:
    """A child's SIGINT back at its default: a process started in the background (`make gpu-check &`, nohup)
    inherits SIGINT ignored, and a Python child then never installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def check_kernel_tests(ctx: Context) -> Result:
    """pytest in a subprocess; the counts are those of pytest's own summary line. Past its time box pytest gets a
    SIGINT, on which it stops and still prints that summary (the counts of the tests it ran)."""
    log = ctx.out / ("kernel_tests_cpu.log" if ctx.cpu else "kernel_tests.log")
    env = dict(os.environ, TRITON_INTERPRET="1" if ctx.cpu else "0")
    cmd = [sys.executable, "-m", "pytest", "--verbosity=1", "-p", "no:cacheprovider", "--timeout", "120",
           *shlex.split(ctx.kernel_tests)]
    print(f"  $ {' '.join(cmd[1:])}  (log: {log})", flush=True)
    res = Result()
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=interruptible)
        while proc.poll() is None and time.monotonic() - t0 < ctx.kernel_tests_timeout:
            time.sleep(1)
            if int(time.monotonic() - t0) % 15 == 0:                  # progress only: the -v lines so far
                done = _PYTEST_LINE.findall(log.read_text(errors="replace"))
                bad = sum(outcome in ("FAILED", "ERROR") for _, outcome in done)
                print(f"  kernel tests: about {len(done)} run, {bad} failing ({time.monotonic() - t0:.0f}s)", flush=True)
        timed_out = proc.poll() is None
        if timed_out:
            proc.send_signal(signal.SIGINT)                          # pytest stops and prints its summary
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        rc = proc.wait()
    text = log.read_text(errors="replace")
    counts = pytest_counts(text)
    if counts is None:
        res.fail(f"pytest printed no summary (exit {rc}): no counts; see {log.name}")
        return res
    for key, n in counts.items():
        res.add(key, n, "tests")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)     # pytest's short summary (-ra)
    if timed_out:
        res.fail(f"pytest stopped after {ctx.kernel_tests_timeout:.0f}s (the counts of the tests it ran)")
    elif rc != 0:
        where = f"first failures: {', '.join(failed[:3])}" if failed else f"see {log.name}"
        res.fail(f"pytest exit {rc}; {where}")
    elif counts["passed"] == 0:
        res.fail("no test passed")
    return res


# ----------------------------------------------------------------------------
# 2. The fp32-output GEMM probe
# ----------------------------------------------------------------------------

def check_fp32_gemm_probe(ctx: Context) -> Result:
    """cuBLAS takes half operands and writes float32 (torch.mm(..., out_dtype)); CPU builds do not:
    the probe must say so, or linear_token_logprobs upcasts its operands (slower, more memory)."""
    res = Result()
    want = not ctx.cpu
    for dtype in (torch.bfloat16, torch.float16):
        t0 = time.perf_counter()
        got = _has_fp32_out_gemm(ctx.device, dtype)
        res.add(f"{str(dtype).removeprefix('torch.')}_fp32_out", int(got), "bool")
        res.add(f"{str(dtype).removeprefix('torch.')}_probe_ms", (time.perf_counter() - t0) * 1e3, "ms")
        if got != want:
            res.fail(f"probe says {got} for {dtype} on {ctx.device.type}, expected {want}")
    return res


# ----------------------------------------------------------------------------
# 3. GAE at long T against a float64 Python loop
# ----------------------------------------------------------------------------

def _gae_mask(n_rows: int, n_cols: int, pattern: str, device) -> torch.Tensor:
    if pattern == "holes":
        mask = torch.rand(n_rows, n_cols, device=device) < 0.8
    else:
        lengths = torch.randint(0, n_cols + 1, (n_rows, 1), device=device)
        lengths[0] = n_cols
        cols = torch.arange(n_cols, device=device)
        mask = cols < lengths if pattern == "right" else cols >= n_cols - lengths
    mask[-1] = False                                               # an all-false row
    return mask


def check_gae(ctx: Context) -> Result:
    """The fused GAE (default block and a forced one) on rows of every length against float64.

    Error budget, as in tests/kernels/test_gae.py (flash-attn's criterion): at most twice the error
    of the float32 Python loop trainers write (bench/rl_math.gae_loop), against the same float64
    answer, plus 1e-5 for rows where that loop happens to be exact. Both accumulate
    A_t = Σ_k (γλ)^k δ_(t+k) in float32; the kernel's blockwise scan reorders the sum, which changes
    the rounding but not its order of magnitude.
    """
    gamma, lam = bench_rl_math.GAMMA, bench_rl_math.LAM
    # CPU: the interpreter's default block is 64 tokens, so T=100 has two blocks, and four of 32.
    lengths = (1, 100) if ctx.cpu else (1, 257, 2048, 8192)
    blocks = (None, 32) if ctx.cpu else (None, 2048)
    n_rows = 4 if ctx.cpu else 64
    checked = [0, 1, 2, n_rows - 1]                                 # rows compared with the loops (the last is empty)
    res = Result()
    worst = 0.0
    for n_cols in lengths:
        for pattern in ("left", "right", "holes"):
            rewards = torch.randn(n_rows, n_cols, device=ctx.device)
            values = torch.randn(n_rows, n_cols, device=ctx.device) + 2.0
            mask = _gae_mask(n_rows, n_cols, pattern, ctx.device)
            r, v, m = rewards[checked].cpu(), values[checked].cpu(), mask[checked].cpu()
            want_adv, want_ret = algo.gae(r.double(), v.double(), m, gamma=gamma, lam=lam)     # float64
            plain_adv, plain_ret = bench_rl_math.gae_loop(r, v, m)
            budget_adv = 2 * (plain_adv.double() - want_adv).abs().max().item() + 1e-5
            budget_ret = 2 * (plain_ret.double() - want_ret).abs().max().item() + 1e-5
            for block in blocks:
                adv, ret = _gae_triton(rewards, values, mask, gamma, lam, block_t=block)
                adv, ret = adv[checked].cpu().double(), ret[checked].cpu().double()
                err_adv = (adv - want_adv).abs().max().item()
                err_ret = (ret - want_ret).abs().max().item()
                worst = max(worst, err_adv / budget_adv, err_ret / budget_ret)
                where = f"T={n_cols} {pattern} BLOCK_T={block or 'default'}"
                if not (err_adv <= budget_adv and err_ret <= budget_ret):   # NaN fails too
                    res.fail(f"{where}: |ΔA| {err_adv:.3g} (budget {budget_adv:.3g}), "
                             f"|ΔR| {err_ret:.3g} (budget {budget_ret:.3g})")
                if not (adv[-1] == 0).all() or not (ret[-1] == 0).all():
                    res.fail(f"{where}: the all-false row is not 0")
    res.add("max_T", max(lengths), "tokens")
    res.add("worst_error_over_budget", worst, "ratio")
    # Speed at the largest shape: one launch, 17 bytes per token (read r, v, mask; write A, R).
    n_rows, n_cols = (2, 64) if ctx.cpu else (512, 8192)
    rewards, values = torch.randn(2, n_rows, n_cols, device=ctx.device)
    mask = _gae_mask(n_rows, n_cols, "right", ctx.device)
    ms, _, _ = time_ms(lambda: gae(rewards, values, mask, gamma=gamma, lam=lam, backend="triton"), ctx.device,
                       warmup=1, rep=1 if ctx.cpu else 20)
    res.add(f"ms_B{n_rows}_T{n_cols}", ms, "ms")
    res.add(f"GB/s_B{n_rows}_T{n_cols}", 17 * n_rows * n_cols / (ms * 1e-3) / 1e9, "GB/s")
    return res


# ----------------------------------------------------------------------------
# 4. Roofline and the benchmarks at their GPU shapes
# ----------------------------------------------------------------------------

def check_roofline(ctx: Context) -> Result:
    """Copy bandwidth and a size³ matmul, measured in this run, against the H200's."""
    res = Result()
    gbs = measured_copy_bandwidth_gbs(ctx.device, n_bytes=1 << 22 if ctx.cpu else 1 << 28)
    dtype = torch.float32 if ctx.cpu else torch.bfloat16      # CPU: no fast bf16 matmul to measure
    size = 256 if ctx.cpu else 8192
    tflops = matmul_peak_tflops(ctx.device, dtype, size=size)
    res.add("copy_GB/s", gbs, "GB/s")
    res.add(f"matmul_{size}_{str(dtype).removeprefix('torch.')}_TFLOP/s", tflops, "TFLOP/s")
    if not ctx.cpu:
        res.add("copy_pct_H200", 100 * gbs / H200_COPY_GBS, "%")
        res.add("matmul_pct_H200", 100 * tflops / H200_BF16_TFLOPS, "%")
        res.note = f"H200 roofline: {H200_COPY_GBS:.0f} GB/s copy, {H200_BF16_TFLOPS:.0f} TFLOP/s bf16"
    else:
        res.note = "CPU sizes: the numbers only show the measurement runs"
    return res


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# name -> (module, arguments on CUDA, arguments on CPU). GPU: the benches' own shapes, fewer of them (the
# largest and one smaller), without torch.compile (it recompiles per shape: minutes); CPU: tiny shapes.
BENCHES = {
    "bench_logprobs": (bench_logprobs, ["--rep", "10", "--shapes", "4096x128256,16384x151936"],
                       ["--rep", "1", "--shapes", "16x100"]),
    "bench_linear_logprobs": (bench_linear_logprobs, ["--rep", "5", "--shapes", "4096x4096x128256,16384x4096x151936"],
                              ["--rep", "1", "--shapes", "16x16x100"]),
    "bench_linear_ppo_loss": (bench_linear_ppo_loss, ["--rep", "5", "--shapes", "4096x4096x128256,16384x4096x151936"],
                              ["--rep", "1", "--shapes", "16x16x100"]),
    "bench_rl_math": (bench_rl_math, ["--rep", "10", "--shapes", "64x512,512x2048"],
                      ["--rep", "1", "--shapes", "2x16"]),
    "bench_sampler": (bench_sampler, ["--rep", "10", "--shapes", "64x32000,256x151936"],
                      ["--rep", "1", "--shapes", "4x100"]),
}


SHAPE_KEYS = ("B", "T", "N", "H", "V")


def _bench_summary(row: dict, res: Result) -> str:
    """Adds the fastppo row's numbers to res; returns them in one phrase for the summary table.

    The rate is set against the peak the bench measured in the same run (its own column) and against
    the H200 roofline.
    """
    shape = " ".join(f"{k}={row[k]}" for k in SHAPE_KEYS if k in row)
    key = f"{row['op']} {row['mode']} {shape}"
    res.add(f"{key} ms", row["ms"], "ms")
    phrase = f"{key}: {row['ms']} ms"
    rate, unit, measured, roofline = ((row["TFLOP/s"], "TFLOP/s", row.get("pct_mm_peak"), H200_BF16_TFLOPS)
                                      if "TFLOP/s" in row else
                                      (row["GB/s"], "GB/s", row.get("pct_copy_bw"), H200_COPY_GBS))
    res.add(f"{key} {unit}", rate, unit)
    phrase += f", {rate} {unit}"
    shares = []
    if measured is not None:
        res.add(f"{key} % of measured peak", measured, "%")
        shares.append(f"{measured}% of measured")
    if not row["device"].startswith("cpu"):
        res.add(f"{key} % of H200", 100 * rate / roofline, "%")
        shares.append(f"{100 * rate / roofline:.1f}% of H200")
    if row.get("speedup_vs_baseline") is not None:
        res.add(f"{key} speedup", row["speedup_vs_baseline"], "x")
        shares.append(f"{row['speedup_vs_baseline']}x the baseline")
    return phrase + (f" ({', '.join(shares)})" if shares else "")


def check_bench(ctx: Context, name: str) -> Result:
    """Runs a bench's main() with the check's shapes; PASS when fastppo has a row at every shape and mode."""
    module, gpu_args, cpu_args = BENCHES[name]
    args = ["--no-compile", *(cpu_args if ctx.cpu else gpu_args)]
    print(f"  bench/{Path(module.__file__).name} {' '.join(args)}", flush=True)
    # CPU: the fastppo provider through the Triton kernels (interpreted), as on a GPU.
    with _env(**({"FASTPPO_BACKEND": "triton"} if ctx.cpu else {})):
        rows = module.main(args) or []
    res = Result()
    case = lambda r: tuple(r.get(k) for k in ("op", "mode", "mask", *SHAPE_KEYS))  # noqa: E731
    cases = {case(r) for r in rows}
    mine = {case(r): r for r in rows if r["provider"] == "fastppo"}
    if not rows:
        res.fail("no rows (every provider failed: see the log)")
    missing = sorted(cases - set(mine), key=str)
    if missing:
        res.fail(f"fastppo has no row for {len(missing)} case(s), e.g. {missing[0]} (see the log)")
    # The headline numbers: fastppo at the largest shape, per op and mode (all rows are in the bench's CSV).
    largest = {}
    for r in mine.values():
        size = math.prod(r[k] for k in SHAPE_KEYS if k in r)
        key = (r["op"], r["mode"])
        if key not in largest or size > largest[key][0]:
            largest[key] = (size, r)
    res.headline = "; ".join(_bench_summary(r, res) for _, r in largest.values())
    res.note = f"{len(rows)} rows in {Path(module.__file__).stem}.csv"
    return res


def check_gpu_iteration(ctx: Context) -> Result:
    """bench/gpu_iteration.py: one GRPO and one PPO-max iteration of a Qwen2-1.5B-shaped model (CPU: the tiny
    shape), fastppo's fused lm_head ops against naive logits; PASS when fastppo ran both."""
    rows = bench_gpu_iteration.main(["--iterations", "2"] + (["--tiny"] if ctx.cpu else []))
    res = Result()
    by = {(r["algo"], r["path"]): r for r in rows}
    phrases = []
    for algo in ("grpo", "ppo_max"):
        fast, naive = by.get((algo, "fastppo")), by.get((algo, "naive"))
        if fast is None or "iteration_s" not in fast:
            res.fail(f"fastppo's {algo} iteration did not run (see the log)")
            continue
        res.add(f"{algo} iteration s", fast["iteration_s"], "s")
        res.add(f"{algo} update s", fast["update_s"], "s")
        res.add(f"{algo} peak memory", fast["peak_memory_mb"], "MB")
        phrase = f"{algo}: {fast['iteration_s']} s/iteration, peak {fast['peak_memory_mb']} MB"
        if fast.get("update_mfu_pct") is not None:
            res.add(f"{algo} update MFU", fast["update_mfu_pct"], "%")
            phrase += f", update MFU {fast['update_mfu_pct']}%"
        if naive is not None and "iteration_s" in naive:
            speedup = naive["iteration_s"] / max(fast["iteration_s"], 1e-9)
            res.add(f"{algo} speedup vs naive logits", speedup, "x")
            phrase += f", {speedup:.2f}x the naive iteration"
        elif naive is not None:
            phrase += f" (naive: {naive.get('error', 'failed')})"
        phrases.append(phrase)
    res.headline = "; ".join(phrases)
    res.note = f"{len(rows)} rows in gpu_iteration.csv"
    return res


# ----------------------------------------------------------------------------
# 5. Host syncs per op, forward and backward
# ----------------------------------------------------------------------------

class SyncCounter:
    """Counts synchronising CUDA calls in a block (torch.cuda.set_sync_debug_mode("warn"))."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def __call__(self):
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        self.count = sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def _sync_cases(device: torch.device, cpu: bool):
    """name -> (forward() -> loss or None, backward(loss) or None): each fused op at a training shape."""
    n, size_h, vocab = (32, 16, 300) if cpu else (4096, 4096, 32000)
    rows, cols = (2, 16) if cpu else (64, 1024)
    dtype = torch.float32 if cpu else torch.bfloat16
    logits = torch.randn(n, vocab, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), device=device)
    hidden = (torch.randn(n, size_h, device=device) / size_h ** 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, size_h, device=device) / size_h ** 0.5).to(dtype).requires_grad_()
    lp = (-torch.rand(rows, cols, device=device)).requires_grad_()
    old, ref, adv = -torch.rand(rows, cols, device=device), -torch.rand(rows, cols, device=device), \
        torch.randn(rows, cols, device=device)
    values = torch.randn(rows, cols, device=device, requires_grad=True)
    mask = torch.rand(rows, cols, device=device) < 0.9
    old_tok, adv_tok, mask_tok = -torch.rand(n, device=device), torch.randn(n, device=device), \
        torch.ones(n, dtype=torch.bool, device=device)

    def backward(loss):
        loss.backward()

    return {
        "token_logprobs": (lambda: sum(x.float().sum() for x in token_logprobs(logits, labels, return_entropy=True)),
                           backward),
        "linear_token_logprobs": (lambda: sum(x.float().sum() for x in linear_token_logprobs(
            hidden, weight, labels, return_entropy=True)), backward),
        "kl_penalty": (lambda: kl_penalty(lp, ref).sum(), backward),
        "gae": (lambda: gae(lp.detach(), values.detach(), mask), None),
        "ppo_loss": (lambda: ppo_loss(lp, old, adv, values, values.detach(), adv, mask).loss, backward),
        "linear_ppo_loss": (lambda: linear_ppo_loss(hidden, weight, labels, old_tok, adv_tok, mask_tok).loss,
                            backward),
    }


def check_sync_counts(ctx: Context) -> Result:
    """Host syncs of each fused op's forward and backward, after a warm-up call (compilation syncs)."""
    res = Result()
    cases = _sync_cases(ctx.device, ctx.cpu)
    if ctx.cpu:
        for forward, backward in cases.values():                 # the harness runs; there is nothing to count
            out = forward()
            if backward is not None:
                backward(out)
        res.status = "SKIP"
        res.note = f"no CUDA: host syncs exist only with a device; the {len(cases)} ops ran forward+backward"
        return res
    count = SyncCounter()
    x = torch.ones(8, device=ctx.device)
    with count():
        x.sum().item()
    control_sync = count.count
    with count():
        x.add_(1)
    control_free = count.count
    if control_sync < 1 or control_free != 0:
        res.fail(f"the counter is not calibrated: .item() counted {control_sync}, an add counted {control_free}")
    for name, (forward, backward) in cases.items():
        out = forward()                                            # warm-up: compile, autotune
        if backward is not None:
            backward(out)
        torch.cuda.synchronize()
        with count():
            out = forward()
        res.add(f"{name}_forward", count.count, "syncs")
        if backward is not None:
            with count():
                backward(out)
            res.add(f"{name}_backward", count.count, "syncs")
        torch.cuda.synchronize()
    res.note = "counts after a warm-up call; informational (docs/gpu_check.md)"
    return res


# ----------------------------------------------------------------------------
# 6. A 3-iteration tiny-model training, bf16 mixed precision, with and without FSDP2 (one rank)
# ----------------------------------------------------------------------------

def tiny_models(ctx: Context) -> Path:
    """A tiny Llama policy and reward model (random init) and prompts, as fastppo demo builds them."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    root = ctx.work / "tiny"
    if (root / "prompts.jsonl").exists():
        return root
    tokenizer = synthetic.build_tokenizer(root / "policy")
    tokenizer.save_pretrained(str(root / "reward"))
    config = synthetic.tiny_llama_config(len(tokenizer), hidden_size=16 if ctx.cpu else 256, layers=1 if ctx.cpu else 2,
                                         heads=2 if ctx.cpu else 8)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "policy")
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    synthetic.write_jsonl(root / "prompts.jsonl", synthetic.make_prompts(64, seed=0))
    return root


def check_train(ctx: Context, shard: str) -> Result:
    root = tiny_models(ctx)
    run_dir = ctx.work / f"run_shard_{shard}"
    batch = 2 if ctx.cpu else 16
    overrides = [
        f"model.policy_path={root / 'policy'}", f"model.reward_path={root / 'reward'}",
        f"data.prompt_path={root / 'prompts.jsonl'}", "data.max_prompt_len=16",
        f"rollout.rollout_batch_size={batch}", f"rollout.max_new_tokens={4 if ctx.cpu else 24}",
        f"ppo.minibatch_size={batch // 2}", f"ppo.micro_batch_size={batch // 2}", "ppo.critic_warmup_steps=0",
        "model.dtype=float32", "parallel.param_dtype=bfloat16", f"parallel.shard={shard}",
        f"run.output_dir={run_dir}", "run.iterations=3", "run.save_every=0", "run.export_at_end=false",
        "run.tensorboard=false", "run.progress_bar=false", "run.log_level=WARNING",
    ]
    if not ctx.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(load_config(None, overrides))
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    res = Result()

    def finite(key):                      # non-finite values are logged as strings ("nan")
        return all(isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) for r in records)

    res.add("iterations", len(records), "")
    if records:
        res.add("loss_total_last", records[-1].get("loss/total"), "")
        res.add("reward_last", records[-1].get("score/raw/mean"), "")
        times = [r["time/iteration_s"] for r in records]
        res.add("s_per_iter_first", times[0], "s")
        res.add("s_per_iter_rest", sum(times[1:]) / max(1, len(times) - 1), "s")
        res.add("peak_memory_mb", max(r["memory/peak_mb"] for r in records), "MB")
    res.add("wall_s", wall, "s")
    if len(records) != 3:
        res.fail(f"{len(records)} iterations logged, expected 3")
    for key in ("loss/total", "loss/policy", "loss/value", "score/raw/mean"):
        if not finite(key):
            res.fail(f"{key} not finite in every iteration")
    return res


def tiny_policy(ctx: Context):
    """(models folder, device, tokenizer, the tiny policy in eval mode: bf16 on CUDA, float32 on CPU)."""
    from fastppo.models import ensure_pad_token, load_tokenizer
    from transformers import AutoModelForCausalLM

    root = tiny_models(ctx)
    device = torch.device("cpu" if ctx.cpu else "cuda")
    tok = load_tokenizer(str(root / "policy"))
    ensure_pad_token(tok)
    policy = AutoModelForCausalLM.from_pretrained(root / "policy", dtype=torch.bfloat16 if not ctx.cpu else None)
    return root, device, tok, policy.to(device).eval()


def check_generate_compiled(ctx: Context) -> Result:
    """rollout.compile: the static-cache compiled decode step against eager generation on the tiny policy: the
    same tokens for the same seed, and generated tokens per second of each (after a warm-up call that compiles).
    On CPU the compiled path is not timed (inductor needs minutes there; tests/test_rollout.py checks its
    tokens with dynamo's eager backend), and the eager one is a smoke run: 4 tokens, no warm-up (the
    interpreted sampler takes about a second a step)."""
    from fastppo.config import RolloutConfig
    from fastppo.data import collate_prompts, load_prompts
    from fastppo.rollout import generate

    root, device, tok, policy = tiny_policy(ctx)
    batch_size = 4 if ctx.cpu else 64
    prompts = load_prompts(root / "prompts.jsonl", tok, field="prompt", prompt_format="plain", max_len=16)
    batch = collate_prompts(prompts[:batch_size], tok.pad_token_id)
    batch = type(batch)(batch.input_ids.to(device), batch.attention_mask.to(device))
    res, tokens, rate = Result(), {}, {}
    for compiled in ([False] if ctx.cpu else [False, True]):
        cfg = RolloutConfig(max_new_tokens=4 if ctx.cpu else 64, temperature=1.0, top_p=0.9, compile=compiled)
        kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generation_batch_size=batch_size, seed=3,
                  vocab_size=len(tok))
        if not ctx.cpu:
            generate(policy, batch, cfg, **kw)                                       # warm-up (compiles)
        sync = torch.cuda.synchronize if not ctx.cpu else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = generate(policy, batch, cfg, **kw)
        sync()
        seconds = time.perf_counter() - t0
        name = "compiled" if compiled else "eager"
        tokens[name] = out.sequences
        rate[name] = int(out.lengths.sum()) / seconds
        res.add(f"{name}_tokens_per_s", rate[name], "tok/s")
    if "compiled" in tokens:
        res.add("compiled_vs_eager", rate["compiled"] / rate["eager"], "x")
        if not torch.equal(tokens["compiled"], tokens["eager"]):
            res.fail("the compiled decode step drew other tokens than eager generation for the same seed")
    return res


def check_generate_static(ctx: Context) -> Result:
    """rollout.engine=static against hf on the tiny policy: 64 prompts x G = 4 on 64 slots, so slots are refilled
    as responses end; the same tokens for the same seed from the eager decode step and (CUDA, rollout.compile)
    its CUDA graph, and generated tokens per second of each (after a warm-up call). On CPU a smoke run: 8 new
    tokens (slots are still refilled), no warm-up (the interpreted sampler takes about a second a step)."""
    from fastppo.config import RolloutConfig
    from fastppo.data import PromptBatch, collate_prompts, load_prompts
    from fastppo.rollout import generate
    from fastppo.static_engine import generate_static

    root, device, tok, policy = tiny_policy(ctx)
    n, G = (4, 2) if ctx.cpu else (64, 4)
    prompts = load_prompts(root / "prompts.jsonl", tok, field="prompt", prompt_format="plain", max_len=16)
    batch = collate_prompts(prompts[:n], tok.pad_token_id)
    batch = PromptBatch(batch.input_ids.repeat_interleave(G, 0).to(device),
                        batch.attention_mask.repeat_interleave(G, 0).to(device))
    res, tokens, rate = Result(), {}, {}
    sync = torch.cuda.synchronize if not ctx.cpu else (lambda: None)
    for name in (["hf", "static"] if ctx.cpu else ["hf", "static", "static+graph"]):
        cfg = RolloutConfig(max_new_tokens=8 if ctx.cpu else 64, temperature=1.0, top_p=0.9,
                            compile=name == "static+graph")
        kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3, vocab_size=len(tok))

        def run():
            if name == "hf":
                return generate(policy, batch, cfg, generation_batch_size=n, **kw)
            return generate_static(policy, batch, cfg, slots=n, **kw)

        if not ctx.cpu:
            run()                                                                      # warm-up
        sync()
        t0 = time.perf_counter()
        out = run()
        sync()
        tokens[name] = out.sequences
        rate[name] = int(out.lengths.sum()) / (time.perf_counter() - t0)
        res.add(f"{name}_tokens_per_s", rate[name], "tok/s")
        if name != "hf":
            res.add(f"{name}_vs_hf", rate[name] / rate["hf"], "x")
            if not torch.equal(tokens[name], tokens["hf"]):
                res.fail(f"{name} drew other tokens than hf for the same seed (bf16: a near-tie may flip)")
    return res


def check_packed_forward(ctx: Context) -> Result:
    """bench/packed_forward.py: a backbone forward (+ backward) on B rollouts, padded against the packed layouts
    (rows as wide as the longest sequence for sdpa, one row for flash-attn; here both through sdpa). PASS when
    every layout ran at every B; the numbers are the speedups over padded at the largest B."""
    args = (["--rep", "1", "--hidden", "64", "--layers", "1", "--shapes", "8"] if ctx.cpu else
            ["--rep", "10", "--hidden", "2048", "--layers", "4", "--shapes", "64,256"])
    rows = bench_packed_forward.main(args) or []
    res = Result()
    if {r["provider"] for r in rows} != {"padded", "rows", "one_row"}:
        res.fail(f"layouts measured: {sorted({r['provider'] for r in rows})} (see the log)")
        return res
    largest = max(r["B"] for r in rows)
    for r in rows:
        if r["B"] == largest and r["provider"] != "padded":
            res.add(f"{r['provider']} {r['mode']} B={largest} speedup", r["speedup"], "x")
    res.note = f"{len(rows)} rows in packed_forward.csv"
    return res


# ----------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------

CHECKS = {
    "kernel_tests": check_kernel_tests,
    "fp32_gemm_probe": check_fp32_gemm_probe,
    "gae_long": check_gae,
    "sync_counts": check_sync_counts,
    "train_no_fsdp": lambda ctx: check_train(ctx, "never"),
    "train_fsdp": lambda ctx: check_train(ctx, "always"),
    "roofline": check_roofline,
    "generate_compiled": check_generate_compiled,
    "generate_static": check_generate_static,
    "packed_forward": check_packed_forward,
    **{name: (lambda ctx, name=name: check_bench(ctx, name)) for name in BENCHES},
    "gpu_iteration": check_gpu_iteration,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--checks", required=True, help="comma-separated, from: " + ", ".join(CHECKS))
    parser.add_argument("--kernel-tests", default="tests/kernels")
    parser.add_argument("--kernel-tests-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    common.RESULTS = args.out                                     # the benches' CSV and PNG files go here

    def emit(**event) -> None:
        with open(args.events, "a") as f:
            f.write(json.dumps(event) + "\n")

    emit(event="hello", device=device_name(device), torch=torch.__version__, triton=triton.__version__,
         interpreter=os.environ.get("TRITON_INTERPRET", ""))
    with tempfile.TemporaryDirectory(prefix="fastppo-gpu-check-") as work:
        ctx = Context(device, args.out, Path(work), args.kernel_tests, args.kernel_tests_timeout)
        for name in args.checks.split(","):
            emit(event="start", check=name)
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                res = CHECKS[name](ctx)
            except Exception as exc:                               # reported as the check's failure
                traceback.print_exc()
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                res = Result("FAIL", note=f"{type(exc).__name__}: {first}")
            seconds = time.perf_counter() - t0
            print(f"== {name}: {res.status} in {seconds:.1f}s {res.note}", flush=True)
            emit(event="result", check=name, status=res.status, seconds=round(seconds, 2), metrics=res.metrics,
                 note=res.note, headline=res.headline)
            if res.status == "FAIL" and not ctx.cpu:
                return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
