"""User code run by name in worker processes: reward functions (`rewards`) and environments (`envs`).

    import_object   "module:attribute" -> the object, looked for on sys.path and in the working folder, an error
                    naming the config field when it cannot be had
    WorkerPool      a pebble process pool (forkserver start) whose calls come back as what happened to them:
                    their value, a timeout (the call killed with its worker), or an error; a worker that dies is
                    an error naming the call and how it died (exit code, signal)

Calls run in processes, not threads: a call past its timeout is killed with its worker process (a thread cannot
be stopped, and would keep a core busy for the rest of the run), CPU-bound verifiers and environments run in
parallel free of the GIL, and libraries' own signal-based timeouts need the main thread of their process. The
forkserver starts one clean process that imports the modules named in `preload` once; workers fork from it
cheaply, never from the trainer (which holds CUDA state and threads).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
from concurrent.futures import BrokenExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pebble


def import_object(name: str, field_name: str, error: type[Exception], what: str = "callable"):
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


def worker_death(exc: BaseException) -> str:
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


def main_module_unguarded() -> str | None:
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


class Called(NamedTuple):
    """What happened to one call: `value` when it returned, `timed_out`, or `error` ("Type: message")."""
    value: Any = None
    timed_out: bool = False
    error: str | None = None


class WorkerPool:
    """`workers` processes (started at the first call; `close` stops them) running calls with a per-call timeout."""

    def __init__(self, workers: int, preload: list[str]) -> None:
        self.workers, self.preload = workers, preload
        self._pool: pebble.ProcessPool | None = None

    def submit(self, fn: Callable, args: tuple, timeout: float | None):
        """A future of fn(*args) in a worker (fn must be importable there: a module-level function)."""
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(self.preload)
            self._pool = pebble.ProcessPool(max_workers=self.workers, context=ctx)
        return self._pool.schedule(fn, args, timeout=timeout)

    @staticmethod
    def outcome(future, who: str, error: type[Exception]) -> Called:
        """The future's `Called`. A worker that died while running it raises `error` naming `who` (the function or
        environment, and the prompt) and how it died; a script without an `if __name__ == '__main__':` guard is
        named as the likely cause when that is what it lacks."""
        try:
            return Called(value=future.result())
        except FutureTimeout:
            return Called(timed_out=True)
        except (pebble.ProcessExpired, BrokenExecutor) as exc:
            unguarded = main_module_unguarded()
            hint = ("" if unguarded is None else f"; {unguarded} calls fastppo at import time: do it under "
                    "`if __name__ == '__main__':` (worker processes import the main module)")
            raise error(f"{who}: {worker_death(exc)}{hint}") from None
        except Exception as exc:
            return Called(error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None
