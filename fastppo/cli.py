"""Command line: `fastppo train | sft | train-rm | eval | plot | demo | bench`.

Each subcommand is an entry of `COMMANDS`: its help, a function that adds its arguments, and one that runs it.

    fastppo train --config configs/tiny.yaml [--preset vanilla] [--resume [DIR]] [key.sub=value ...]

A failure is one line, `fastppo <cmd>: error: <message>`, on stderr and in the run's train.log (`KNOWN_ERRORS`;
other exceptions keep their traceback, which also goes to train.log). Exit codes: 0 done (also after a graceful
stop with a checkpoint), 1 the run failed, 2 the config, data, model or command line is wrong, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

from transformers.utils import logging as hf_logging

from . import demos
from .config import PRESETS, RMConfig, SFTConfig, ConfigError, load_config
from .data import DataError
from .evaluation import SAMPLES_FILE, evaluate_model
from .dist import DistributedError, env_world_size
from .models import ModelError
from .optim import NonFiniteError
from .plots import dashboard
from .reward_training import train_rm
from .rewards import RewardFunctionError
from .run_dir import RunDirError
from .sft import sft
from .stage import OneConfigFile, add_stage_arguments, stage_command
from .train import train

log = logging.getLogger("fastppo")

# Failures whose message says it all: `fastppo <cmd>: error: <message>` on stderr and in the run's train.log,
# no traceback. Add an error class here to give it the same treatment. Exit code 2 for the ValueErrors among
# them (the config, data or model given is wrong), 1 for the others; anything else keeps its traceback.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelError, RunDirError, NonFiniteError,
                                                 DistributedError, RewardFunctionError, OSError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process killed by Ctrl-C

def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config / --preset / dotted overrides: shared by every command built on fastppo.config."""
    p.add_argument("--config", "-c", type=Path, action=OneConfigFile, help="YAML config file (layered on the preset)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="base preset (docs/training.md); default: the YAML's `preset:` key, else ppo_max")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides, e.g. ppo.clip_eps=0.1")


# ----------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory (default: the newest in run.output_dir/checkpoints)")


def _train_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        overrides.append(args.resume)  # `--resume key=value ...`: the override is not a checkpoint path
        args.resume = "latest"
    if args.resume is not None:
        given = [o for o in overrides if o.split("=", 1)[0].strip() == "run.resume"]
        if given:
            raise ConfigError(f"the checkpoint is given twice, by --resume ({args.resume}) and {given[0]}: give one")
        overrides.append(f"run.resume={args.resume}")
    cfg = load_config(args.config, overrides, preset=args.preset)
    result = train(cfg)
    where = result.export or result.checkpoint or result.run_dir
    if int(os.environ.get("RANK", "0")) == 0:                   # the process group is gone by now
        print(f"fastppo: {result.iterations_done} iterations, run dir {result.run_dir}; "
              f"{'interrupted, resumable checkpoint' if result.interrupted else 'output'}: {where}")
    return 0


# ----------------------------------------------------------------------------
# eval and plot (docs/monitoring.md)
# ----------------------------------------------------------------------------

def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="a model folder (a Hugging Face export, e.g. <run>/export/policy), or "
                                            "with --checkpoint a checkpoint folder (<run>/checkpoints/iter_N)")
    p.add_argument("--checkpoint", action="store_true",
                   help="MODEL is a checkpoint of `fastppo train`; its config.yaml is the config unless --config")
    p.add_argument("--data", type=Path, help="the prompt file (sets eval.data_path)")
    p.add_argument("--output-dir", "-o", type=Path, default=Path("runs/eval"),
                   help="where metrics.jsonl and eval_samples.jsonl go (default: runs/eval)")
    add_config_arguments(p)


def _eval_run(args: argparse.Namespace) -> int:
    metrics = evaluate_model(args.config, args.model, data_path=args.data, checkpoint=args.checkpoint,
                             output_dir=args.output_dir, overrides=args.overrides, preset=args.preset)
    print("\n".join(f"{k:<28} {v:.6g}" for k, v in metrics.items()))
    print(f"fastppo eval: samples in {args.output_dir / SAMPLES_FILE}, metrics in {args.output_dir / 'metrics.jsonl'}")
    return 0


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories (each with its metrics.jsonl); several are overlaid")
    p.add_argument("--output", "-o", type=Path,
                   help="the PNG to write (default: RUN_DIR/dashboard.png for one run, dashboard.png for several)")
    p.add_argument("--title", help="the figure's title (default: the runs' names)")


def _plot_run(args: argparse.Namespace) -> int:
    out = args.output or (args.run_dirs[0] / "dashboard.png" if len(args.run_dirs) == 1 else Path("dashboard.png"))
    print(f"fastppo plot: {dashboard(args.run_dirs, out, title=args.title)}")
    return 0


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
    # The benchmarks, not their helpers (the harness, the GPU check, the workers and pieces they load).
    helpers = ("common", "trl_workload", "trl_grpo_workload", "grpo_reward", "forced_lengths")
    scripts = sorted(p for p in BENCH_DIR.glob("*.py") if p.stem not in helpers and p.stem[0] != "_")
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
        rc = subprocess.run([sys.executable, str(script), *shlex.split(args.args)], cwd=BENCH_DIR.parent).returncode or rc
    return rc


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("PPO-max RLHF training (policy, critic, reward, reference)", _train_args, _train_run),
    "sft": ("supervised fine-tuning on {prompt, response} records (loss on response tokens)", add_stage_arguments,
            stage_command("sft", SFTConfig, sft)),
    "train-rm": ("reward-model training on {prompt, chosen, rejected} pairs (-log sigmoid(r_c - r_r))", add_stage_arguments,
                 stage_command("train-rm", RMConfig, train_rm)),
    "eval": ("evaluate a model on prompts: eval.n_samples responses each, reward, mean@k, pass@k, length",
             _eval_args, _eval_run),
    "plot": ("one PNG dashboard of the standard curves of one or more runs (overlaid)", _plot_args, _plot_run),
    "demo": (demos.HELP, demos.add_arguments, demos.run),
    "bench": ("run the benchmarks in bench/ (fused ops and the end-to-end trainer)", _bench_args, _bench_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastppo", description="Fast PPO-max RLHF on fused Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_, description=help_))
    return parser


def _message(exc: BaseException) -> str:
    """The error's message on one line; an OSError names its file(s)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        files = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        text = f"{exc.strerror}: {files}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _to_run_log(new_handlers: list[logging.Handler], msg: str, exc_info=None) -> None:
    """Write an error to the log files the command set up (its run's train.log), not again to the console."""
    files = [h for h in new_handlers if isinstance(h, logging.FileHandler)]
    if files:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, exc_info)
        for h in files:
            h.handle(record)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; key=value arguments are overrides wherever they stand."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        # Overrides after an option that takes a value (`--resume run.iterations=300 run.save_every=10`: argparse
        # gives --resume the first and leaves the rest unclaimed): they are overrides all the same.
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Only `train` shards across processes; N copies of another stage would race on one output directory.
        print(f"fastppo {args.command}: error: runs in one process; under torchrun only `fastppo train` is "
              "distributed (start this stage without torchrun)", file=sys.stderr)
        return 2
    if not sys.stderr.isatty():
        # Off a terminal, Hugging Face's own bars (loading, saving, downloading) would write every frame into
        # the log; fastppo's own progress becomes log lines (`sft.progress`).
        hf_logging.disable_progress_bar()
    handlers_before = list(log.handlers)   # a log file the command sets up is this run's (not an earlier run's)

    def fail(message: str, exc_info=None) -> None:
        # From torchrun's environment: the process group may be gone by now.
        where = f" (rank {os.environ.get('RANK', '0')}/{env_world_size()})" if env_world_size() > 1 else ""
        line = f"fastppo {args.command}: error{where}: {message}"
        print(line, file=sys.stderr, flush=True)
        _to_run_log([h for h in log.handlers if h not in handlers_before], line, exc_info)

    try:
        return COMMANDS[args.command][2](args)
    except KNOWN_ERRORS as exc:
        fail(_message(exc))
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt as exc:
        fail(_message(exc) if str(exc) else "interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an unforeseen failure: the traceback goes to stderr and to train.log
        _to_run_log([h for h in log.handlers if h not in handlers_before],
                    f"fastppo {args.command}: unexpected {type(exc).__name__}: {_message(exc)}", sys.exc_info())
        raise


if __name__ == "__main__":
    sys.exit(main())
