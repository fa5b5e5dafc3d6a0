"""Precision on GPU and host syncs in the loop, checked on CPU.

- which mechanism gives float32 master weights and bfloat16 compute for each config (FSDP2's
  MixedPrecisionPolicy, also in one CUDA process; torch.autocast without FSDP);
- 16-bit master weights with a learning rate their rounding swallows are refused;
- a training iteration with float32 master weights and bfloat16 compute runs on CPU (autocast and
  FSDP on one process) and updates float32 weights with float32 AdamW state;
- the hot paths (a decode step, a PPO minibatch) make no host sync and no host-to-device copy beyond
  the one the update needs per optimizer step, counted with a TorchFunctionMode;
- with two processes, rank 0 reads the weights and the other rank only ever holds its shards, and the
  models equal those one process loads.
"""

from __future__ import annotations

import collections
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import fastppo
import fastppo.experience
import fastppo.groups
from fastppo import dist
from fastppo import parallel
from fastppo.config import ConfigError, RMConfig, RolloutConfig, SFTConfig, load_config
from fastppo.models import backbone_states, load_models
from fastppo.packing import Packing
from fastppo.rollout import CounterSampler
from fastppo.parallel import compute_dtype
from fastppo.train import train
from fastppo_testing.distributed import output, torchrun
from fastppo_testing.tiny_models import build_tokenizer, make_tiny_setup, model_configs
from fastppo_testing.trainer import tiny_setups  # noqa: F401  (fixture)

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")


# ----------------------------------------------------------------------------
# Which precision mechanism each config gets
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shard, device, world, sharded", [
    ("auto", CUDA, 1, True),       # FSDP2 on one GPU: its MixedPrecisionPolicy gives fp32 master / bf16 compute
    ("auto", CPU, 1, False),
    ("auto", CPU, 2, True),
    ("auto", CUDA, 8, True),
    ("always", CPU, 1, True),
    ("never", CUDA, 1, False),     # autocast instead (parallel.Autocast)
])
def test_shard_auto_uses_fsdp_on_cuda_even_in_one_process(shard, device, world, sharded):
    assert dist.wants_sharding(shard, device, world) is sharded


def test_compute_dtype_is_bfloat16_on_cuda_and_the_storage_dtype_on_cpu():
    assert compute_dtype("auto", CUDA) == torch.bfloat16
    assert compute_dtype("auto", CPU) is None
    assert compute_dtype("bfloat16", CPU) == torch.bfloat16
    assert compute_dtype("float32", CUDA) == torch.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("lr_field", ["optim.policy_lr", "optim.critic_lr"])
def test_16bit_master_weights_with_a_small_learning_rate_are_refused(tiny_setups, dtype, lr_field):
    setup = tiny_setups("llama")
    with pytest.raises(ConfigError) as err:
        load_config(None, setup.overrides(**{"model.dtype": dtype, lr_field: 5e-7}))
    msg = str(err.value)
    assert "\n" not in msg and "model.dtype" in msg and lr_field in msg and "parallel.param_dtype=bfloat16" in msg


@pytest.mark.parametrize("schema", [SFTConfig, RMConfig])
def test_16bit_weights_with_a_small_learning_rate_are_refused_in_sft_and_train_rm(schema):
    """sft and train-rm keep (and compute in) model.dtype: the same rounding swallows their updates."""
    paths = ["model.path=m", "data.train_path=t"]
    with pytest.raises(ConfigError) as err:
        load_config(schema=schema, overrides=[*paths, "model.dtype=bfloat16", "optim.lr=5e-6"])
    msg = str(err.value)
    assert "\n" not in msg and "model.dtype" in msg and "optim.lr=5e-06" in msg and "model.dtype=float32" in msg
    load_config(schema=schema, overrides=[*paths, "model.dtype=bfloat16", "optim.lr=1e-4"])
    load_config(schema=schema, overrides=[*paths, "model.dtype=float32", "optim.lr=5e-6"])


def test_16bit_master_weights_are_accepted_with_a_large_learning_rate_and_float32_with_any(tiny_setups):
    setup = tiny_setups("llama")
    load_config(None, setup.overrides(**{"model.dtype": "bfloat16", "optim.policy_lr": 1e-4, "optim.critic_lr": 1e-4}))
    load_config(None, setup.overrides(**{"model.dtype": "bfloat16", "optim.policy_lr": 0.0, "optim.critic_lr": 1e-4}))
    load_config(None, setup.overrides(**{"model.dtype": "float32", "optim.policy_lr": 5e-7, "optim.critic_lr": 1e-7}))


def _linear_output_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Run the backbone once; the output dtype of every nn.Linear it called (by module name)."""
    seen: dict[str, torch.dtype] = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, name=name: seen.setdefault(name, out.dtype) and None)
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        ids = torch.randint(5, 30, (2, 7))
        mask = torch.ones_like(ids)
        hidden = backbone_states(model, ids, mask, Packing.padded_batch(mask, mask.bool()))
    finally:
        for h in handles:
            h.remove()
    seen["<hidden>"] = hidden.dtype
    return seen


@pytest.mark.parametrize("compute, want", [(torch.bfloat16, torch.bfloat16), (None, torch.float32),
                                           (torch.float32, torch.float32)])
def test_autocast_runs_the_blocks_in_the_compute_dtype_over_float32_weights(tiny_setups, compute, want):
    model = AutoModelForCausalLM.from_pretrained(tiny_setups("llama").policy, dtype=torch.float32)
    model = parallel.Autocast(CPU, compute)(model, "policy", trained=True)
    dtypes = _linear_output_dtypes(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())            # master weights untouched
    blocks = {name: d for name, d in dtypes.items() if ".layers." in name}
    assert blocks and set(blocks.values()) == {want}, dtypes
    # The final norm runs outside autocast: the fused lm_head ops get float32 hidden states (and weight).
    assert dtypes["<hidden>"] == torch.float32
    assert all(parallel.autocast_dtype(b) == (want if compute == torch.bfloat16 else None)
               for b in parallel.transformer_blocks(model))


def test_load_models_prepares_with_autocast_when_not_sharded(tiny_setups):
    """`train` without FSDP hands load_models a parallel.Autocast: its compute dtype is read like a Sharder's."""
    cfg = load_config(None, tiny_setups("llama").overrides())
    models = load_models(cfg.model, CPU, shard=parallel.Autocast(CPU, torch.bfloat16))
    for model in (models.policy, models.ref, models.critic, models.reward):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert {parallel.autocast_dtype(b) for b in parallel.transformer_blocks(model)} == {torch.bfloat16}


def _capture_optimizers(monkeypatch) -> list[torch.optim.Optimizer]:
    train_module = importlib.import_module("fastppo.train")       # `fastppo.train` the attribute is the function
    made = []
    real = train_module.make_optimizer

    def make(model, lr, cfg):
        opt = real(model, lr, cfg)
        made.append(opt)
        return opt

    monkeypatch.setattr(train_module, "make_optimizer", make)
    return made


@pytest.mark.parametrize("shard", ["never", "always"])
def test_an_iteration_with_float32_master_weights_and_bfloat16_compute_runs_on_cpu(tiny_setups, tmp_path, monkeypatch,
                                                                                    shard):
    """What `make gpu-check` runs on CUDA (model.dtype=float32, parallel.param_dtype=bfloat16), on CPU."""
    setup = tiny_setups("llama")
    opts = _capture_optimizers(monkeypatch)
    linear_dtypes = collections.Counter()
    real_linear = nn.functional.linear

    def linear(x, w, b=None):
        out = real_linear(x, w, b)
        linear_dtypes[out.dtype] += 1
        return out

    monkeypatch.setattr(nn.functional, "linear", linear)
    cfg = load_config(None, setup.overrides(**{
        "model.dtype": "float32", "parallel.param_dtype": "bfloat16", "parallel.shard": shard,
        "run.iterations": 1, "run.output_dir": tmp_path / "run", "run.export_at_end": False}))
    result = train(cfg)
    assert result.iterations_done == 1
    m = result.metrics
    assert all(v == v and abs(v) != float("inf") for k, v in m.items() if isinstance(v, float)), m
    assert m["train/optimizer_steps"] == 2 and m["train/skipped_steps"] == 0
    assert linear_dtypes[torch.bfloat16] > 0                                     # the blocks computed in bf16
    policy_opt, critic_opt = opts
    for opt in (policy_opt, critic_opt):
        params = [p for g in opt.param_groups for p in g["params"]]
        assert params and all(p.dtype == torch.float32 for p in params)        # fp32 master weights
        states = [s for p in params for s in opt.state[p].values() if isinstance(s, torch.Tensor) and s.dim()]
        assert states and all(s.dtype == torch.float32 for s in states)        # fp32 AdamW moments


# ----------------------------------------------------------------------------
# Host syncs and host-to-device copies, counted
# ----------------------------------------------------------------------------

_SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
_FACTORIES = {"tensor", "as_tensor"}


def _index_has_bool_tensor(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class HostTraffic(TorchFunctionMode):
    """Counts, per fastppo source file, the calls made there that sync the host or copy host data to a device.

    sync: .item() / .tolist() / .cpu() / bool() / int() / float() of a tensor, and indexing with a boolean
    mask (its nonzero() waits for the device). copy: torch.tensor / as_tensor with a device, .to(device) and
    .cuda(). Calls made inside torch or transformers are not counted (only frames in `files`).
    """

    def __init__(self, files: tuple[str, ...]) -> None:
        super().__init__()
        root = Path(fastppo.__file__).parent
        self.files = {str(root / f) for f in files}
        self.syncs: collections.Counter = collections.Counter()
        self.copies: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        if caller.f_code.co_filename in self.files:
            name = getattr(func, "__name__", "")
            where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
            if name in _SYNCS or (name in ("__getitem__", "__setitem__") and _index_has_bool_tensor(args[1])):
                self.syncs[where] += 1
            elif (name in _FACTORIES and kwargs.get("device") is not None) or name == "cuda" or (
                    name == "to" and (kwargs.get("device") is not None
                                      or any(isinstance(a, (torch.device, str)) for a in args[1:]))):
                self.copies[where] += 1
        return func(*args, **kwargs)


def test_a_decode_step_makes_no_host_sync_and_no_host_copy():
    V, B = 300, 4
    cfg = RolloutConfig(temperature=0.7, top_k=50, top_p=0.9)
    sampler = CounterSampler(cfg, seed=11, sample_ids=torch.arange(B), prompt_width=3, vocab_size=V - 20)
    scores = torch.randn(B, V)
    sampler(torch.zeros(B, 3, dtype=torch.long), scores)                         # the first step sets up
    with HostTraffic(("rollout.py",)) as traffic:
        for step in range(1, 6):
            sampler(torch.zeros(B, 3 + step, dtype=torch.long), scores)
    assert not traffic.syncs and not traffic.copies, (traffic.syncs, traffic.copies)


def test_scoring_and_the_update_sync_once_per_optimizer_step_and_copy_once_per_update(tiny_setups, tmp_path):
    """One iteration, 2 epochs x 2 minibatches x 2 micro-batches: the update's only host sync is the finiteness
    check of each optimizer step, its only host-to-device copy the minibatch order; scoring syncs once per phase
    per iteration, to count the non-finite outcome scores (phase 1) and the non-finite forwards (phase 2) (each
    dropped and named, or the run stops), and copies nothing."""
    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides(**{
        "ppo.ppo_epochs": 2, "run.iterations": 1, "run.output_dir": tmp_path / "run", "run.export_at_end": False}))
    with HostTraffic(("update.py", "optim.py", "groups.py", "experience.py")) as traffic:
        result = train(cfg)
    steps = int(result.metrics["train/optimizer_steps"])
    assert steps == 4
    step_syncs = {k: v for k, v in traffic.syncs.items() if k.startswith(("update.py", "optim.py"))}
    assert sum(step_syncs.values()) == steps and len(step_syncs) == 1, traffic.syncs
    # phase 1 also agrees on the prompt and response widths of all ranks, as it did before counting non-finite scores
    for module, markers in (("groups", ('"max").tolist()', "n_rm_bad = int(")), ("experience", ("n_bad = int(",))):
        source = Path(getattr(fastppo, module).__file__).read_text().splitlines()
        lines = [next(i for i, text in enumerate(source, start=1) if marker in text) for marker in markers]
        assert {k: v for k, v in traffic.syncs.items() if k.startswith(f"{module}.py")} == {
            f"{module}.py:{line}": 1 for line in lines}, traffic.syncs
    assert sum(traffic.copies.values()) <= 1, traffic.copies


def test_scoring_the_rollout_with_an_appended_eos_does_not_sync(tiny_setups):
    from fastppo.rollout import Rollout, with_eos_for_scoring

    seqs = torch.tensor([[1, 5, 6, 2, 0], [1, 5, 6, 7, 8]])
    rollout = Rollout(sequences=seqs, attention_mask=(seqs != 0).long(),
                      response_mask=torch.tensor([[True, True, True], [True, True, True]]),
                      lengths=torch.tensor([2, 3]), ended=torch.tensor([True, False]), prompt_width=2)
    with HostTraffic(("rollout.py",)) as traffic:
        ids, mask, eos_index = with_eos_for_scoring(rollout, eos_id=2, pad_id=0)
    assert not traffic.syncs and not traffic.copies, (traffic.syncs, traffic.copies)
    assert ids.tolist() == [[1, 5, 6, 2, 0, 0], [1, 5, 6, 7, 8, 2]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert eos_index.tolist() == [3, 5]


# ----------------------------------------------------------------------------
# Loading at scale: rank 0 reads, the other ranks only ever hold their shards
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch, hidden, layers", [
    ("llama", 768, 12),  # 64M parameters, 244 MiB per model in float32: large enough for RSS to show a full copy
    ("gpt2", 32, 2),     # tied embeddings, and a pad token added (embeddings resized, new row drawn from the RNG)
])
def test_ranks_above_0_never_hold_a_full_model_and_load_the_same_weights(tmp_path, arch, hidden, layers):
    setup = make_tiny_setup(tmp_path / "setup", arch)
    tok = build_tokenizer(gpt2_style=arch == "gpt2")
    ids = dict(bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(model_configs(arch, len(tok), hidden=hidden, layers=layers, heads=8, **ids)
                                         ).save_pretrained(setup.policy)
        rm_config = model_configs(arch, len(tok), hidden=hidden, layers=layers, heads=8, **ids)
        rm_config.num_labels = 1
        AutoModelForSequenceClassification.from_config(rm_config).save_pretrained(setup.reward)
    overrides = setup.overrides()
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun(["-m", "fastppo_testing.loading", out, *overrides], cwd=tmp_path / "work", timeout=600)
    assert proc.returncode == 0, output(proc)

    # The same weights, buffers and RNG state as one process loading everything itself (the RNG: the pad
    # token's new embedding row is drawn from it, on rank 0 only, and every rank must go on from the same state).
    got = torch.load(out / "models.pt")
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.run.seed)
    want = load_models(cfg.model, CPU)
    for role in ("policy", "ref", "critic", "reward"):
        model = getattr(want, role)
        state = model.state_dict()
        assert set(got["states"][role]) == set(state), role
        for k, v in state.items():
            assert torch.equal(got["states"][role][k], v), (role, k)
        for k, b in model.named_buffers():
            assert torch.equal(got["buffers"][role][k], b), (role, k)
    assert torch.equal(got["rng"], torch.get_rng_state())

    if arch == "llama":
        # Rank 1's peak while loading: its shards (half of each of the four models: 488 MiB) plus at most one
        # full tensor in flight (set_model_state_dict broadcasts tensor by tensor; here 768 x 1536 x 4 B =
        # 4.5 MiB), plus ~30 MiB of process-group and allocator overhead. Loading each model in full on every
        # rank (and copying the reference from the policy) holds a whole model next to the shards already
        # made (measured at half the size: shards + 0.83 of a model). Half a model (122 MiB) is the line.
        rank1 = torch.load(out / "rank1.pt")
        grown = rank1["peak"] - rank1["rss_before"]
        assert grown < rank1["shard_bytes"] + 0.5 * rank1["largest_model_bytes"], rank1
