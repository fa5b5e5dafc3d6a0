"""Ahead-of-time compilation of Triton kernels for real GPUs, without a GPU.

The interpreter forgives things the compiler does not (unsupported ops, bad
layouts, register spills). Each case is compiled with triton's own compiler
down to a cubin for a given SM, whose resource usage and SASS are read with the
cuobjdump that ships inside triton.

The test process runs kernels under TRITON_INTERPRET=1, where @triton.jit gives
interpreter objects that cannot be compiled; so the cases are compiled in one
worker process started with the interpreter off (`compile_cases`).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field


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


@dataclass
class Compiled:
    registers: int
    stack: int
    local: int
    shared: int
    loads: list
    error: str | None = None


def _compile_one(case: dict, sm: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
        return asdict(Compiled(int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"]), int(fields["SHARED"]), loads))
    except Exception as exc:  # reported per case by the test
        return asdict(Compiled(-1, -1, -1, -1, [], error=f"{type(exc).__name__}: {exc}"))


def compile_cases(cases: list[AotCase], sms: tuple[int, ...]) -> dict[tuple[str, int], Compiled]:
    """Compile every case for every SM in one worker process; keyed by (case name, sm)."""
    payload = json.dumps({"cases": [asdict(c) for c in cases], "sms": list(sms)})
    env = dict(os.environ, TRITON_INTERPRET="0")
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
