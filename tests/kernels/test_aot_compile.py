"""Every @triton.jit kernel in fastppo.kernels compiles for sm_80 and sm_90 with
triton's own compiler, without register spills (STACK and LOCAL 0), and the
bandwidth-bound ones issue 128-bit global loads where alignment allows them.
No GPU needed (see fastppo_testing/aot.py).

The cases are not written by hand: the public ops run on small CPU inputs shaped
like the real cases (odd and even vocabularies and lengths, the trainer's
configuration, the GPU plan of the linear ops) while `record_launches` catches
what their launchers would launch on a GPU: kernel, argument types, alignment
hints, constexprs and num_warps. A kernel that no scenario launches fails
`test_every_kernel_has_a_case`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
from contextlib import contextmanager

import pytest
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

import fastppo.kernels
from fastppo.config import ppo_max
from fastppo.kernels import gae, kl_penalty, linear_ppo_loss, linear_token_logprobs, ppo_loss, sample, token_logprobs
from fastppo_testing.aot import compile_cases, record_launches
from fastppo_testing.sass import budget, per_element, streamed_bytes

SMS = (80, 90)
V_EVEN, V_ODD = 32000, 32001          # Llama's vocabulary, and one whose rows cannot be 16-byte aligned
TRAINER = ppo_max()                   # the configuration the trainer passes to the ops


# ----------------------------------------------------------------------------
# Scenarios: public ops on CPU inputs shaped like the real cases
# ----------------------------------------------------------------------------

def _token_logprobs(dtype, vocab, entropy=True):
    logits = torch.randn(4, vocab, dtype=dtype, requires_grad=True)
    out = token_logprobs(logits, torch.randint(0, vocab, (4,)), temperature=TRAINER.rollout.temperature,
                         return_entropy=entropy, backend="triton")
    (out.logprobs.sum() + out.entropy.sum() if entropy else out.sum()).backward()


@contextmanager
def _gpu_gemm_plan():
    """The linear ops' plan on a GPU with half inputs: cuBLAS GEMMs with float32 output (exact logits), dlogits
    rounded to the input dtype. CPU builds lack those GEMMs: here they compute in float32 (values do not matter,
    nothing is launched for real)."""
    mm, addmm = torch.mm, torch.addmm

    def mm_out_dtype(a, b, *dtype, out=None, out_dtype=None):
        return mm(a.float(), b.float(), out=out) if dtype or out_dtype else mm(a, b, out=out)

    def addmm_out_dtype(acc, a, b, *dtype, out=None, out_dtype=None, **kw):
        if dtype or out_dtype:
            return addmm(acc, a.float(), b.float(), out=out, **kw)
        return addmm(acc, a, b, out=out, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.import_module("fastppo.kernels.linear_token_logprobs"), "_has_fp32_out_gemm",
                   lambda device, dtype: dtype != torch.float32)
        mp.setattr(torch, "mm", mm_out_dtype)
        mp.setattr(torch, "addmm", addmm_out_dtype)
        yield


def _linear_inputs(dtype, vocab, n=24, size_h=64):
    hidden = torch.randn(n, size_h, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, size_h, dtype=dtype, requires_grad=True)
    return hidden, weight, torch.randint(0, vocab, (n,))


def _linear_token_logprobs(dtype, vocab):
    hidden, weight, labels = _linear_inputs(dtype, vocab)
    with _gpu_gemm_plan():
        out = linear_token_logprobs(hidden, weight, labels, temperature=TRAINER.rollout.temperature,
                                    return_entropy=True, backend="triton", chunk_size=16)
        (out.logprobs.sum() + out.entropy.sum()).backward()


def _linear_fused(dtype, vocab):
    """linear_token_logprobs' fused kernels: the forward (GEMM tiles with the row statistics in the epilogue)
    and the backward's dlogits (GEMM tiles with the gradient in the epilogue)."""
    hidden, weight, labels = _linear_inputs(dtype, vocab)
    with _gpu_gemm_plan(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTPPO_LINEAR_FUSED", "1")
        out = linear_token_logprobs(hidden, weight, labels, temperature=TRAINER.rollout.temperature,
                                    return_entropy=True, backend="triton", chunk_size=16)
        (out.logprobs.sum() + out.entropy.sum()).backward()


def _linear_ppo_loss(dtype, vocab, *, trainer=True):
    hidden, weight, labels = _linear_inputs(dtype, vocab)
    n = labels.numel()
    old, adv, mask = -torch.rand(n) * 3, torch.randn(n), torch.rand(n) < 0.8
    pc = TRAINER.ppo
    if trainer:       # fastppo.ppo: temperature, clip_eps, dual_clip, ent_coef and a token-count normalizer
        kw = dict(temperature=TRAINER.rollout.temperature, clip_eps=pc.clip_eps, dual_clip=pc.dual_clip,
                  ent_coef=pc.ent_coef, normalizer=mask.sum().float())
    else:             # every other switch: dual clip, clip-higher, a policy weight, entropy bonus, KL to a reference
        kw = dict(temperature=1.0, dual_clip=3.0, clip_eps_high=0.28, policy_weight=torch.rand(n), ent_coef=0.01,
                  ref_logprobs=old - 0.1, kl_coef=0.05, kl_estimator="abs")
    with _gpu_gemm_plan():
        linear_ppo_loss(hidden, weight, labels, old, adv, mask, backend="triton", chunk_size=16, **kw).loss.backward()


def _kl_penalty(dtype, length, estimator, clamp, grad):
    lp = torch.randn(8, length, dtype=dtype, requires_grad=grad)
    out = kl_penalty(lp, torch.randn(8, length, dtype=dtype, requires_grad=grad), estimator=estimator,
                     clamp=clamp, backend="triton")
    if grad:
        out.sum().backward()


def _gae(dtype, length, rows=8, lam=TRAINER.advantage.lam):
    rewards, values = torch.randn(rows, length, dtype=dtype), torch.randn(rows, length, dtype=dtype)
    gae(rewards, values, torch.rand(rows, length) < 0.8, gamma=TRAINER.advantage.gamma, lam=lam, backend="triton")


def _ppo_loss(dtype, rows, length, *, trainer=True):
    shape = (rows, length)
    lp = torch.randn(shape, dtype=dtype, requires_grad=True)
    values = torch.randn(shape, dtype=dtype, requires_grad=True)
    others = [torch.randn(shape, dtype=dtype) for _ in range(4)]
    mask = torch.rand(shape) < 0.8
    pc = TRAINER.ppo
    if trainer:       # fastppo.ppo: its clip settings and the minibatch token count as a tensor normalizer
        kw = dict(clip_eps=pc.clip_eps, value_clip=pc.value_clip, vf_coef=pc.vf_coef, dual_clip=pc.dual_clip,
                  normalizer=mask.sum().float())
    else:             # the other switches: no value clip, dual clip, clip-higher, a policy weight
        kw = dict(value_clip=None, dual_clip=3.0, normalizer=None, clip_eps_high=0.28,
                  policy_weight=torch.rand(shape, dtype=dtype))
    out = ppo_loss(lp, others[0], others[1], values, others[2], others[3], mask, backend="triton", **kw)
    out.loss.backward()


R = TRAINER.rollout.max_new_tokens     # the trainer's (B, R) response length
SCENARIOS = {
    "token_logprobs[bf16,V=32000]": lambda: _token_logprobs(torch.bfloat16, V_EVEN),
    "token_logprobs[fp16,V=32000,logprobs only]": lambda: _token_logprobs(torch.float16, V_EVEN, entropy=False),
    "token_logprobs[fp32,V=32001]": lambda: _token_logprobs(torch.float32, V_ODD),
    "linear_token_logprobs[bf16 GPU plan,V=32000]": lambda: _linear_token_logprobs(torch.bfloat16, V_EVEN),
    "linear_token_logprobs[fused,bf16,V=32000]": lambda: _linear_fused(torch.bfloat16, V_EVEN),
    "linear_token_logprobs[fused,fp32,V=32001]": lambda: _linear_fused(torch.float32, V_ODD),
    "linear_ppo_loss[trainer,bf16 GPU plan,V=32000]": lambda: _linear_ppo_loss(torch.bfloat16, V_EVEN),
    "linear_ppo_loss[all terms,fp32,V=32001]": lambda: _linear_ppo_loss(torch.float32, V_ODD, trainer=False),
    "kl_penalty[trainer,fp32,T=R]": lambda: _kl_penalty(
        torch.float32, R, TRAINER.reward.kl_estimator, TRAINER.reward.kl_clamp, grad=False),
    "kl_penalty[bf16,k3,clamp,T=1024]": lambda: _kl_penalty(torch.bfloat16, 1024, "k3", 0.5, grad=True),
    "gae[trainer,fp32,T=R]": lambda: _gae(torch.float32, R),
    "gae[bf16,T=8192]": lambda: _gae(torch.bfloat16, 8192),
    "gae[fp32,T=1]": lambda: _gae(torch.float32, 1, rows=4096),
    "gae[fp32,two scans,T=8192]": lambda: _gae(torch.float32, 8192, lam=0.3),
    "ppo_loss[trainer,fp32,4xR]": lambda: _ppo_loss(torch.float32, 4, R),
    "ppo_loss[bf16,dual clip,64x1001]": lambda: _ppo_loss(torch.bfloat16, 64, 1001, trainer=False),
    **{f"sample[{name}]": lambda d=d, v=v, k=k, p=p: sample(  # the generator's float32 logits; bf16; no filter
        torch.randn(4, v, dtype=d), seed=7, sample_ids=torch.arange(4), step=3, temperature=0.8, top_k=k, top_p=p,
        backend="triton") for name, d, v, k, p in (("fp32,top-k,top-p,V=32000", torch.float32, V_EVEN, 50, 0.9),
                                                   ("bf16,top-k,top-p,V=32001", torch.bfloat16, V_ODD, 50, 0.9),
                                                   ("bf16,top-p,V=32001", torch.bfloat16, V_ODD, 0, 0.9),
                                                   ("bf16,top-p,V=32000", torch.bfloat16, V_EVEN, 0, 0.9),
                                                   ("fp32,V=32000", torch.float32, V_EVEN, 0, 1.0))},
    "sample[fp32,top-p,a step per row,V=32000]": lambda: sample(    # the static engine's call (stride 1)
        torch.randn(4, V_EVEN), seed=7, sample_ids=torch.arange(4), step=torch.arange(4), temperature=0.8,
        top_p=0.9, backend="triton"),
}


def _short(kernel: str) -> str:
    return kernel.split(":")[1].strip("_").removesuffix("_kernel")


def _record_cases():
    """One case per distinct launch, named after the first scenario that makes it."""
    cases, seen = [], set()
    torch.manual_seed(0)
    for scenario, run in SCENARIOS.items():
        with record_launches() as launches:
            run()
        assert launches, f"scenario {scenario} launched no kernel"
        for launch in launches:
            if launch not in seen:
                seen.add(launch)
                cases.append(launch.case(f"{scenario}:{_short(launch.kernel)}"))
    names = [c.name for c in cases]
    return [c if names.count(c.name) == 1 else
            type(c)(**{**c.__dict__, "name": f"{c.name}#{i}"}) for i, c in enumerate(cases)]


CASES = _record_cases()

# The bandwidth-bound kernels stream rows of logits or (B, T) tiles: their SASS must hold 128-bit loads when
# alignment allows them, i.e. when the streamed pointers are 16-byte aligned and n_cols and their row strides
# are multiples of 16 (Triton's divisibility hints; with V = 32001 or an odd T no load can be wider than one
# element, so those cases are only held to "compiles, no spills"). Per kernel: the arguments that decide it.
# gae reads its rows backwards (descending addresses never form a vector) and the reduce kernel reads a few
# floats: neither is bound by bandwidth.
_PPO_ROWS = ("lp_ptr", "old_lp_ptr", "adv_ptr", "val_ptr", "old_val_ptr", "ret_ptr", "mask_ptr", "n_cols",
             "stride_lm", "stride_om", "stride_am", "stride_vm", "stride_wm", "stride_rm", "stride_mm")
STREAMING = {f"fastppo.kernels.{kernel}": args for kernel, args in {
    "token_logprobs:_token_logprobs_fwd_kernel": ("logits_ptr", "n_cols", "stride_lm"),
    "token_logprobs:_token_logprobs_bwd_kernel": ("logits_ptr", "dlogits_ptr", "n_cols", "stride_lm", "stride_dm"),
    "linear_ppo_loss:_linear_ppo_loss_fwd_kernel": ("logits_ptr", "dlogits_ptr", "n_cols", "stride_lm",
                                                    "stride_dm"),
    "kl_penalty:_kl_penalty_fwd_kernel": ("lp_ptr", "ref_ptr", "out_ptr", "n_cols", "stride_lm", "stride_rm",
                                          "stride_om"),
    "kl_penalty:_kl_penalty_bwd_kernel": ("lp_ptr", "ref_ptr", "dlp_ptr", "dref_ptr", "n_cols", "stride_lm",
                                          "stride_rm", "stride_dm"),
    "ppo_loss:_ppo_loss_fwd_kernel": _PPO_ROWS,
    "ppo_loss:_ppo_loss_bwd_kernel": (*_PPO_ROWS, "dlp_ptr", "dval_ptr", "stride_dm"),
}.items()}

# Per-element pointers of each kernel, for its bandwidth budget of instructions (fastppo_testing/sass.py): the
# streaming kernels' and the sampler's logits (one pass over them, or one chunk) and gae's five (B, T) tensors.
STREAMED = {**STREAMING,
            "fastppo.kernels.sampler:_sample_stats_kernel": ("logits_ptr",),
            "fastppo.kernels.sampler:_sample_check_kernel": ("logits_ptr",),
            "fastppo.kernels.sampler:_sample_final_kernel": ("logits_ptr",),
            "fastppo.kernels.sampler:_sample_pick_kernel": ("logits_ptr",),
            "fastppo.kernels.gae:_gae_fwd_kernel": ("rewards_ptr", "values_ptr", "mask_ptr", "adv_ptr", "ret_ptr")}


def _alignment_allows_wide_loads(case) -> bool:
    """Every deciding argument is 16-divisible, or the constant 1 (a unit stride)."""
    return all(n in case.divisible_by_16 or case.constexprs.get(n) == 1 for n in STREAMING[case.kernel])


for _case in CASES:
    _case.wide_loads = _case.kernel in STREAMING and _alignment_allows_wide_loads(_case)

# Device functions (@triton.jit helpers that return values: scan combine
# functions, the per-token math of kernels/_math.py) cannot be compiled on their
# own; they are compiled inside the kernels that call them. Kernels are named
# `_<op>_<pass>_kernel`; every other @triton.jit function is a device function.


@pytest.fixture(scope="module")
def compiled():
    return compile_cases(CASES, SMS)


@pytest.mark.parametrize("sm", SMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiles_without_spills(compiled, case, sm):
    result = compiled[(case.name, sm)]
    assert result.error is None, f"{case.name} does not compile for sm_{sm}: {result.error}"
    assert result.spills == 0 and result.local == 0, f"{case.name} spills on sm_{sm}: {result}"
    if case.wide_loads:
        assert "LDG.E.128" in result.loads, f"{case.name} on sm_{sm} has no 128-bit loads: {result.loads}"


@pytest.mark.parametrize("kernel", ["linear_logprobs_fwd", "linear_logprobs_bwd"])
@pytest.mark.parametrize("sm,mma", [(80, "HMMA."), (90, "HGMMA.")])
def test_fused_lm_head_kernels_run_on_the_tensor_cores(compiled, sm, mma, kernel):
    """linear_token_logprobs' fused kernels with half operands: their tl.dot compiles to the SM's tensor-core
    instructions (wgmma on sm_90)."""
    names = [c.name for c in CASES if c.name.split("#")[0] == f"linear_token_logprobs[fused,bf16,V=32000]:{kernel}"]
    assert names
    for name in names:
        result = compiled[(name, sm)]
        assert any(m.startswith(mma) and m.endswith(".F32.BF16") for m in result.mma), (name, result.mma)


def test_recorded_cases_are_the_real_ones():
    """The scenarios reach what matters on a GPU: GPU block sizes and warps, odd V and T, BLOCK_T = 1, the
    float32-logits -> bf16-dlogits backward of the linear GPU plan, the trainer's linear_ppo_loss switches,
    the two-stage ppo_loss reduction, the policy losses with and without a policy weight; and every
    streaming kernel has an aligned case held to 128-bit loads."""
    by_kernel = {}
    for c in CASES:
        by_kernel.setdefault(_short(c.kernel), []).append(c)
    assert {c.constexprs["BLOCK_T"] for c in by_kernel["gae_fwd"]} >= {1, 1024}
    assert {c.constexprs["BLOCK_M"] for c in by_kernel["gae_fwd"]} >= {1, 512}
    assert {c.constexprs["ONE_SCAN"] for c in by_kernel["gae_fwd"]} == {False, True}
    assert all(c.constexprs["BLOCK_V"] <= 4096 for c in by_kernel["token_logprobs_fwd"])   # not the interpreter's
    assert any(c.signature["logits_ptr"] == "*fp32" and c.signature["dlogits_ptr"] == "*bf16"
               for c in by_kernel["token_logprobs_bwd"])
    trainer = [c for c in by_kernel["linear_ppo_loss_fwd"] if c.name.startswith("linear_ppo_loss[trainer")]
    assert trainer and trainer[0].constexprs["HAS_DUAL_CLIP"] == (TRAINER.ppo.dual_clip is not None)
    assert not trainer[0].constexprs["HAS_REF"] and trainer[0].signature["dlogits_ptr"] == "*bf16"
    assert "ppo_loss_reduce" in by_kernel
    assert all(c.constexprs["BLOCK_S"] == c.constexprs["BLOCK_V"] for c in by_kernel["sample_final"])  # one block
    for kernel in ("ppo_loss_fwd", "ppo_loss_bwd", "linear_ppo_loss_fwd"):      # the policy weight's loads
        assert {c.constexprs["HAS_WEIGHT"] for c in by_kernel[kernel]} == {False, True}, kernel
    assert any(not _alignment_allows_wide_loads(c) for c in CASES if c.kernel in STREAMING)   # odd V and T
    for kernel in STREAMING:
        assert any(c.wide_loads for c in CASES if c.kernel == kernel), f"{kernel}: no aligned case"


def _all_jit_kernels():
    kinds = (triton.runtime.JITFunction, InterpretedFunction)
    found = {}
    for info in pkgutil.iter_modules(fastppo.kernels.__path__):
        module = importlib.import_module(f"fastppo.kernels.{info.name}")
        for name, obj in vars(module).items():
            # Defined here, not imported: the wrapped function's module (the interpreter's wrapper has its own).
            if isinstance(obj, kinds) and obj.fn.__module__ == module.__name__:
                found[f"{module.__name__}:{name}"] = module
    return found


def _is_kernel(name: str) -> bool:
    return name.endswith("_kernel")


def test_every_kernel_has_a_case():
    missing = {k for k in _all_jit_kernels() if _is_kernel(k)} - {c.kernel for c in CASES}
    assert not missing, f"kernels without an AOT compile case (add a scenario): {sorted(missing)}"


def _names_used_by(fn) -> set[str]:
    """The names a @triton.jit function's body refers to (calls, and functions passed on, e.g. to a scan)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def test_every_device_function_is_compiled_inside_a_kernel():
    """A device function is only checked through the kernels that use it (directly or through another device
    function): each must be reached from one."""
    jit = {name: getattr(module, name.split(":")[1]) for name, module in _all_jit_kernels().items()}
    assert sum(_is_kernel(k) for k in jit) >= 7 and len(jit) > sum(_is_kernel(k) for k in jit)
    used = set().union(*(_names_used_by(fn) for fn in jit.values()))
    unused = [k for k in jit if not _is_kernel(k) and k.split(":")[1] not in used]
    assert not unused, f"device functions no kernel uses: {unused}"


def test_no_reverse_scan():
    """Compiled Triton has had wrong results from reverse associative scans with non-commutative combine
    functions; the kernels scan forwards (gae reads its rows backwards instead)."""
    modules = set(_all_jit_kernels().values())
    offenders = [m.__name__ for m in modules if "reverse=True" in inspect.getsource(m)]
    assert not offenders, f"reverse scans in {offenders}"


# The kernels held to their bandwidth budget of instructions on sm_90 (fastppo_testing/sass.py: issue rate
# over copy bandwidth, ~8.1 thread-instructions per byte on an H200; bf16 forward ~16 per element): the row
# kernels, the sampler's passes over a row (its final kernel's with a filter: the threshold searches and the
# chunks' kept mass) and its draw in one chunk, and gae (its scans included; at T = 1 the row loop compiles
# away and the whole kernel counts).
ROW_KERNELS = ("fastppo.kernels.token_logprobs:_token_logprobs_fwd_kernel",
               "fastppo.kernels.token_logprobs:_token_logprobs_bwd_kernel",
               "fastppo.kernels.sampler:_sample_stats_kernel", "fastppo.kernels.sampler:_sample_check_kernel",
               "fastppo.kernels.sampler:_sample_final_kernel")
BUDGET_KERNELS = (*ROW_KERNELS, "fastppo.kernels.sampler:_sample_pick_kernel", "fastppo.kernels.gae:_gae_fwd_kernel")


def draws_only(case) -> bool:
    """A program per row that reads one chunk (BLOCK_V tokens) and draws in it, without a loop: the sampler's
    pick kernel, and its final kernel without a filter."""
    if case.kernel == "fastppo.kernels.sampler:_sample_final_kernel":
        return not (case.constexprs["HAS_TOP_K"] or case.constexprs["HAS_TOP_P"])
    return case.kernel == "fastppo.kernels.sampler:_sample_pick_kernel"


@pytest.mark.parametrize("case", [c for c in CASES if c.kernel in BUDGET_KERNELS],
                         ids=lambda c: c.name)
def test_kernels_within_bandwidth_budget(compiled, case):
    result = compiled[(case.name, 90)]
    assert result.error is None, result.error
    if case.kernel in ROW_KERNELS and not draws_only(case):
        assert result.n_loops >= 1, f"{case.name}: no loop over the row found in its SASS"
    n_bytes = streamed_bytes(case.signature, STREAMED[case.kernel])
    instructions, mufu = budget(n_bytes)
    got = per_element(result.hot_loop, case.num_warps, case.constexprs)
    got_mufu = per_element(result.hot_loop_mufu, case.num_warps, case.constexprs)
    assert got <= instructions, (f"{case.name}: {got:.1f} SASS instructions per element on sm_90 > budget "
                                 f"{instructions:.1f} ({n_bytes} bytes per element)")
    assert got_mufu <= mufu, f"{case.name}: {got_mufu:.2f} MUFU per element > budget {mufu:.2f}"
