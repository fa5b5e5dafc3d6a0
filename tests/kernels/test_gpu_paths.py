"""The GPU paths of token_logprobs, linear_token_logprobs and linear_ppo_loss, checked as far as a CPU can.

- every Triton launch runs under the device guard of its input (a launch on the
  current device with another GPU's pointers is the bug);
- no host sync on the GPU paths: run on the "meta" device, where any
  data-dependent host read (``nonzero``, ``.item()``, ``bool(tensor)``) raises,
  and counted with ``count_host_syncs`` on CUDA;
- linear_ppo_loss's GPU row mode (every row computed, invalid ones masked)
  gives the CPU mode's results (valid rows gathered);
- dhidden of bf16 inputs at a large vocabulary within the error of plain bf16;
- the chunk planner at V = 256000, H = 8192 on 80 and 141 GB devices, and the
  documented peak-memory formula against a measured peak;
- ``vocab_size``: padding columns excluded from the softmax, gradient exactly 0.

The tests that need CUDA are at the end and are skipped without it; on a GPU
machine run this file with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from fastppo import algo
from fastppo.kernels import gae, kl_penalty, linear_ppo_loss, linear_token_logprobs, ppo_loss, token_logprobs
from fastppo.kernels._dispatch import on_device_of, triton_interpreter_enabled
from fastppo.kernels._syncs import count_host_syncs
from fastppo.kernels.linear_token_logprobs import (
    CHUNK_ROW_QUANTUM, MAX_CHUNK_ROWS, bytes_per_chunk_row, gpu_chunk_budget_bytes, peak_extra_bytes, rows_within,
)

# The modules, not the functions of the same name that fastppo.kernels exports.
tl_mod = importlib.import_module("fastppo.kernels.token_logprobs")
ppo_mod = importlib.import_module("fastppo.kernels.linear_ppo_loss")

BACKENDS = ["torch", "triton"]
IGNORE = -100
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _skip_cpu_triton_without_interpreter(backend):
    if backend == "triton" and not triton_interpreter_enabled():
        pytest.skip("the triton backend on CPU tensors needs TRITON_INTERPRET=1")


def _ppo_inputs(n, size_h, vocab, dtype, device="cpu", *, n_rows_weight=None):
    hidden = torch.randn(n, size_h, device=device).to(dtype)
    weight = (torch.randn(n_rows_weight or vocab, size_h, device=device) * 2 / math.sqrt(size_h)).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device)
    old = torch.randn(n, device=device) * 0.1 - math.log(vocab)
    adv = torch.randn(n, device=device)
    mask = torch.rand(n, device=device) > 0.3
    ref = old + 0.05 * torch.randn(n, device=device)
    return hidden, weight, labels, old, adv, mask, ref


def _ppo_loss_of_logits(x, labels, old, adv, mask, ref, *, temperature, ent_coef, kl_coef, dual_clip=None):
    """linear_ppo_loss's loss (k3 KL, clip 0.2) written out, in x's dtype; x the real-vocabulary logits.
    Returns (loss, logprobs · mask)."""
    out = algo.policy_loss_from_logits(x, labels, old, adv, mask, temperature=temperature, clip_eps=0.2,
                                       dual_clip=dual_clip, ent_coef=ent_coef, ref_logprobs=ref, kl_coef=kl_coef,
                                       kl_estimator="k3")
    return out.loss, out.logprobs


# ----------------------------------------------------------------------------
# 1. Device guard
# ----------------------------------------------------------------------------

def test_device_guard_is_a_no_op_on_cpu_and_selects_the_tensors_gpu(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with on_device_of(torch.ones(2, device="cpu")):                    # explicit: on CUDA the tests build on the GPU
        pass
    assert entered == []                                                # CPU: CUDA is never touched
    gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with on_device_of(gpu1):
        assert entered == [torch.device("cuda", 1)]


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records the guards active at each launch, then launches."""

    def __init__(self, kernel, active, launches):
        self.kernel, self.active, self.launches = kernel, active, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append(list(self.active))
            return launch(*args, **kwargs)
        return run


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs", "linear_ppo_loss"])
def test_every_triton_launch_runs_under_the_guard_of_its_input(monkeypatch, device, op):
    active, launches = [], []

    @contextlib.contextmanager
    def recording_guard(x):
        active.append(x.device)
        yield
        active.pop()

    for mod in (tl_mod, ppo_mod):
        monkeypatch.setattr(mod, "on_device_of", recording_guard)
    for mod, name in ((tl_mod, "_token_logprobs_fwd_kernel"), (tl_mod, "_token_logprobs_bwd_kernel"),
                      (ppo_mod, "_linear_ppo_loss_fwd_kernel")):
        monkeypatch.setattr(mod, name, _LaunchSpy(getattr(mod, name), active, launches))
    hidden, weight, labels, old, adv, mask, _ = _ppo_inputs(6, 8, 37, torch.float32, device)
    hidden.requires_grad_()
    if op == "token_logprobs":
        logits = (hidden @ weight.T).detach().requires_grad_()
        token_logprobs(logits, labels, return_entropy=True, backend="triton").entropy.sum().backward()
    elif op == "linear_token_logprobs":
        linear_token_logprobs(hidden, weight, labels, backend="triton").sum().backward()
    else:
        linear_ppo_loss(hidden, weight, labels, old, adv, mask, ent_coef=0.1, backend="triton").loss.backward()
    assert launches, "no kernel was launched"
    assert all(guards == [hidden.device] for guards in launches), launches


def _rl_math_calls(device):
    """The (B, T) ops: module, its kernels, and a call running all of them (forward and backward)."""
    b, t = 3, 11
    lp = torch.randn(b, t, device=device, requires_grad=True)
    ref, adv, ret = (torch.randn(b, t, device=device) for _ in range(3))
    val = torch.randn(b, t, device=device, requires_grad=True)
    mask = torch.rand(b, t, device=device) > 0.2

    def kl():
        kl_penalty(lp, ref, estimator="k3", backend="triton").sum().backward()

    def advantages():
        gae(ref, adv, mask, gamma=0.99, lam=0.95, backend="triton")

    def loss(big):
        def call():
            shape = (9, 65536) if big else (b, t)   # big: over 8 tiles (65536 entries under the interpreter): the reduce
            x = [torch.randn(shape, device=device) for _ in range(6)]
            x[0].requires_grad_()
            ppo_loss(*x, torch.ones(shape, dtype=torch.bool, device=device), backend="triton").loss.backward()
        return call

    return {
        "kl_penalty": ("kl_penalty", ("_kl_penalty_fwd_kernel", "_kl_penalty_bwd_kernel"), kl),
        "gae": ("gae", ("_gae_fwd_kernel",), advantages),
        "ppo_loss": ("ppo_loss", ("_ppo_loss_fwd_kernel", "_ppo_loss_bwd_kernel"), loss(False)),
        "ppo_loss_two_stage": ("ppo_loss", ("_ppo_loss_fwd_kernel", "_ppo_loss_reduce_kernel",
                                            "_ppo_loss_bwd_kernel"), loss(True)),
    }


@pytest.mark.parametrize("op", ["kl_penalty", "gae", "ppo_loss", "ppo_loss_two_stage"])
def test_every_rl_math_launch_runs_under_the_guard_of_its_input(monkeypatch, device, op):
    active, launches = [], []

    @contextlib.contextmanager
    def recording_guard(x):
        active.append(x.device)
        yield
        active.pop()

    module, kernels, call = _rl_math_calls(device)[op]
    mod = importlib.import_module(f"fastppo.kernels.{module}")
    monkeypatch.setattr(mod, "on_device_of", recording_guard)
    per_kernel = {}
    for name in kernels:
        per_kernel[name] = []
        monkeypatch.setattr(mod, name, _LaunchSpy(getattr(mod, name), active, per_kernel[name]))
    call()
    for name, seen in per_kernel.items():
        assert seen, f"{name} was not launched"
        # `device` may be "cuda" without an index; the guard gets the input's own device, cuda:0.
        assert all(guards == [torch.empty(0, device=device).device] for guards in seen), (name, seen)


# ----------------------------------------------------------------------------
# 2. Host syncs
# ----------------------------------------------------------------------------

def test_count_host_syncs_says_it_cannot_count_off_cuda():
    with count_host_syncs("cpu") as syncs:
        token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    assert syncs.count is None and "CUDA" in syncs.reason


def _meta_calls():
    """Each op, forward + backward, with every option that changes its code path."""
    d = torch.device("meta")
    n, size_h, vocab = 12, 8, 37

    def inputs():
        hidden = torch.randn(n, size_h, device=d, requires_grad=True)
        weight = torch.randn(vocab + 3, size_h, device=d, requires_grad=True)
        labels = torch.zeros(n, dtype=torch.long, device=d)
        return hidden, weight, labels

    def tl():
        logits = torch.randn(3, 4, vocab, device=d, dtype=torch.bfloat16, requires_grad=True)
        out = token_logprobs(logits, torch.zeros(3, 4, dtype=torch.long, device=d), temperature=0.7,
                             return_entropy=True, vocab_size=vocab - 2, backend="torch")
        (out.logprobs.sum() + out.entropy.sum()).backward()

    def ltl():
        hidden, weight, labels = inputs()
        out = linear_token_logprobs(hidden, weight, labels, return_entropy=True, vocab_size=vocab, backend="torch",
                                    chunk_size=5)
        (out.logprobs.sum() + out.entropy.sum()).backward()

    def ppo(normalizer):
        def call():
            hidden, weight, labels = inputs()
            z = torch.zeros(n, device=d)
            out = linear_ppo_loss(hidden, weight, labels, z, z, torch.ones(n, dtype=torch.bool, device=d),
                                  temperature=0.9, dual_clip=3.0, ent_coef=0.01, ref_logprobs=z, kl_coef=0.1,
                                  normalizer=normalizer, vocab_size=vocab, backend="torch", chunk_size=5)
            out.loss.backward()
        return call

    return {"token_logprobs": tl, "linear_token_logprobs": ltl, "linear_ppo_loss": ppo(None),
            "linear_ppo_loss_float_norm": ppo(100.0), "linear_ppo_loss_tensor_norm": ppo(torch.ones((), device=d))}


@pytest.mark.parametrize("name", list(_meta_calls()))
def test_gpu_paths_make_no_host_sync(name):
    """On the meta device a tensor has no data: any host read of one raises. The GPU
    paths (everything but CPU tensors) must run there, forward and backward."""
    _meta_calls()[name]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_keeps_the_value_error_naming_labels(backend):
    _skip_cpu_triton_without_interpreter(backend)
    with torch.device("cpu"):               # CPU tensors also on a CUDA machine, where the kernel tests build on the GPU
        logits, labels = torch.randn(3, 8), torch.tensor([0, 6, 2])
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
            token_logprobs(logits, labels, vocab_size=6, backend=backend)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
            linear_token_logprobs(torch.randn(3, 4), torch.randn(8, 4), labels, vocab_size=6, backend=backend)
        mask = torch.tensor([True, True, False])
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\) where mask is set"):
            linear_ppo_loss(torch.randn(3, 4), torch.randn(8, 4), labels, torch.zeros(3), torch.zeros(3), mask,
                            vocab_size=6, backend=backend)
        # Off the mask a bad label is fine.
        linear_ppo_loss(torch.randn(3, 4), torch.randn(8, 4), torch.tensor([0, 1, 7]), torch.zeros(3), torch.zeros(3),
                        mask, vocab_size=6, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_give_the_results_of_gathered_rows(monkeypatch, backend, dtype):
    """linear_ppo_loss computes every row, invalid ones masked, where it cannot afford the host
    sync that counts the valid tokens (GPUs): same logprobs and dhidden rows bitwise (every
    GEMM has the chunk's shape, a row's result does not depend on its neighbours), same
    statistics and dW up to float32 summation order, and garbage off the mask is harmless."""
    _skip_cpu_triton_without_interpreter(backend)
    n, size_h, vocab = 29, 16, 203
    hidden, weight, labels, old, adv, mask, ref = _ppo_inputs(n, size_h, vocab, dtype, n_rows_weight=vocab + 5)
    off = ~mask
    hidden[off] = float("nan")
    old[off], adv[off], ref[off] = float("nan"), float("inf"), float("nan")
    labels[off] = -7
    coefs = dict(temperature=0.9, dual_clip=3.0, ent_coef=0.01, kl_coef=0.1)
    kw = dict(ref_logprobs=ref, vocab_size=vocab, backend=backend, chunk_size=8, **coefs)

    def go():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_ppo_loss(h, w, labels, old, adv, mask, **kw)
        out.loss.backward()
        return out, h.grad, w.grad

    gathered = go()
    monkeypatch.setattr(ppo_mod, "compacts_rows", lambda device: False)
    masked = go()
    assert torch.equal(masked[0].logprobs, gathered[0].logprobs)
    assert torch.equal(masked[1], gathered[1])                          # 0 off the mask in both
    assert (masked[1][off] == 0).all() and torch.isfinite(masked[2]).all()
    # Sums of the same ≤ 29 float32 terms in another order: a few float32 ulps of the sum of magnitudes.
    for name in ("loss", "policy_loss", "entropy", "kl", "clipfrac", "approx_kl", "ratio_mean"):
        torch.testing.assert_close(getattr(masked[0], name), getattr(gathered[0], name), rtol=1e-5, atol=1e-6)
    # dW[v] = Σ_t dlogits[t, v]·h[t]: the same float32 products (dlogits rows are bitwise equal)
    # summed in another grouping, each sum within γ_n·Σ|products| (γ_n ≈ n·eps, n = 29 tokens;
    # Higham, Accuracy and Stability of Numerical Algorithms, §3.1), then rounded to the dtype
    # (where the two may land one ulp apart). Σ|products| from the float64 dlogits.
    x = F.linear(hidden[mask].double(), weight[:vocab].double()).requires_grad_()
    _ppo_loss_of_logits(x, labels[mask], old[mask], adv[mask], mask[mask], ref[mask], **coefs)[0].backward()
    products = x.grad.abs().T @ hidden[mask].double().abs()
    tol = 2.02 * n * torch.finfo(torch.float32).eps * products + torch.finfo(dtype).eps * gathered[2][:vocab].abs()
    assert ((masked[2][:vocab].double() - gathered[2][:vocab].double()).abs() <= tol).all()
    assert (masked[2][vocab:] == 0).all() and (gathered[2][vocab:] == 0).all()


# ----------------------------------------------------------------------------
# 3. dhidden of bf16 inputs at a large vocabulary
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["linear_token_logprobs", "linear_ppo_loss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dhidden_of_bf16_inputs_at_a_large_vocab(device, backend, op):
    """dhidden = dlogits @ W sums V terms. Within 2x the error of plain bf16 PyTorch
    (F.linear, float32 log-softmax, autograd) + a float32 atol, vs float64 (the
    flash-attention test criterion). On a GPU this is the check that the K = V
    reduction is not rounded to bf16 between split-K partial sums."""
    n, size_h, vocab = 24, 16, 65536 + 999
    hidden, weight, labels, old, adv, mask, _ = _ppo_inputs(n, size_h, vocab, torch.bfloat16, device)
    mask[:] = True
    g = torch.randn(n, device=device)

    def fused(h, w):
        if op == "linear_token_logprobs":
            return (linear_token_logprobs(h, w, labels, backend=backend) * g).sum()
        return linear_ppo_loss(h, w, labels, old, adv, mask, backend=backend).loss

    def plain(acc):
        """F.linear in the inputs' dtype, then the formulas in `acc` (float64: the oracle)."""
        def fn(h, w):
            logits = F.linear(h, w).to(acc)
            if op == "linear_token_logprobs":
                return (algo.token_logprobs(logits, labels).logprobs * g.to(acc)).sum()
            return algo.policy_loss_from_logits(logits, labels, old, adv, mask, clip_eps=0.2).loss
        return fn

    def dhidden(fn, dtype):
        h = hidden.to(dtype, copy=True).requires_grad_()
        fn(h, weight.to(dtype)).backward()
        return h.grad.double()

    got, base = dhidden(fused, torch.bfloat16), dhidden(plain(torch.float32), torch.bfloat16)
    want = dhidden(plain(torch.float64), torch.float64)
    err = (got - want).abs().max().item()
    budget = 2 * (base - want).abs().max().item() + 1e-5 * want.abs().max().item()
    assert err <= budget, f"dhidden max error {err:.3g} > 2 x plain bf16 error + atol = {budget:.3g}"


# ----------------------------------------------------------------------------
# 4. Chunk planning and peak memory
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("gb,want_rows", [(80, 3072), (141, MAX_CHUNK_ROWS)])
def test_chunk_rows_at_a_256k_vocab(gb, want_rows):
    """V = 256000, H = 8192, bf16 with float32-output GEMMs, Triton: the dW update
    dW += dlogitsᵀ h does 2·C·V·H FLOP for 8·V·H bytes of float32 accumulator
    traffic; C/4 FLOP per byte must clear the ridge point (H100 ~300, H200 ~185)."""
    vocab, size_h = 256000, 8192
    budget = gpu_chunk_budget_bytes(gb * 10 ** 9)
    per_row = bytes_per_chunk_row(vocab, size_h, torch.bfloat16, "triton", fp32_out=True)
    rows = rows_within(budget, per_row)
    assert rows == want_rows
    assert rows % CHUNK_ROW_QUANTUM == 0 and rows * per_row <= budget
    assert rows / 4 >= 2 * 300                                          # dW: compute-bound with margin
    # The old fixed 1 GiB gave 656 rows (5·128 + 16); it now rounds to whole GEMM tiles.
    assert rows_within(1 << 30, per_row) == 640
    peak = peak_extra_bytes(8192, vocab, size_h, torch.bfloat16, "triton", chunk=rows, fp32_out=True,
                            gathered_weight=True)
    # chunk + float32 dW accumulator + bf16 dW + bf16 dhidden + the gathered bf16 weight
    assert peak == rows * per_row + (4 + 2 + 2) * vocab * size_h + 2 * 8192 * size_h
    assert peak <= gb * 10 ** 9 // 3


def test_chunk_budget_bounds_and_small_row_counts():
    assert gpu_chunk_budget_bytes(8 * 10 ** 9) == 1 << 30                 # a small GPU keeps 1 GiB
    assert gpu_chunk_budget_bytes(10 ** 12) == 16 << 30                  # the ceiling
    per_row = bytes_per_chunk_row(32000, 512, torch.float32, "torch", fp32_out=False)
    assert rows_within(200 * per_row, per_row) == 128                    # tiles from 128 rows up
    assert rows_within(100 * per_row, per_row) == 96                     # then multiples of 16
    assert rows_within(7 * per_row, per_row) == 7
    assert rows_within(per_row // 2, per_row) == 1                       # never 0
    assert rows_within(10 ** 15, per_row) == MAX_CHUNK_ROWS


def test_chunk_does_not_depend_on_the_number_of_rows():
    """A call with few rows pays a whole chunk of GEMM rows: the price of a row's result
    not depending on the batch (rollout and training logprobs agree bitwise)."""
    weight = torch.randn(1000, 32)
    plans = {n: ppo_mod.chunk_plan(torch.randn(n, 32), weight, "torch", None) for n in (1, 100, 5000)}
    assert len({p.chunk for p in plans.values()}) == 1


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from fastppo.kernels import linear_token_logprobs
    from fastppo.kernels.linear_token_logprobs import chunk_rows, peak_extra_bytes
    from fastppo.memory import peak_host_extra_bytes

    n, size_h, vocab, dtype = 64, 512, 32000, getattr(torch, sys.argv[1])
    hidden = torch.randn(n, size_h).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, size_h) / size_h ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,))

    def fn():
        lp, ent = linear_token_logprobs(hidden, weight, labels, return_entropy=True, backend="torch")
        (lp.sum() + ent.sum()).backward()
        hidden.grad = weight.grad = None  # counted in the peak, gone before the next call

    fn()  # warm-up: lazy initialisation allocates too
    chunk = chunk_rows(vocab, size_h, dtype, torch.device("cpu"), "torch")
    print(json.dumps({"measured": peak_host_extra_bytes(fn),
                      "formula": peak_extra_bytes(n, vocab, size_h, dtype, "torch", chunk=chunk, fp32_out=False)}))
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_documented_peak_memory_matches_a_measured_peak(dtype):
    """Forward + backward on CPU with an 8 MB chunk budget and a (V, H) weight of 16M
    entries, so that the weight-sized terms (float32 dW accumulator, bf16 dW, the
    float32 copy of a bf16 weight) dominate: the formula must cover the measured
    peak and not overstate it (each term it counts is live at the same time)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPPO_POISON_OUTPUTS", "FASTPPO_BACKEND")}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", FASTPPO_LINEAR_CHUNK_MB="8", TRITON_INTERPRET="0",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, dtype], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    # Slack: (N,)-sized statistics, page and allocator granularity, BLAS workspace.
    assert peak["measured"] <= peak["formula"] + (8 << 20), peak
    assert peak["measured"] >= 0.85 * peak["formula"], peak


# ----------------------------------------------------------------------------
# 5. vocab_size: alignment padding of the vocabulary
# ----------------------------------------------------------------------------

def _within(name, got, want, plain, atol):
    err = (got - want).abs().max().item()
    budget = 2 * (plain - want).abs().max().item() + atol
    assert err <= budget, f"{name}: max error {err:.3g} > 2 x plain error + atol = {budget:.3g}"


def _check(names, got, want, plain, dtype):
    """Against float64, within 2x plain PyTorch's error (the same formulas in the input dtype /
    float32) + atol: 1e-5 relative (float32 reductions over ≤ 1100 terms), plus one ulp of the
    dtype (gradients are stored in it; the interpreter truncates bf16 stores instead of rounding)."""
    for name, g, w, p in zip(names, got, want, plain):
        scale = w.abs().max().item()
        _within(name, g.double(), w, p.double(), 1e-5 * (1 + scale) + torch.finfo(dtype).eps * scale)


VOCAB_CASES = [(1003, 1024, torch.float32), (1003, 1024, torch.bfloat16), (61, 128, torch.float32)]


@pytest.mark.parametrize("vocab,padded,dtype", VOCAB_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_vocab_size(device, backend, vocab, padded, dtype):
    temperature = 0.8
    # (2, 7) rows, read through a column slice of a wider buffer: the padded row stride is kept.
    buf = torch.randn(2, 7, padded + 9, device=device) * 3
    logits = buf[..., :padded].to(dtype)
    labels = torch.randint(0, vocab, (2, 7), device=device)
    labels[1, 3] = IGNORE
    g_lp, g_ent = torch.randn(2, 7, device=device), torch.randn(2, 7, device=device)

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        lp, ent = fn(x)
        (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    got = run(lambda x: token_logprobs(x, labels, temperature=temperature, return_entropy=True, vocab_size=vocab,
                                       backend=backend), logits)
    want = run(lambda x: algo.token_logprobs(x[..., :vocab], labels, temperature=temperature), logits.double())
    plain = run(lambda x: algo.token_logprobs(x[..., :vocab].float(), labels, temperature=temperature), logits)
    assert (got[2][..., vocab:] == 0).all(), "padding columns must get exactly zero gradient"
    assert got[2].dtype == dtype
    _check(("logprobs", "entropy", "dlogits"), (got[0], got[1], got[2][..., :vocab]),
           (want[0], want[1], want[2][..., :vocab]), (plain[0], plain[1], plain[2][..., :vocab]), dtype)
    # vocab_size = V is None.
    full = token_logprobs(logits, labels, return_entropy=True, vocab_size=padded, backend=backend)
    none = token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert torch.equal(full.logprobs, none.logprobs) and torch.equal(full.entropy, none.entropy)


def _linear_case(device, vocab, padded, dtype, size_h=40, n=19):
    hidden = torch.randn(n, size_h, device=device).to(dtype)
    weight = (torch.randn(padded, size_h, device=device) * 3 / math.sqrt(size_h)).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device)
    return hidden, weight, labels


def _grads(fn, hidden, weight):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    outs = fn(h, w)
    return [o.detach() for o in outs[1:]] + [h.grad, w.grad]


def _check_padded(names, fused, formula, hidden, weight, vocab, dtype):
    """The fused op against the formula on the first `vocab` rows (float64 oracle, float32 plain budget); the
    padding rows of the weight get exactly zero gradient."""
    got = _grads(fused, hidden, weight)
    want = _grads(formula(torch.float64), hidden.double(), weight.double())
    plain = _grads(formula(torch.float32), hidden, weight)
    assert (got[3][vocab:] == 0).all(), "padding rows of the weight must get exactly zero gradient"
    _check(names, got[:3] + [got[3][:vocab]], want[:3] + [want[3][:vocab]], plain[:3] + [plain[3][:vocab]], dtype)


@pytest.mark.parametrize("vocab,padded,dtype", VOCAB_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_vocab_size(device, backend, vocab, padded, dtype):
    temperature = 0.9
    hidden, weight, labels = _linear_case(device, vocab, padded, dtype)
    labels[4] = IGNORE
    g_lp, g_ent = torch.randn(len(labels), device=device), torch.randn(len(labels), device=device)

    def loss_of(lp, ent):
        return (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum()

    def fused(h, w):
        lp, ent = linear_token_logprobs(h, w, labels, temperature=temperature, return_entropy=True,
                                        vocab_size=vocab, backend=backend, chunk_size=8)
        loss = loss_of(lp, ent)
        loss.backward()
        return loss, lp, ent

    def formula(acc):
        def fn(h, w):
            lp, ent = algo.token_logprobs(F.linear(h, w[:vocab]).to(acc), labels, temperature=temperature)
            loss = loss_of(lp, ent)
            loss.backward()
            return loss, lp, ent
        return fn

    _check_padded(("logprobs", "entropy", "dhidden", "dweight"), fused, formula, hidden, weight, vocab, dtype)


@pytest.mark.parametrize("vocab,padded,dtype", VOCAB_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_ppo_loss_vocab_size(device, backend, vocab, padded, dtype):
    temperature, ent_coef, kl_coef = 0.9, 0.01, 0.1
    hidden, weight, labels = _linear_case(device, vocab, padded, dtype)
    n = len(labels)
    mask = torch.rand(n, device=device) > 0.25
    adv = torch.randn(n, device=device)
    # Old and reference logprobs near the current ones: ratios on both sides of the clip range.
    with torch.no_grad():
        lp0 = algo.token_logprobs(F.linear(hidden.double(), weight[:vocab].double()), labels,
                                    temperature=temperature).logprobs.float()
    old = lp0 + 0.3 * torch.randn(n, device=device)
    ref = lp0 + 0.1 * torch.randn(n, device=device)

    def fused(h, w):
        out = linear_ppo_loss(h, w, labels, old, adv, mask, temperature=temperature, ent_coef=ent_coef,
                              ref_logprobs=ref, kl_coef=kl_coef, vocab_size=vocab, backend=backend, chunk_size=8)
        out.loss.backward()
        return out.loss, out.loss, out.logprobs

    def formula(acc):
        def fn(h, w):
            loss, lp = _ppo_loss_of_logits(F.linear(h, w[:vocab]).to(acc), labels, old, adv, mask, ref,
                                           temperature=temperature, ent_coef=ent_coef, kl_coef=kl_coef)
            loss.backward()
            return loss, loss, lp
        return fn

    _check_padded(("loss", "logprobs", "dhidden", "dweight"), fused, formula, hidden, weight, vocab, dtype)


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (1025, ValueError), (2.0, TypeError), (True, TypeError)])
def test_vocab_size_errors_name_it(bad, exc):
    with pytest.raises(exc, match="vocab_size"):
        token_logprobs(torch.randn(2, 1024), torch.tensor([0, 1]), vocab_size=bad)
    with pytest.raises(exc, match="vocab_size"):
        linear_token_logprobs(torch.randn(2, 4), torch.randn(1024, 4), torch.tensor([0, 1]), vocab_size=bad)
    with pytest.raises(exc, match="vocab_size"):
        linear_ppo_loss(torch.randn(2, 4), torch.randn(1024, 4), torch.tensor([0, 1]), torch.zeros(2),
                        torch.zeros(2), torch.ones(2, dtype=torch.bool), vocab_size=bad)


# ----------------------------------------------------------------------------
# 6. On CUDA (skipped elsewhere): no host sync, the second GPU
# ----------------------------------------------------------------------------

def _cuda_calls(device, backend):
    """Each op's forward + backward on `device`, from the same inputs whatever the device; returns the gradients."""
    torch.manual_seed(0)
    inputs = _ppo_inputs(64, 32, 1003, torch.bfloat16, n_rows_weight=1024)
    hidden, weight, labels, old, adv, mask, ref = (x.to(device) for x in inputs)
    vocab = 1003

    def tl():
        logits = (hidden @ weight.T).requires_grad_()
        token_logprobs(logits, labels, return_entropy=True, vocab_size=vocab, backend=backend).entropy.sum().backward()
        return [logits.grad]

    def ltl():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        linear_token_logprobs(h, w, labels, vocab_size=vocab, backend=backend).sum().backward()
        return [h.grad, w.grad]

    def ppo():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        linear_ppo_loss(h, w, labels, old, adv, mask, ent_coef=0.01, ref_logprobs=ref, kl_coef=0.1,
                        vocab_size=vocab, backend=backend).loss.backward()
        return [h.grad, w.grad]

    return {"token_logprobs": tl, "linear_token_logprobs": ltl, "linear_ppo_loss": ppo}


@pytest.mark.skipif(not CUDA, reason="needs CUDA (and TRITON_INTERPRET=0)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["token_logprobs", "linear_token_logprobs", "linear_ppo_loss"])
def test_cuda_ops_make_no_host_sync(backend, name):
    call = _cuda_calls(torch.device("cuda"), backend)[name]
    call()                                                              # warm-up: compile, probe, allocate
    torch.cuda.synchronize()
    with count_host_syncs("cuda") as syncs:
        call()
    assert syncs.count == 0, f"{name} ({backend}): {syncs.count} host syncs per call"


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", ["token_logprobs", "linear_token_logprobs", "linear_ppo_loss"])
def test_cuda_second_device_while_the_first_is_current(name):
    """Triton launches on the current device: with cuda:0 current, tensors on cuda:1 must still
    give cuda:0's results (same GPU model, same kernels)."""
    torch.cuda.set_device(0)
    want = _cuda_calls(torch.device("cuda", 0), "triton")[name]()
    got = _cuda_calls(torch.device("cuda", 1), "triton")[name]()
    assert torch.cuda.current_device() == 0
    for g, w in zip(got, want):
        assert g.device == torch.device("cuda", 1)
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0)
