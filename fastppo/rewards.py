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
import logging
import math
import multiprocessing
import numbers
from concurrent.futures import BrokenExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import pebble

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


_LOADED: dict[str, Callable] = {}


def load_function(name: str, field_name: str = "reward.functions") -> Callable:
    """The callable behind "module:function" (cached per process); a RewardFunctionError naming `field_name` if it
    cannot be imported or is not callable."""
    if name in _LOADED:
        return _LOADED[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RewardFunctionError(f"{field_name}: cannot import module {module_name!r} of {name!r}: "
                                  f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"{field_name}: {module_name!r} has no callable {attr!r} (from {name!r})")
    _LOADED[name] = fn
    return fn


def call_function(name: str, prompt_text: str, response_text: str, record: dict) -> float | None:
    """Run one reward function (in a worker) and check what it returns: a finite number or None."""
    value = load_function(name)(prompt_text, response_text, record)
    if value is None:
        return None
    if not isinstance(value, numbers.Real):
        raise TypeError(f"returned {type(value).__name__} {value!r}; a reward function returns a float or None")
    if not math.isfinite(value):
        raise ValueError(f"returned {value}; a reward must be finite (return None for 'cannot score')")
    return float(value)


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
                        raise RewardFunctionError(
                            f"reward function {f.name} (reward.functions[{k}]) on prompt {index}: its worker process "
                            f"died ({exc}); a script that calls fastppo.train must do so under "
                            "`if __name__ == '__main__':` (worker processes import the main module)") from None
                    except Exception as exc:
                        what = (f"reward function {f.name} (reward.functions[{k}]) raised on prompt {index}: "
                                f"{type(exc).__name__}: {exc}")
                        if cfg.function_errors != "invalid":
                            raise RewardFunctionError(f"{what} (set reward.function_errors=invalid to score such "
                                                      "responses reward.invalid_score instead)") from None
                        out.errors += 1
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
