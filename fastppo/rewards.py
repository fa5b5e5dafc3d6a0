"""Verifiable reward functions: `reward.functions`, run in worker processes with a per-call timeout.

A reward function is any importable callable named "module:function":

    fn(prompt_text: str, response_text: str, record: dict) -> float | None

prompt_text is the prompt as the policy saw it (decoded, special tokens dropped), response_text the sampled
response (without EOS), record the prompt's whole data row (e.g. a reference `answer`). None means "cannot
score" and becomes reward.invalid_score. The functions' weighted sum is the response's outcome reward, added to
the reward model's score when there is one.

Calls run in worker processes (`workers.WorkerPool`, whose docstring says why processes): a call past
reward.function_timeout_s is killed with its worker and scored reward.invalid_score.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .config import RewardConfig
from .rollout import Rollout
from .workers import WorkerPool, import_object

log = logging.getLogger("fastppo")


def decode_rollout(tokenizer, rollout: Rollout) -> tuple[list[str], list[str]]:
    """(prompt texts, response texts) of a rollout's rows, special tokens (padding, EOS, chat markers) dropped. With
    an environment the prompt is the first turn and the response the last answer (the final answer a reward
    function scores)."""
    P = rollout.prompt_width
    prompt_mask = rollout.attention_mask[:, :P].bool()
    answer = rollout.response_mask
    if rollout.turn_index is not None:
        answer = answer & (rollout.turn_index == rollout.turns[:, None] - 1)
    prompts = [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
               for ids, m in zip(rollout.sequences[:, :P].cpu(), prompt_mask.cpu())]
    responses = [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                 for ids, m in zip(rollout.responses.cpu(), answer.cpu())]
    return prompts, responses


class RewardFunctionError(RuntimeError):
    """A reward function failed; the message names the function and the prompt."""


class UnusableRewardFunction(RewardFunctionError, ValueError):
    """A reward function that cannot be imported, or called as one: a wrong input, found at start-up (a ValueError:
    the command line exits 2)."""


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""Scores are computed in float32: a reward beyond ±3.4e38 (finite in Python) would become infinite there."""


_LOADED: dict[str, Callable] = {}


def load_function(name: str, field_name: str = "reward.functions") -> Callable:
    """The callable behind "module:function" (cached per process); an UnusableRewardFunction naming `field_name` if
    it cannot be imported, is not callable, or cannot be called as fn(prompt_text, response_text, record)."""
    if name in _LOADED:
        return _LOADED[name]
    fn = import_object(name, field_name, UnusableRewardFunction)
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
        self.pool = WorkerPool(cfg.function_workers, preload=[__name__])

    def __bool__(self) -> bool:
        return bool(self.cfg.functions)

    def score(self, prompts: list[str], responses: list[str], records: list[dict],
              prompt_indices: list[int]) -> FunctionScores:
        """Score B responses with every function (all calls in flight at once). A call that raises stops the run
        with a RewardFunctionError naming the function and the prompt's index in the data (unless
        reward.function_errors=invalid); a call past the timeout is killed and scored invalid."""
        cfg, fns = self.cfg, self.cfg.functions
        futures = [[self.pool.submit(call_function, (f.name, p, r, rec), cfg.function_timeout_s) for f in fns]
                   for p, r, rec in zip(prompts, responses, records)]
        out = FunctionScores(totals=[0.0] * len(prompts), means={f.name: 0.0 for f in fns})
        raised = [0] * len(fns)
        try:
            for row, (row_futures, index) in enumerate(zip(futures, prompt_indices)):
                for k, (f, fut) in enumerate(zip(fns, row_futures)):
                    name = f"reward function {f.name} (reward.functions[{k}])"
                    called = WorkerPool.outcome(fut, f"{name} on prompt {index}", RewardFunctionError)
                    if called.timed_out:
                        out.timeouts += 1
                        log.warning("%s timed out after %gs on prompt %d: scored reward.invalid_score", name,
                                    cfg.function_timeout_s, index)
                    elif called.error is not None:
                        what = f"{name} raised on prompt {index}: {called.error}"
                        if cfg.function_errors != "invalid":
                            raise RewardFunctionError(f"{what} (set reward.function_errors=invalid to score such "
                                                      "responses reward.invalid_score instead)")
                        out.errors += 1
                        raised[k] += 1
                        log.warning("%s: scored reward.invalid_score", what)
                    else:
                        out.invalid += called.value is None
                    value = cfg.invalid_score if called.value is None else called.value
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
        self.pool.close()


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
