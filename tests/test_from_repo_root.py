"""The README's commands from the repository root, where `python -m` and `python -c` put the checkout first on
sys.path: nothing there may shadow an installed package (transformers >= 5.25 imports Hugging Face's `kernels`
at start-up, which a top-level kernels/ folder once shadowed: every reward worker and torchrun rank crashed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastppo_testing.distributed import output, torchrun
from fastppo_testing.trainer import read_metrics, tiny_setups  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "support"), os.environ.get("PYTHONPATH")]))}


def test_nothing_in_the_checkout_shadows_an_installed_package():
    """From the root, `import fastppo.cli` (and transformers, which imports Hugging Face's `kernels` when it is
    installed) works, and no top-level name the checkout puts on sys.path is one an installed distribution
    provides (`kernels` was)."""
    code = ("import importlib.metadata as md, sys, fastppo.cli, transformers.modeling_utils;"
            "print(' '.join(sorted(md.packages_distributions())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    installed = set(out.stdout.split())
    offered = {p.stem for p in ROOT.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py")}
    assert offered & installed <= {"fastppo"}, offered & installed


def test_a_reward_function_run_from_the_repository_root(tiny_setups, tmp_path):
    """`python -m fastppo.cli train --preset grpo` with reward functions, from the root: the forkserver's workers
    start with the checkout on sys.path (they run `python -c`) and score every response."""
    setup = tiny_setups("llama")
    args = setup.overrides(**{"model.reward_path": None, "run.output_dir": tmp_path / "run", "run.iterations": 1,
                              "rollout.rollout_batch_size": 2, "rollout.n_samples_per_prompt": 2,
                              "ppo.minibatch_size": 4, "reward.function_workers": 1,
                              "reward.functions": "[{name: 'fastppo_testing.reward_fns:length'}]"})
    out = subprocess.run([sys.executable, "-m", "fastppo.cli", "train", "--preset", "grpo", *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
    (record,) = read_metrics(tmp_path / "run")
    assert record["reward_fn/errors"] == 0 and record["reward_fn/fastppo_testing.reward_fns:length/mean"] > 0


def test_torchrun_from_the_repository_root(tiny_setups, tmp_path):
    """The README's `torchrun --nproc_per_node=2 -m fastppo.cli train`, run where a user runs it: the root."""
    setup = tiny_setups("llama")
    proc = torchrun(["-m", "fastppo.cli", "train", *setup.overrides(**{"run.output_dir": tmp_path / "run",
                                                                      "run.iterations": 1})], cwd=ROOT)
    assert proc.returncode == 0, output(proc)
    assert len(read_metrics(tmp_path / "run")) == 1
