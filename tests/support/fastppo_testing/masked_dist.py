"""Worker for tests/test_masked.py: masked statistics over a gloo process group.

Spawned children import this module by name (it is on sys.path through
pytest's `pythonpath`, which torch.multiprocessing's spawn passes on); test
modules themselves are not importable there.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def masked_stats_worker(rank: int, world_size: int, init_file: str, shards, out_dir: str) -> None:
    """Rank `rank` whitens its own shard (x, mask) with the group; saves the results to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from fastppo.masked import masked_mean, masked_sum, masked_var, masked_whiten

        x, mask = shards[rank]
        group = dist.group.WORLD
        results = {
            "whiten": masked_whiten(x, mask, group=group),
            "whiten_no_shift": masked_whiten(x, mask, shift_mean=False, group=group),
            "mean": masked_mean(x, mask, group=group),
            "var": masked_var(x, mask, group=group),
            "sum": masked_sum(x, mask, group=group),
            "local_mean": masked_mean(x, mask),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
