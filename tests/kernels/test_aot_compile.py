"""Every @triton.jit kernel in fastppo.kernels compiles for sm_80 and sm_90 with
triton's own compiler, without register spills (STACK and LOCAL 0), and the
bandwidth-bound ones issue 128-bit global loads. No GPU needed (see
fastppo_testing/aot.py). A kernel added to fastppo.kernels without a case here
fails `test_every_kernel_has_a_case`.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import triton
from triton.runtime.interpreter import InterpretedFunction

import fastppo.kernels
from fastppo_testing.aot import AotCase, compile_cases

SMS = (80, 90)
TLP = "fastppo.kernels.token_logprobs"


def _tlp_fwd(dtype):
    return AotCase(
        f"token_logprobs_fwd[{dtype}]", f"{TLP}:_token_logprobs_fwd_kernel",
        {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32",
         "lse_ptr": "*fp32", "n_cols": "i32", "stride_lm": "i64", "stride_lv": "constexpr",
         "stride_label": "constexpr", "temperature": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr"},
        {"stride_lv": 1, "stride_label": 1, "BLOCK_V": 4096}, num_warps=8,
        divisible_by_16=("logits_ptr", "n_cols", "stride_lm"), wide_loads=True,
    )


def _tlp_bwd(dtype, has_dlogprobs=True, has_dentropy=True):
    return AotCase(
        f"token_logprobs_bwd[{dtype},{has_dlogprobs},{has_dentropy}]", f"{TLP}:_token_logprobs_bwd_kernel",
        {"logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
         "dlogprobs_ptr": "*fp32", "dentropy_ptr": "*fp32", "dlogits_ptr": f"*{dtype}", "n_cols": "i32",
         "stride_lm": "i64", "stride_lv": "constexpr", "stride_label": "constexpr", "stride_dm": "i64",
         "temperature": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr",
         "HAS_DLOGPROBS": "constexpr", "HAS_DENTROPY": "constexpr"},
        {"stride_lv": 1, "stride_label": 1, "BLOCK_V": 4096, "HAS_DLOGPROBS": has_dlogprobs,
         "HAS_DENTROPY": has_dentropy}, num_warps=8,
        divisible_by_16=("logits_ptr", "dlogits_ptr", "n_cols", "stride_lm", "stride_dm"), wide_loads=True,
    )


# Each op adds its cases here.
CASES = [
    _tlp_fwd("bf16"), _tlp_fwd("fp16"), _tlp_fwd("fp32"),
    _tlp_bwd("bf16"), _tlp_bwd("fp32"), _tlp_bwd("fp16", has_dentropy=False),
]


# -- kl_penalty, gae, ppo_loss (issue 3) -------------------------------------
KL = "fastppo.kernels.kl_penalty"
GAE = "fastppo.kernels.gae"
PPO = "fastppo.kernels.ppo_loss"


def _kl_fwd(dtype, estimator, has_clamp):
    return AotCase(
        f"kl_penalty_fwd[{dtype},{estimator},{has_clamp}]", f"{KL}:_kl_penalty_fwd_kernel",
        {"lp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "out_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
         "stride_lm": "i64", "stride_rm": "i64", "stride_om": "i64", "clamp": "fp32", "ESTIMATOR": "constexpr",
         "HAS_CLAMP": "constexpr", "BLOCK_M": "constexpr", "BLOCK_T": "constexpr"},
        {"ESTIMATOR": estimator, "HAS_CLAMP": has_clamp, "BLOCK_M": 1, "BLOCK_T": 2048}, num_warps=4,
        divisible_by_16=("lp_ptr", "ref_ptr", "out_ptr", "n_cols", "stride_lm", "stride_rm", "stride_om"),
        wide_loads=True,
    )


def _kl_bwd(dtype, estimator):
    return AotCase(
        f"kl_penalty_bwd[{dtype},{estimator}]", f"{KL}:_kl_penalty_bwd_kernel",
        {"lp_ptr": f"*{dtype}", "ref_ptr": f"*{dtype}", "grad_ptr": "*fp32", "dlp_ptr": f"*{dtype}",
         "dref_ptr": f"*{dtype}", "n_rows": "i32", "n_cols": "i32", "stride_lm": "i64", "stride_rm": "i64",
         "stride_gm": "i64", "stride_gt": "constexpr", "stride_dm": "i64", "clamp": "fp32",
         "ESTIMATOR": "constexpr", "HAS_CLAMP": "constexpr", "HAS_DLP": "constexpr", "HAS_DREF": "constexpr",
         "BLOCK_M": "constexpr", "BLOCK_T": "constexpr"},
        {"stride_gt": 1, "ESTIMATOR": estimator, "HAS_CLAMP": True, "HAS_DLP": True, "HAS_DREF": True,
         "BLOCK_M": 1, "BLOCK_T": 2048}, num_warps=4,
        divisible_by_16=("lp_ptr", "ref_ptr", "grad_ptr", "dlp_ptr", "dref_ptr", "n_cols", "stride_lm",
                         "stride_rm", "stride_gm", "stride_dm"),
        wide_loads=True,
    )


def _gae_fwd(dtype, block_t):
    return AotCase(
        f"gae_fwd[{dtype},{block_t}]", f"{GAE}:_gae_fwd_kernel",
        {"rewards_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "mask_ptr": "*u8", "adv_ptr": "*fp32",
         "ret_ptr": "*fp32", "n_cols": "i32", "stride_rm": "i64", "stride_vm": "i64", "stride_mm": "i64",
         "stride_om": "i64", "gamma": "fp32", "lam": "fp32", "BLOCK_T": "constexpr"},
        {"BLOCK_T": block_t}, num_warps=8 if block_t >= 2048 else 4,
        divisible_by_16=("rewards_ptr", "values_ptr", "mask_ptr", "adv_ptr", "ret_ptr", "n_cols", "stride_rm",
                         "stride_vm", "stride_mm", "stride_om"),
        wide_loads=True,
    )


_PPO_PTRS = ("lp_ptr", "old_lp_ptr", "adv_ptr", "val_ptr", "old_val_ptr", "ret_ptr")
_PPO_STRIDES = ("stride_lm", "stride_om", "stride_am", "stride_vm", "stride_wm", "stride_rm", "stride_mm")


def _ppo_fwd(dtype, value_clip, dual_clip, one_program):
    return AotCase(
        f"ppo_loss_fwd[{dtype},{value_clip},{dual_clip},{one_program}]", f"{PPO}:_ppo_loss_fwd_kernel",
        {**{p: f"*{dtype}" for p in _PPO_PTRS}, "mask_ptr": "*u8", "norm_ptr": "*fp32", "partial_ptr": "*fp32",
         "out_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "tiles_per_program": "i32",
         **{s: "i64" for s in _PPO_STRIDES}, "clip_eps": "fp32", "value_clip": "fp32", "dual_clip": "fp32",
         "vf_coef": "fp32", "normalizer": "fp32", "HAS_VALUE_CLIP": "constexpr", "HAS_DUAL_CLIP": "constexpr",
         "NORM_MODE": "constexpr", "ONE_PROGRAM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_T": "constexpr"},
        {"HAS_VALUE_CLIP": value_clip, "HAS_DUAL_CLIP": dual_clip, "NORM_MODE": 2, "ONE_PROGRAM": one_program,
         "BLOCK_M": 1, "BLOCK_T": 2048}, num_warps=8,
        divisible_by_16=(*_PPO_PTRS, "mask_ptr", "n_cols", *_PPO_STRIDES), wide_loads=True,
    )


def _ppo_reduce():
    return AotCase(
        "ppo_loss_reduce", f"{PPO}:_ppo_loss_reduce_kernel",
        {"partial_ptr": "*fp32", "norm_ptr": "*fp32", "out_ptr": "*fp32", "n_programs": "i32", "vf_coef": "fp32",
         "normalizer": "fp32", "NORM_MODE": "constexpr", "BLOCK_P": "constexpr"},
        {"NORM_MODE": 0, "BLOCK_P": 1024}, num_warps=4,
    )


def _ppo_bwd(dtype, value_clip, dual_clip):
    return AotCase(
        f"ppo_loss_bwd[{dtype},{value_clip},{dual_clip}]", f"{PPO}:_ppo_loss_bwd_kernel",
        {**{p: f"*{dtype}" for p in _PPO_PTRS}, "mask_ptr": "*u8", "out_ptr": "*fp32", "g_loss_ptr": "*fp32",
         "g_pg_ptr": "*fp32", "g_vf_ptr": "*fp32", "dlp_ptr": f"*{dtype}", "dval_ptr": f"*{dtype}",
         "n_rows": "i32", "n_cols": "i32", **{s: "i64" for s in _PPO_STRIDES}, "stride_dm": "i64",
         "clip_eps": "fp32", "value_clip": "fp32", "dual_clip": "fp32", "vf_coef": "fp32",
         "HAS_VALUE_CLIP": "constexpr", "HAS_DUAL_CLIP": "constexpr", "HAS_G_LOSS": "constexpr",
         "HAS_G_PG": "constexpr", "HAS_G_VF": "constexpr", "NEEDS_DLP": "constexpr", "NEEDS_DVAL": "constexpr",
         "BLOCK_M": "constexpr", "BLOCK_T": "constexpr"},
        {"HAS_VALUE_CLIP": value_clip, "HAS_DUAL_CLIP": dual_clip, "HAS_G_LOSS": True, "HAS_G_PG": True,
         "HAS_G_VF": True, "NEEDS_DLP": True, "NEEDS_DVAL": True, "BLOCK_M": 1, "BLOCK_T": 2048}, num_warps=8,
        divisible_by_16=(*_PPO_PTRS, "mask_ptr", "dlp_ptr", "dval_ptr", "n_cols", *_PPO_STRIDES, "stride_dm"),
        wide_loads=True,
    )


CASES += [
    _kl_fwd("bf16", "k3", True), _kl_fwd("fp32", "k1", False), _kl_bwd("bf16", "k3"),
    _gae_fwd("fp32", 2048), _gae_fwd("bf16", 1024),
    _ppo_fwd("fp32", True, True, False), _ppo_fwd("bf16", False, False, True), _ppo_reduce(),
    _ppo_bwd("fp32", True, True), _ppo_bwd("bf16", False, False),
]

# -- linear_ppo_loss (issue 8) -------------------------------------------------
LPL = "fastppo.kernels.linear_ppo_loss"


def _lpl_fwd(dlogits_dtype, estimator, dual_clip, has_ref, with_grad=True):
    return AotCase(
        f"linear_ppo_loss_fwd[{dlogits_dtype},{estimator},{dual_clip},{has_ref},{with_grad}]",
        f"{LPL}:_linear_ppo_loss_fwd_kernel",
        {"logits_ptr": "*fp32", "dlogits_ptr": f"*{dlogits_dtype}", "labels_ptr": "*i64", "old_lp_ptr": "*fp32",
         "adv_ptr": "*fp32", "ref_lp_ptr": "*fp32", "norm_ptr": "*fp32", "tok_ptr": "*fp32", "n_cols": "i32",
         "stride_lm": "i64", "stride_dm": "i64", "stride_tok": "i64", "temperature": "fp32", "clip_eps": "fp32",
         "dual_clip": "fp32", "ent_coef": "fp32", "kl_coef": "fp32", "HAS_DUAL_CLIP": "constexpr",
         "HAS_REF": "constexpr", "ESTIMATOR": "constexpr", "WITH_GRAD": "constexpr", "BLOCK_V": "constexpr"},
        {"HAS_DUAL_CLIP": dual_clip, "HAS_REF": has_ref, "ESTIMATOR": estimator, "WITH_GRAD": with_grad,
         "BLOCK_V": 4096}, num_warps=8,
        divisible_by_16=("logits_ptr", "dlogits_ptr", "n_cols", "stride_lm", "stride_dm"), wide_loads=True,
    )


CASES += [
    _lpl_fwd("fp32", "k3", True, True), _lpl_fwd("bf16", "k1", False, True), _lpl_fwd("fp16", "abs", True, True),
    _lpl_fwd("fp32", "k3", False, False, with_grad=False),
]
# Device functions (@triton.jit helpers that return values, e.g. scan combine
# functions) cannot be compiled on their own; they are compiled inside the
# kernels above that call them.
DEVICE_FUNCTIONS = {f"{GAE}:_gae_scan_combine"}


@pytest.fixture(scope="module")
def compiled():
    return compile_cases(CASES, SMS)


@pytest.mark.parametrize("sm", SMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiles_without_spills(compiled, case, sm):
    result = compiled[(case.name, sm)]
    assert result.error is None, f"{case.name} does not compile for sm_{sm}: {result.error}"
    assert result.stack == 0 and result.local == 0, f"{case.name} spills on sm_{sm}: {result}"
    if case.wide_loads:
        assert "LDG.E.128" in result.loads, f"{case.name} on sm_{sm} has no 128-bit loads: {result.loads}"


def _all_jit_kernels():
    kinds = (triton.runtime.JITFunction, InterpretedFunction)
    found = set()
    for info in pkgutil.iter_modules(fastppo.kernels.__path__):
        module = importlib.import_module(f"fastppo.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, kinds) and getattr(obj, "__module__", module.__name__) == module.__name__:
                found.add(f"{module.__name__}:{name}")
    return found


def test_every_kernel_has_a_case():
    missing = _all_jit_kernels() - {c.kernel for c in CASES} - DEVICE_FUNCTIONS
    assert not missing, f"kernels without an AOT compile case: {sorted(missing)}"
