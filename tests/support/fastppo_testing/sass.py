"""Instruction counts of compiled kernels, and the budget that memory bandwidth leaves them.

A bandwidth-bound kernel is only as fast as its memory if the SMs can issue its
instructions while the bytes stream in. Per SM and cycle an H200 delivers

    bytes/SM/cycle = copy bandwidth / (SMs x clock) = 4.11e12 / (132 x 1.98e9) ~ 15.7

(bandwidth: the device-to-device copy measured on the project's H200, bytes read
+ written, docs/benchmarks.md; 132 SMs and a 1.98 GHz boost clock from NVIDIA's
H200 SXM datasheet), while it issues at most 4 warp instructions per cycle (one
per scheduler: 128 thread-instructions, the CUDA programming guide's arithmetic
throughput table, compute capability 9.0). A kernel that moves b bytes per
element therefore keeps up with memory at no more than

    budget = 128 / 15.7 x b ~ 8.2 b thread-instructions per element

(bf16 row forward, 2 bytes: ~16; its backward reading and writing bf16: ~33).
MUFU (exp2, log2, rcp) issues at 16 per SM per cycle: its own budget is
16 / 15.7 x b ~ 1.0 b per element.

Counting. SASS on sm_80/sm_90 is 16 bytes an instruction, and a loop is a
backward branch: the instructions from its target to the branch are its body,
executed once per trip by every warp of the program. A trip covers the
program's block (`block_elements`) with num_warps x 32 threads, so

    per element = body x num_warps x 32 / block.

The hot loop is the largest innermost loop. A kernel without a loop executes at
most its whole code once per program (branches only skip): that count is the
body. Both are upper bounds: predicated-off and skipped instructions count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COPY_BANDWIDTH = 4.11e12      # bytes/s read + written, measured copy on the project's H200
N_SMS = 132
CLOCK_HZ = 1.98e9
ISSUE_PER_SM_CYCLE = 128      # thread-instructions: 4 schedulers x 1 warp instruction
MUFU_PER_SM_CYCLE = 16
INSTRUCTION_BYTES = 16        # sm_70 and later

BYTES_PER_SM_CYCLE = COPY_BANDWIDTH / (N_SMS * CLOCK_HZ)
INSTRUCTIONS_PER_BYTE = ISSUE_PER_SM_CYCLE / BYTES_PER_SM_CYCLE
MUFU_PER_BYTE = MUFU_PER_SM_CYCLE / BYTES_PER_SM_CYCLE

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\()?(?:0x)?([0-9a-f]+)")


@dataclass
class SassCounts:
    instructions: int             # up to the last EXIT (the padding after it excluded)
    hot_loop: int                 # body of the largest innermost loop; `instructions` without a loop
    hot_loop_mufu: int
    n_loops: int
    loop_sizes: tuple = ()        # every innermost loop's body, in code order


def count(sass: str) -> SassCounts:
    """Instruction counts of one kernel's `cuobjdump -sass` listing."""
    code = [(int(a, 16), text) for a, text in _LINE.findall(sass)]
    exits = [a for a, text in code if re.search(r"\bEXIT\b", text)]
    end = max(exits) if exits else code[-1][0]
    body = [(a, text) for a, text in code if a <= end]
    loops = []
    for addr, text in body:
        m = _BRANCH.match(text)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]

    def size(lo, hi):
        return [text for a, text in body if lo <= a <= hi]

    if innermost:
        lo, hi = max(innermost, key=lambda se: se[1] - se[0])
    else:
        lo, hi = body[0][0], end
    hot = size(lo, hi)
    return SassCounts(len(body), len(hot), sum(bool(re.search(r"\bMUFU\b", t)) for t in hot), len(innermost),
                      tuple(len(size(lo, hi)) for lo, hi in sorted(innermost)))


def block_elements(constexprs: dict) -> int:
    """Elements one trip of a program's hot loop covers: BLOCK_V for a row kernel (the sampler's searches read
    blocks of the same size), BLOCK_M x BLOCK_T for a (B, T) tile, BLOCK_M x BLOCK_N for a tile of logits (a
    GEMM's: its hot loop is a step along K), else BLOCK_T, BLOCK_P or BLOCK_M (rows)."""
    if "BLOCK_V" in constexprs:
        return constexprs["BLOCK_V"]
    if "BLOCK_T" in constexprs:
        return constexprs["BLOCK_T"] * constexprs.get("BLOCK_M", 1)
    if "BLOCK_N" in constexprs:
        return constexprs["BLOCK_M"] * constexprs["BLOCK_N"]
    return constexprs["BLOCK_P"] if "BLOCK_P" in constexprs else constexprs["BLOCK_M"]


def per_element(instructions: int, num_warps: int, constexprs: dict) -> float:
    return instructions * num_warps * 32 / block_elements(constexprs)


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "u8": 1, "i1": 1}


def streamed_bytes(signature: dict, pointers) -> int:
    """Bytes per element moved through the given per-element pointer arguments."""
    return sum(_BYTES[signature[p].lstrip("*")] for p in pointers if p in signature and signature[p].startswith("*"))


def budget(n_bytes: int) -> tuple[float, float]:
    """(instructions, MUFU instructions) per element that keep up with `n_bytes` per element at copy bandwidth."""
    return INSTRUCTIONS_PER_BYTE * n_bytes, MUFU_PER_BYTE * n_bytes
