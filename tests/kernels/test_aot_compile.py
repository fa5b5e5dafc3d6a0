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
    missing = _all_jit_kernels() - {c.kernel for c in CASES}
    assert not missing, f"kernels without an AOT compile case: {sorted(missing)}"
