"""Process-wide run plumbing shared by every stage (`train`, `sft`, `train-rm`).

    seed_everything   Python, NumPy and torch RNGs from one seed
    setup_logging     the `fastppo` logger: console (through tqdm, so bars stay whole) + <run dir>/train.log
    progress          a progress bar on a terminal, progress lines in a log elsewhere
    PhaseTimer        wall time per phase of an iteration
    GracefulStop      SIGTERM / the first Ctrl-C: stop at the next safe point (with a checkpoint)
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm as tqdm_plain
from tqdm.auto import tqdm

from . import dist

log = logging.getLogger("fastppo")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _ConsoleHandler(logging.Handler):
    """Log lines through tqdm.write (they do not break the progress bar), to the current sys.stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: Path, level: str, rank: int = 0) -> None:
    """Rank 0 logs to the console and run_dir/train.log; rank N > 0 to run_dir/train.rankN.log, and to the
    console only warnings and errors, prefixed with its rank."""
    logger = logging.getLogger("fastppo")
    logger.setLevel(level.upper())
    for h in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(h)
    h = _ConsoleHandler()
    prefix = f"[rank{rank}] " if rank else ""
    h.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    if rank:
        h.setLevel(logging.WARNING)
    logger.addHandler(h)
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()
    fh = logging.FileHandler(run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(fh)
    logger.propagate = False


class GracefulStop:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next safe point and exits.

    A second SIGINT raises KeyboardInterrupt at once, with a one-line message (`fastppo.cli` prints it and
    exits 130). Checkpoints are written to a temporary directory and renamed when complete, so stopping in
    the middle of a save leaves the previous checkpoints intact.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("stopped at once by a second Ctrl-C, without saving this iteration; "
                                    "the last checkpoint is intact: resume from it with --resume")
        self.requested = name
        log.warning("%s received: will save a checkpoint after this iteration and exit", name)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class PhaseTimer:
    """Wall time per phase (synchronising CUDA so the time lands in the right phase)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


PROGRESS_LOG_INTERVAL_S = 30.0
"""Without a terminal, a progress line is logged at most this often (and at every step when steps are slower)."""


class _ProgressLog:
    """A file for tqdm that logs each line it draws (through the `fastppo` logger: console and train.log)."""

    def write(self, text: str) -> None:
        if text.strip():
            log.info(text.strip())

    def flush(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm_plain:
    """A tqdm bar on a terminal. When stderr is not one (a log file, a pipe, a batch job), no bar: one progress
    line (steps, elapsed/remaining, rate and the postfix) every PROGRESS_LOG_INTERVAL_S seconds instead, or at
    every step when steps are slower. Callers set the postfix with refresh=False (a refresh draws a line).
    """
    enabled = enabled and dist.is_main()
    bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                    disable=None if enabled else True)             # None: tqdm disables itself off a terminal
    if not enabled or not bar.disable:
        return bar
    return tqdm_plain(total=total, initial=initial, desc=desc, file=_ProgressLog(), mininterval=PROGRESS_LOG_INTERVAL_S,
                miniters=1, bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
