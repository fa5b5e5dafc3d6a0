"""Worker for tests/test_dist_helpers.py: fastppo.dist's reduce helpers over a 2-process gloo group.

Spawned children import this module by name (it is on sys.path through
pytest's `pythonpath`, which torch.multiprocessing's spawn passes on).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def dist_ops_worker(rank: int, world_size: int, init_file: str, shards, out_dir: str) -> None:
    """Rank `rank` reduces its own values with fastppo.dist's helpers; saves the results to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from fastppo import dist
        from fastppo.masked import masked_count, masked_moments

        x, mask = shards[rank]
        before = x.clone()
        results = {
            "sum": dist.all_reduce(x),
            "max": dist.all_reduce(x, "max"),
            "min": dist.all_reduce(x, "min"),
            "dict_sum": dist.all_reduce_dict({"a": x[0], "b": x[1]}),
            "dict_max": dist.all_reduce_dict({"a": x[0], "b": x[1]}, "max"),
            "count": masked_count(mask, group=dist.group()),
            "moments": masked_moments(x, mask, unbiased=False, group=dist.group()),
            "untouched": torch.equal(x, before),
            "gathered": dist.all_gather_cat(x),
        }
        try:
            with dist.collective_errors("testing"):
                raise tdist.DistBackendError("backend gave up")
        except dist.DistributedError as exc:
            results["typed_error"] = str(exc)
        try:
            with dist.collective_errors("testing"):
                raise RuntimeError("a shape mismatch, nothing to do with the group")
        except dist.DistributedError:
            results["plain_error"] = "wrapped"
        except RuntimeError:
            results["plain_error"] = "kept"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()
