"""Command line: `fastppo train | sft | train-rm | demo | bench`.

Each subcommand registers itself in `COMMANDS` with a function that adds its
arguments and one that runs it; stages added later (sft, train-rm, demo)
plug in the same way, from their own modules, via `register`.

    fastppo train --config configs/tiny.yaml [--preset vanilla] [--resume [DIR]] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("fastppo")

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

# Subcommands that live in other modules: name -> "module:register_function".
# The module defines `register_cli(register)` and calls
# `register(name, help, add_arguments, run)`; a module (or hook) that does not
# exist yet simply adds no command.
PLUGINS = {
    "sft": "fastppo.sft:register_cli",
    "train-rm": "fastppo.reward_training:register_cli",
    "demo": "fastppo.demo:register_cli",
}


def register(name: str, help: str, add_arguments, run) -> None:
    COMMANDS[name] = (help, add_arguments, run)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config / --preset / dotted overrides: shared by every command built on fastppo.config."""
    p.add_argument("--config", "-c", type=Path, help="YAML config file (layered on the preset)")
    p.add_argument("--preset", choices=["ppo_max", "moss_release", "vanilla"],
                   help="base preset (SPEC §3); default: the YAML's `preset:` key, else ppo_max")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides, e.g. ppo.clip_eps=0.1")


# ----------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory (default: the newest in run.output_dir/checkpoints)")


def _train_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        overrides.append(args.resume)  # `--resume key=value ...`: the override is not a checkpoint path
        args.resume = "latest"
    if args.resume is not None:
        overrides.append(f"run.resume={args.resume}")
    cfg = load_config(args.config, overrides, preset=args.preset)
    result = train(cfg)
    where = result.export or result.checkpoint or result.run_dir
    if int(os.environ.get("RANK", "0")) == 0:                   # the process group is gone by now
        print(f"fastppo: {result.iterations_done} iterations, run dir {result.run_dir}; "
              f"{'interrupted, resumable checkpoint' if result.interrupted else 'output'}: {where}")
    return 0


register("train", "PPO-max RLHF training (policy, critic, reward, reference)", _train_args, _train_run)


# ----------------------------------------------------------------------------
# bench: runs the scripts in bench/ with this interpreter
# ----------------------------------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="bench scripts to run (e.g. trainer logprobs); default: all")
    p.add_argument("--list", action="store_true", help="list the available benchmarks")
    p.add_argument("--args", default="", metavar="'ARGS'",
                   help="extra arguments for the script(s), quoted, e.g. --args '--iterations 2'")


def _bench_run(args: argparse.Namespace) -> int:
    scripts = sorted(p for p in BENCH_DIR.glob("*.py") if p.stem not in ("common", "__init__"))
    if not scripts:
        print(f"no benchmarks found in {BENCH_DIR}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(p.stem for p in scripts))
        return 0
    chosen = scripts
    if args.names:
        by_name = {p.stem: p for p in scripts}
        unknown = [n for n in args.names if n not in by_name]
        if unknown:
            print(f"unknown benchmark(s) {unknown}; available: {sorted(by_name)}", file=sys.stderr)
            return 2
        chosen = [by_name[n] for n in args.names]
    rc = 0
    for script in chosen:
        print(f"== bench/{script.name}", flush=True)
        # The venv's interpreter by path, never `python -m` (it would put the repo root on sys.path).
        rc = subprocess.run([sys.executable, str(script), *shlex.split(args.args)], cwd=BENCH_DIR.parent).returncode or rc
    return rc


register("bench", "run the benchmarks in bench/ (fused ops and the end-to-end trainer)", _bench_args, _bench_run)


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

def _load_plugins() -> None:
    for name, target in PLUGINS.items():
        if name in COMMANDS:
            continue
        module, func = target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # that stage is not installed / not written yet
            raise
        hook = getattr(mod, func, None)
        if hook is not None:  # the module registers its command when it provides the hook
            hook(register)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="fastppo", description="Fast PPO-max RLHF on fused Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .dist import DistributedError, rank, world_size
    from .models import ModelError
    from .run_dir import RunDirError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Only `train` shards across processes; N copies of another stage would race on one output directory.
        print(f"fastppo {args.command}: error: runs in one process; under torchrun only `fastppo train` is "
              "distributed (start this stage without torchrun)", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except (ConfigError, DataError, ModelError, RunDirError, FileNotFoundError) as exc:
        where = f" (rank {rank()}/{world_size()})" if world_size() > 1 else ""
        print(f"fastppo {args.command}: error{where}: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:  # a peer failed or hangs: say so, and exit instead of waiting forever
        print(f"fastppo {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
