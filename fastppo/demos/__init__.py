"""`fastppo demo`: whole pipelines on synthetic tasks, offline, on a laptop CPU.

    preferences  SFT -> reward model -> PPO-max (and compared presets), held-out evaluation (`preferences`)
    arithmetic   SFT -> GRPO with a verifiable reward (`arithmetic`)
    tools        SFT -> GRPO through a calculator tool, multi-turn (`tools`)

Each demo runs the stages through the same functions as their commands, with dotted overrides.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..config import SEED_LIMIT
from ..run_dir import RunDirError, claim
from .arithmetic import ArithmeticPlan, quick_arithmetic_plan, run_arithmetic_demo
from .common import DEMO_MARKER, replace_earlier_demo
from .preferences import DemoPlan, quick_plan, run_demo
from .tools import ToolsPlan, quick_tools_plan, run_tools_demo

GRPO_TASKS = {"arithmetic": (ArithmeticPlan, quick_arithmetic_plan, run_arithmetic_demo),
              "tools": (ToolsPlan, quick_tools_plan, run_tools_demo)}

HELP = "the whole pipeline on a synthetic task, on CPU, offline: SFT -> reward model -> PPO-max"


def _in_range(low: int, high: int | None = None):
    """An argparse type: an int in [low, high) (high None: no upper bound), refused when the arguments are parsed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}" if high is None else
                                             f"must lie in [{low}, 2^32), got {value}")
        return value
    return parse


def add_arguments(p) -> None:
    p.add_argument("--output-dir", "-o", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--seed", type=_in_range(0, SEED_LIMIT), default=0,
                   help="seed of the data, the models and every run, in [0, 2^32) (default 0)")
    p.add_argument("--compare", nargs="*", default=[], choices=["vanilla", "moss_release"], metavar="PRESET",
                   help="also train these presets from the same SFT and reward model (vanilla, moss_release)")
    p.add_argument("--quick", action="store_true", help="a shortened demo (fewer examples and iterations)")
    p.add_argument("--iterations", type=_in_range(1),
                   help="PPO iterations, >= 1 (default: 150, quick: 30; --task arithmetic: 60, quick: 25; --task tools: "
                        "30, quick: 12)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--task", choices=["preferences", *GRPO_TASKS], default="preferences",
                   help="preferences: SFT -> reward model -> PPO-max (default); arithmetic: SFT -> GRPO with a "
                        "verifiable reward (fastppo.rewards:math_answer), held-out accuracy before/after; tools: "
                        "SFT -> GRPO through a calculator tool (fastppo.envs:ToolEnv), accuracy and tool use "
                        "before/after")
    p.add_argument("--engine", choices=["hf", "static"], default="hf",
                   help="rollout.engine of the PPO / GRPO stage: hf (HF generate, default) or static (docs/rollout.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue a demo stopped in --output-dir, with the settings it started with (its task, seed, "
                        "sizes): finished stages are kept, an interrupted PPO/GRPO run resumes from its checkpoint")


def _earlier_settings(out: Path) -> dict:
    """What the demo in `out` started with (its DEMO_MARKER), for --resume."""
    try:
        return json.loads((out / DEMO_MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"--resume: {out} holds no demo to continue ({out / DEMO_MARKER}: {exc}); start one with "
                          "`fastppo demo`") from None


def run(args) -> int:
    out = Path(args.output_dir)
    task, seed, settings = args.task, args.seed, None
    if args.resume:
        settings = _earlier_settings(out)
        task, seed = settings.pop("task", "preferences"), settings.pop("seed")
    if task in GRPO_TASKS:
        plan_class, quick, run_task = GRPO_TASKS[task]
        plan = plan_class(**settings) if settings else quick() if args.quick else plan_class()
        if not settings:
            plan.iterations = plan.iterations if args.iterations is None else args.iterations
            plan.rollout_engine = args.engine
            replace_earlier_demo(out)
        with claim(out, field="--output-dir"):
            (out / DEMO_MARKER).write_text(json.dumps({"task": task, "seed": seed, **asdict(plan)}))
            run_task(out, seed=seed, plan=plan, progress_bar=not args.no_progress, resume=args.resume)
        return 0
    compare = args.compare
    if settings:
        compare = settings.pop("presets")
        plan = DemoPlan(**settings)
    else:
        plan = quick_plan() if args.quick else DemoPlan()
        plan.ppo_iterations = plan.ppo_iterations if args.iterations is None else args.iterations
        plan.rollout_engine = args.engine
    run_demo(out, seed=seed, compare=compare, plan=plan, progress_bar=not args.no_progress, resume=args.resume)
    return 0
