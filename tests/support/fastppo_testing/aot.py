"""Ahead-of-time compilation of Triton kernels for real GPUs, without a GPU.

The interpreter forgives things the compiler does not (unsupported ops, bad
layouts, register spills). Each case is compiled with triton's own compiler
down to a cubin for a given SM, whose resource usage and SASS are read with the
cuobjdump that ships inside triton.

The test process runs kernels under TRITON_INTERPRET=1, where @triton.jit gives
interpreter objects that cannot be compiled; so the cases are compiled in one
worker process started with the interpreter off (`compile_cases`).

The cases are what the launchers launch: `record_launches` catches every
``kernel[grid](...)`` made while the public ops run on CPU inputs, with the
block sizes a GPU would get, and turns each into an `AotCase` (`Launch.case`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction

from fastppo.kernels import _dispatch
from fastppo_testing.sass import count as count_sass


@dataclass
class AotCase:
    """One kernel specialisation to compile.

    kernel: "module:attribute" of the @triton.jit function.
    signature: every argument name -> Triton type ("*bf16", "i32", "fp32", or
        "constexpr" for those given in `constexprs`).
    divisible_by_16: arguments that get the hint the JIT adds at run time when
        a pointer is 16-byte aligned or an integer is a multiple of 16.
    wide_loads: the SASS must contain 128-bit global loads (LDG.E.128).
    """

    name: str
    kernel: str
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple = ()
    wide_loads: bool = False


# -- recording what the launchers launch ---------------------------------------

# torch dtype name -> Triton's name for a pointer to it.
_POINTEE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
            "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _is_constexpr(annotation) -> bool:
    # Kernel modules use `from __future__ import annotations`: the annotation is then the string "tl.constexpr".
    return annotation is tl.constexpr or (isinstance(annotation, str) and annotation.split(".")[-1] == "constexpr")


def _specialise(value):
    """(Triton type, 16-divisible) of one runtime argument, as triton's JIT specialises it.

    Integers equal to 1 become the constant 1; others are i32 when they fit, else
    i64; integers that are multiples of 16 and pointers 16-byte aligned get the
    divisibility hint (triton.backends.compiler.BaseBackend.get_*_specialization).
    """
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return "*" + _POINTEE[str(value.dtype).removeprefix("torch.")], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return ("constexpr", 1), False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    if value is None:
        return ("constexpr", None), False
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}")


@dataclass(frozen=True)
class Launch:
    """One ``kernel[grid](...)`` call: the kernel, its specialisation and launch options."""

    kernel: str
    signature: tuple           # ((argument, Triton type), ...) in the kernel's order
    constexprs: tuple          # ((argument, value), ...)
    divisible_by_16: tuple
    num_warps: int
    num_stages: int

    def case(self, name: str) -> AotCase:
        return AotCase(name, self.kernel, dict(self.signature), dict(self.constexprs), self.num_warps,
                       self.num_stages, self.divisible_by_16)


def _launch_of(fn, args, kwargs) -> Launch:
    params = inspect.signature(fn).parameters
    names = list(params)
    bound = dict(zip(names, args))
    bound.update((k, v) for k, v in kwargs.items() if k in params)
    options = {k: v for k, v in kwargs.items() if k not in params}
    signature, constexprs, divisible = [], [], []
    for name in names:
        value = bound[name]
        if _is_constexpr(params[name].annotation):
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
            continue
        kind, div16 = _specialise(value)
        if isinstance(kind, tuple):                      # specialised to a constant, as the JIT does
            signature.append((name, "constexpr"))
            constexprs.append((name, kind[1]))
            continue
        signature.append((name, kind))
        if div16:
            divisible.append(name)
    return Launch(f"{fn.__module__}:{fn.__name__}", tuple(signature), tuple(constexprs), tuple(divisible),
                  int(options.get("num_warps", 4)), int(options.get("num_stages", 3)))


@contextmanager
def record_launches():
    """Collect the `Launch` of every Triton kernel launched in the block, without running any.

    For use in a test on CPU inputs with the ops' ``backend="triton"``: the
    launchers pick GPU block sizes (TRITON_INTERPRET reads 0 for them, while
    the backend check still accepts CPU tensors), and ``kernel[grid](...)``
    records instead of running, whether the kernels are interpreter objects
    or compiled ones. Kernel outputs are therefore left unwritten: only the
    launches are meaningful.
    """
    launches: list[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(_launch_of(self.fn, args, kwargs))

    with pytest.MonkeyPatch.context() as mp:
        for cls in (InterpretedFunction, triton.runtime.JITFunction):
            mp.setattr(cls, "run", run)
        mp.setenv("TRITON_INTERPRET", "0")                                    # block sizes: the GPU's
        mp.setattr(_dispatch, "triton_interpreter_enabled", lambda: True)     # backend="triton" on CPU tensors
        yield launches


@dataclass
class Compiled:
    registers: int
    stack: int
    local: int
    shared: int
    loads: list
    error: str | None = None
    mma: list = field(default_factory=list)
    """The tensor-core instructions in the SASS (HMMA on sm_80, HGMMA: sm_90's wgmma), by shape and types."""
    spills: int = 0
    """Local-memory stores and loads in the SASS (STL/LDL): what a register spill compiles to. A stack frame
    (`stack`) alone is not one: ptxas may reserve a few bytes of frame that no instruction touches."""
    instructions: int = 0
    hot_loop: int = 0
    """SASS instructions of the largest innermost loop's body (the whole kernel when it has no loop), and the
    MUFU among them: see fastppo_testing/sass.py."""
    hot_loop_mufu: int = 0
    n_loops: int = 0
    loop_sizes: list = field(default_factory=list)


def _compile_one(case: dict, sm: int) -> dict:
    try:
        module_name, attr = case["kernel"].split(":")
        kernel = getattr(importlib.import_module(module_name), attr)
        names = list(kernel.arg_names)
        missing = set(names) - set(case["signature"])
        if missing:
            raise ValueError(f"signature lacks {sorted(missing)}")
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case["divisible_by_16"]}
        src = ASTSource(fn=kernel, signature=case["signature"], constexprs=case["constexprs"], attrs=attrs)
        options = {"num_warps": case["num_warps"], "num_stages": case["num_stages"]}
        compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=options)
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
        loads = sorted(set(re.findall(r"\bLDG\.E[.\w]*", sass)))
        mma = sorted(set(re.findall(r"\bHG?MMA\.[.\w]+", sass)))
        spills = len(re.findall(r"\b(?:STL|LDL)\b", sass))
        counts = count_sass(sass)
        return asdict(Compiled(int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"]), int(fields["SHARED"]),
                               loads, mma=mma, spills=spills, instructions=counts.instructions, hot_loop=counts.hot_loop,
                               hot_loop_mufu=counts.hot_loop_mufu, n_loops=counts.n_loops,
                               loop_sizes=list(counts.loop_sizes)))
    except Exception as exc:  # reported per case by the test
        return asdict(Compiled(-1, -1, -1, -1, [], error=f"{type(exc).__name__}: {exc}"))


def compile_cases(cases: list[AotCase], sms: tuple[int, ...]) -> dict[tuple[str, int], Compiled]:
    """Compile every case for every SM in one worker process; keyed by (case name, sm)."""
    payload = json.dumps({"cases": [asdict(c) for c in cases], "sms": list(sms)})
    support = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # fastppo_testing's parent, for the worker
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(p for p in (support, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=payload, capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT worker failed:\n{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(r["name"], r["sm"]): Compiled(**r["result"]) for r in results}


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    work = [(case, sm) for case in job["cases"] for sm in job["sms"]]
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_compile_one, [c for c, _ in work], [sm for _, sm in work]))
    out = [{"name": c["name"], "sm": sm, "result": r} for (c, sm), r in zip(work, results)]
    print(json.dumps(out))


if __name__ == "__main__":
    _worker()
