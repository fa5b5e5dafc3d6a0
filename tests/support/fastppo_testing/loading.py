"""Worker of the loading-at-scale test (tests/test_precision.py), started by torchrun:

    torchrun --nproc_per_node=2 -m fastppo_testing.loading OUT OVERRIDES...

Each rank loads the four models with FSDP2 (`load_models` with a `parallel.Sharder`) and records, in
OUT/rank<R>.pt, its resident memory before loading and its peak while loading (VmHWM, reset just before),
the bytes of its shards and of the largest full model; rank 0 also saves every model's full state dict
and non-persistent buffers, and the RNG state after loading, for comparison with a one-process load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(out_dir: str, overrides: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fastppo import dist

    from fastppo import parallel
    from fastppo.config import load_config
    from fastppo.models import load_models

    cfg = load_config(None, overrides)
    device = torch.device("cpu")
    dist.setup("auto", "gloo", 120, device)
    torch.manual_seed(cfg.run.seed)
    # Import the modelling code before measuring (module imports are not model memory).
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.policy_path))
        AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(cfg.model.reward_path, num_labels=1))
    sharder = parallel.Sharder(parallel.build_mesh(1, device), device=device, param_dtype=None, reduce_dtype=torch.float32,
                           offload_frozen=False, reshard_after_forward=True)
    dist.barrier()
    rss_before = _status_kb("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")                      # VmHWM := VmRSS
    models = load_models(cfg.model, device, shard=sharder)
    peak = _status_kb("VmHWM") * 1024
    roles = ("policy", "ref", "critic", "reward")
    shard_bytes, full_bytes = 0, []
    for role in roles:
        params = list(getattr(models, role).parameters())
        shard_bytes += sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in params)
        full_bytes.append(sum(p.numel() * p.element_size() for p in params))
    out = Path(out_dir)
    torch.save({"rss_before": rss_before, "peak": peak, "shard_bytes": shard_bytes, "largest_model_bytes": max(full_bytes)},
               out / f"rank{dist.rank()}.pt")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    states = {role: get_model_state_dict(getattr(models, role), options=options) for role in roles}   # collective
    if dist.rank() == 0:
        buffers = {role: {k: b.clone() for k, b in getattr(models, role).named_buffers()} for role in roles}
        torch.save({"states": states, "buffers": buffers, "rng": torch.get_rng_state()}, out / "models.pt")
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
