"""Reward functions the tests name as "fastppo_testing.reward_fns:<name>" (importable in the worker processes)."""

from __future__ import annotations

import time
import zlib


def length(prompt: str, response: str, record: dict) -> float:
    """Characters of the response."""
    return float(len(response))


def field_x(prompt: str, response: str, record: dict) -> float:
    """The record's field `x`: shows that the prompt's data row reaches the function."""
    return float(record["x"])


def none_when_odd(prompt: str, response: str, record: dict) -> float | None:
    """None (invalid) for records with an odd `x`, else 1."""
    return None if record["x"] % 2 else 1.0


def raises_on_3(prompt: str, response: str, record: dict) -> float:
    if record["x"] == 3:
        raise ValueError("bad record 3")
    return 0.5


def sleeps_on_2(prompt: str, response: str, record: dict) -> float:
    if record["x"] == 2:
        time.sleep(600)
    return 2.0


def returns_text(prompt: str, response: str, record: dict):
    return "1.0"


def constant(prompt: str, response: str, record: dict) -> float:
    """The same reward for every response: no group has signal."""
    return 1.0


def text_hash(prompt: str, response: str, record: dict) -> float:
    """A number that differs between (almost all) different responses."""
    return float(zlib.crc32(response.encode()) % 97)


def hash_unless_blue(prompt: str, response: str, record: dict) -> float:
    """Signal only for prompts that do not mention 'blue' (about two thirds of the synthetic prompts)."""
    return 0.0 if "blue" in prompt else text_hash(prompt, response, record)


def huge(prompt: str, response: str, record: dict) -> float:
    """Finite in Python (float64), infinite in float32."""
    return 1e300


def exits(prompt: str, response: str, record: dict) -> float:
    import sys

    sys.exit(3)


def dies(prompt: str, response: str, record: dict) -> float:
    """Ends its process without a word (os._exit skips every handler)."""
    import os

    os._exit(7)


def segfaults(prompt: str, response: str, record: dict) -> float:
    """Dies as a crash in native code would (some machines map address 0, so no invalid read is sure to fault)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def two_args(prompt: str, response: str) -> float:
    """A function without the record parameter: cannot be called as a reward function."""
    return 1.0


def record_keyword_only(prompt: str, response: str, *, record: dict) -> float:
    """The record as a keyword-only parameter: cannot be called as fn(prompt, response, record) either."""
    return 1.0


def always_raises(prompt: str, response: str, record: dict) -> float:
    raise RuntimeError("broken verifier")


def returns_np_bool(prompt: str, response: str, record: dict):
    import numpy as np

    return np.bool_("fox" in response)
