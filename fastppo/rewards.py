"""Verifiable reward functions: `reward.functions`, run in worker processes with a per-call timeout.

A reward function is any importable callable named "module:function":

    fn(prompt_text: str, response_text: str, record: dict) -> float | None

prompt_text is the prompt as the policy saw it (decoded, special tokens dropped), response_text the sampled
response (without EOS), record the prompt's whole data row (e.g. a reference `answer`). None means "cannot
score" and becomes reward.invalid_score. The functions' weighted sum is the response's outcome reward, added to
the reward model's score when there is one.

Calls run in a pebble process pool (forkserver start), not threads: a call past reward.function_timeout_s is
killed with its worker process (a thread cannot be stopped, and would keep a core busy for the rest of the
run), CPU-bound verifiers run in parallel free of the GIL, and math-verify's own signal-based timeouts need the
main thread of their process. The forkserver starts one clean process that imports this module once; workers
fork from it cheaply, never from the trainer (which holds CUDA state and threads).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import multiprocessing
import numbers
import os
import signal
import sys
from concurrent.futures import BrokenExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pebble
import torch

from .config import RewardConfig
from .rollout import Rollout

log = logging.getLogger("fastppo")


def decode_rollout(tokenizer, rollout: Rollout) -> tuple[list[str], list[str]]:
    """(prompt texts, response texts) of a rollout's rows, special tokens (padding, EOS, chat markers) dropped."""
    P = rollout.prompt_width
    prompt_mask = rollout.attention_mask[:, :P].bool()
    prompts = [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
               for ids, m in zip(rollout.sequences[:, :P].cpu(), prompt_mask.cpu())]
    responses = [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                 for ids, m in zip(rollout.responses.cpu(), rollout.response_mask.cpu())]
    return prompts, responses


class RewardFunctionError(RuntimeError):
    """A reward function failed; the message names the function and the prompt."""


class UnusableRewardFunction(RewardFunctionError, ValueError):
    """A reward function that cannot be imported, or called as one: a wrong input, found at start-up (a ValueError:
    the command line exits 2)."""


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""Scores are computed in float32: a reward beyond ±3.4e38 (finite in Python) would become infinite there."""


def import_object(name: str, field_name: str, what: str = "callable", error: type[Exception] = UnusableRewardFunction):
    """The object behind "module:attribute", an `error` naming `field_name` when it cannot be had (`what`: the kind
    of object, for the message).

    A module that is not importable from sys.path is looked for in the working folder too (where a user who
    runs `fastppo` next to `myrewards.py` expects it, as `python script.py` would find it): the folder is
    appended to sys.path, after the installed packages, so it never shadows one of them.
    """
    module_name, _, attr = name.partition(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            here = os.getcwd()
            if exc.name != module_name.split(".")[0] or here in sys.path:
                raise
            sys.path.append(here)
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name.split(".")[0]:
            raise error(f"{field_name}: no module named {exc.name!r} (from {name!r}) on sys.path nor in the working "
                        f"folder {os.getcwd()}: put {exc.name}.py there, install it, or add its folder to PYTHONPATH"
                        ) from None
        raise error(f"{field_name}: cannot import module {module_name!r} of {name!r}: "
                    f"ModuleNotFoundError: {exc}") from None
    except Exception as exc:
        raise error(f"{field_name}: cannot import module {module_name!r} of {name!r}: "
                    f"{type(exc).__name__}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise error(f"{field_name}: {module_name!r} has no {what} {attr!r} (from {name!r}; the module is "
                    f"{getattr(module, '__file__', None) or 'built in'})")
    return obj


_LOADED: dict[str, Callable] = {}


def load_function(name: str, field_name: str = "reward.functions") -> Callable:
    """The callable behind "module:function" (cached per process); an UnusableRewardFunction naming `field_name` if
    it cannot be imported, is not callable, or cannot be called as fn(prompt_text, response_text, record)."""
    if name in _LOADED:
        return _LOADED[name]
    fn = import_object(name, field_name)
    if not callable(fn):
        raise UnusableRewardFunction(f"{field_name}: {name!r} is a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):                         # a builtin without one: its calls will tell
        signature = None
    if signature is not None:
        try:
            signature.bind("", "", {})
        except TypeError as exc:
            signature = signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                                          return_annotation=signature.empty)
            raise UnusableRewardFunction(f"{field_name}: {name}{signature} cannot be called as fn(prompt_text, "
                                      f"response_text, record) ({exc}): give it these three parameters") from None
    _LOADED[name] = fn
    return fn


def call_function(name: str, prompt_text: str, response_text: str, record: dict) -> float | None:
    """Run one reward function (in a worker) and check what it returns: a number finite in float32, or None.

    A function that calls sys.exit raises an ordinary error here (reward.function_errors decides), instead of
    ending the worker with nothing said."""
    try:
        value = load_function(name)(prompt_text, response_text, record)
    except SystemExit as exc:
        raise RuntimeError(f"it called sys.exit({exc.code!r}) (SystemExit); a reward function returns a float or "
                           "None") from None
    if value is None:
        return None
    if not isinstance(value, (numbers.Real, np.bool_)):
        raise TypeError(f"returned {type(value).__name__} {value!r}; a reward function returns a float or None")
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError(f"returned {value}; a reward must be finite in float32, |r| <= {FLOAT32_MAX:.3g}, the dtype "
                         "scores are computed in (return None for 'cannot score')")
    return float(value)


def _worker_death(exc: BaseException) -> str:
    """Why a worker process ended, from pebble's ProcessExpired (its exit code) or a broken pool."""
    code = getattr(exc, "exitcode", None)
    if code is None:
        return f"the worker pool broke ({type(exc).__name__}: {exc})"
    if code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        return f"its worker process was killed by {sig} (exit code {code}), e.g. a crash in native code"
    return f"its worker process exited with code {code} while running it (os._exit, or a library ending the process)"


def _main_module_unguarded() -> str | None:
    """The main script's path when it calls code at import time without an `if __name__ == '__main__':` guard
    (worker processes import the main module: such a script runs again in each), else None."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py") or getattr(main, "__spec__", None) is not None:
        return None                                         # `python -m`, an entry point or an interactive session
    try:
        source = Path(path).read_text()
    except OSError:
        return None
    return None if "__name__" in source else path


@dataclass
class FunctionScores:
    """What `RewardFunctions.score` returns for B responses."""
    totals: list[float]
    """Σ_k weight_k · value_k per response (invalid_score for None, timeouts and tolerated errors)."""
    means: dict[str, float] = field(default_factory=dict)
    """Per function: the mean value over the B responses (after invalid_score substitution)."""
    invalid: int = 0
    """Calls that returned None."""
    timeouts: int = 0
    """Calls killed after reward.function_timeout_s."""
    errors: int = 0
    """Calls that raised (scored invalid with reward.function_errors=invalid)."""


class RewardFunctions:
    """The configured reward functions and their worker pool (started at the first call; `close` stops it)."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        for i, f in enumerate(cfg.functions):               # fail at start-up, not at the first rollout
            load_function(f.name, f"reward.functions[{i}].name")
        self._pool: pebble.ProcessPool | None = None

    def __bool__(self) -> bool:
        return bool(self.cfg.functions)

    def _workers(self) -> pebble.ProcessPool:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            self._pool = pebble.ProcessPool(max_workers=self.cfg.function_workers, context=ctx)
        return self._pool

    def score(self, prompts: list[str], responses: list[str], records: list[dict],
              prompt_indices: list[int]) -> FunctionScores:
        """Score B responses with every function (all calls in flight at once). A call that raises stops the run
        with a RewardFunctionError naming the function and the prompt's index in the data (unless
        reward.function_errors=invalid); a call past the timeout is killed and scored invalid."""
        cfg, fns = self.cfg, self.cfg.functions
        pool = self._workers()
        futures = [[pool.schedule(call_function, (f.name, p, r, rec), timeout=cfg.function_timeout_s) for f in fns]
                   for p, r, rec in zip(prompts, responses, records)]
        out = FunctionScores(totals=[0.0] * len(prompts), means={f.name: 0.0 for f in fns})
        raised = [0] * len(fns)
        try:
            for row, (row_futures, index) in enumerate(zip(futures, prompt_indices)):
                for k, (f, fut) in enumerate(zip(fns, row_futures)):
                    try:
                        value = fut.result()
                    except FutureTimeout:
                        out.timeouts += 1
                        log.warning("reward function %s (reward.functions[%d]) timed out after %gs on prompt %d: "
                                    "scored reward.invalid_score", f.name, k, cfg.function_timeout_s, index)
                        value = None
                    except (pebble.ProcessExpired, BrokenExecutor) as exc:
                        unguarded = _main_module_unguarded()
                        hint = ("" if unguarded is None else f"; {unguarded} calls fastppo at import time: do it under "
                                "`if __name__ == '__main__':` (worker processes import the main module)")
                        raise RewardFunctionError(f"reward function {f.name} (reward.functions[{k}]) on prompt {index}: "
                                                  f"{_worker_death(exc)}{hint}") from None
                    except Exception as exc:
                        what = (f"reward function {f.name} (reward.functions[{k}]) raised on prompt {index}: "
                                f"{type(exc).__name__}: {exc}")
                        if cfg.function_errors != "invalid":
                            raise RewardFunctionError(f"{what} (set reward.function_errors=invalid to score such "
                                                      "responses reward.invalid_score instead)") from None
                        out.errors += 1
                        raised[k] += 1
                        log.warning("%s: scored reward.invalid_score", what)
                        value = None
                    else:
                        out.invalid += value is None
                    value = cfg.invalid_score if value is None else value
                    out.totals[row] += f.weight * value
                    out.means[f.name] += value / len(prompts)
        finally:
            for fut in (fut for row_futures in futures for fut in row_futures):
                fut.cancel()
        for k, f in enumerate(fns):
            if raised[k] == len(prompts):
                log.warning("reward function %s (reward.functions[%d]) raised on every one of the %d responses: it "
                            "gives no signal, only reward.invalid_score (see its errors above)", f.name, k, len(prompts))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None


# ----------------------------------------------------------------------------
# Built-in reward functions
# ----------------------------------------------------------------------------

def math_answer(prompt_text: str, response_text: str, record: dict) -> float:
    """1.0 when the response's final answer is mathematically equal to record["answer"], else 0.0.

    Both sides go through math-verify (`parse` extracts LaTeX and plain expressions from the text, `verify`
    compares them symbolically and numerically). A record without an `answer` field is a data error (it stops the run, naming the
    prompt).
    """
    from math_verify import parse, verify  # lazy: imports sympy and an ANTLR parser (~1 s); only math runs need it

    if "answer" not in record:
        raise KeyError(f"math_answer needs an 'answer' field in the prompt's record (fields: {sorted(record)})")
    gold = parse(str(record["answer"]))
    if not gold:
        raise ValueError(f"math_answer cannot parse the reference answer {record['answer']!r}")
    return float(verify(gold, parse(response_text)))
