"""Process-wide run plumbing shared by every stage (`train`, `sft`, `train-rm`): seeding and logging.

    seed_everything   Python, NumPy and torch RNGs from one seed
    setup_logging     the `fastppo` logger: console (through tqdm, so bars stay whole) + <run dir>/train.log
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


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
