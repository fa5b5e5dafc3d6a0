"""SASS instruction counts of every Triton kernel in fastppo.kernels, compiled for sm_90 and sm_80 on the CPU.

No GPU needed: each kernel specialisation that the public ops launch (the cases
of tests/kernels/test_aot_compile.py, recorded from the launchers with GPU block
sizes) is compiled with triton's own compiler and bundled ptxas, and its cubin
read with the bundled cuobjdump (tests/support/fastppo_testing/aot.py). Per case
and SM: registers, spills (local-memory loads and stores), the SASS
instructions of the hot loop and their count per element against the budget
that copy bandwidth leaves (tests/support/fastppo_testing/sass.py derives it:
about 8.1 thread-instructions per byte moved on an H200).

Writes bench/results/sass_counts.csv (one row per case and SM, stamped with the
commit) and prints the table.

Usage: python bench/sass_counts.py [--sm 90,80] [--label TEXT]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "support"), str(ROOT / "tests" / "kernels")]
os.environ.setdefault("TRITON_INTERPRET", "1")      # the launchers record on CPU tensors, as in the tests

from common import RESULTS, git_commit  # noqa: E402
from fastppo_testing.aot import compile_cases  # noqa: E402
from fastppo_testing.sass import budget, per_element, streamed_bytes  # noqa: E402
from test_aot_compile import CASES, STREAMED  # noqa: E402

FIELDS = ["commit", "label", "sm", "case", "kernel", "num_warps", "block", "registers", "spills", "instructions",
          "hot_loop", "hot_loop_mufu", "per_element", "mufu_per_element", "bytes_per_element", "budget",
          "mufu_budget", "within_budget"]


def rows(sms, label):
    compiled = compile_cases(CASES, sms)
    commit = git_commit()
    for case in CASES:
        kernel = case.kernel.split(":")[1]
        n_bytes = streamed_bytes(case.signature, STREAMED.get(case.kernel, ()))
        for sm in sms:
            c = compiled[(case.name, sm)]
            if c.error:
                print(f"{case.name} sm_{sm}: {c.error}", file=sys.stderr)
                continue
            row = dict(commit=commit, label=label, sm=sm, case=case.name, kernel=kernel, num_warps=case.num_warps,
                       block="x".join(str(v) for k, v in case.constexprs.items() if k.startswith("BLOCK_")),
                       registers=c.registers, spills=c.spills, instructions=c.instructions, hot_loop=c.hot_loop,
                       hot_loop_mufu=c.hot_loop_mufu,
                       per_element=round(per_element(c.hot_loop, case.num_warps, case.constexprs), 2),
                       mufu_per_element=round(per_element(c.hot_loop_mufu, case.num_warps, case.constexprs), 3),
                       bytes_per_element=n_bytes or "", budget="", mufu_budget="", within_budget="",
                       loops="/".join(map(str, c.loop_sizes)))
            if n_bytes:
                instr, mufu = budget(n_bytes)
                row.update(budget=round(instr, 1), mufu_budget=round(mufu, 2),
                           within_budget=row["per_element"] <= instr and row["mufu_per_element"] <= mufu)
            yield row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sm", default="90,80", help="SMs to compile for, comma-separated (default 90,80)")
    parser.add_argument("--label", default="", help="a note stored with the rows (e.g. before / after)")
    args = parser.parse_args()
    sms = tuple(int(s) for s in args.sm.split(","))
    out = list(rows(sms, args.label))
    header = ["sm", "case", "warps", "block", "regs", "spills", "loop", "per_elem", "budget", "mufu/el", "ok",
              "innermost loops"]
    print(" | ".join(header))
    for r in out:
        print(" | ".join(str(r[k]) for k in ("sm", "case", "num_warps", "block", "registers", "spills", "hot_loop",
                                             "per_element", "budget", "mufu_per_element", "within_budget",
                                             "loops")))
    path = RESULTS / "sass_counts.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")      # `loops`: printed only
        if new:
            writer.writeheader()
        writer.writerows(out)
    print(f"appended {len(out)} rows to {path}")


if __name__ == "__main__":
    main()
