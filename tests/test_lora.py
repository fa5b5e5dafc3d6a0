"""LoRA (fastppo.lora, through PEFT) for the policy, the critic and the stages.

- the adapted model computes the loss and gradients of the manual low-rank update W + (alpha / r) B A (float64);
- the reference is the policy with its adapters disabled, equal to the base model loaded on its own, and no
  copy of the policy is held; only adapters (and the critic's scalar head) are trained and checkpointed;
- resume is exact; the merged export reloads with AutoModelForCausalLM, the adapter export with PEFT, and both
  reproduce the trained policy; sft and train-rm take model.lora; 2 processes equal 1.
"""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastppo import lora, parallel
from fastppo.checkpoint import export_hf, read_weights
from fastppo.config import ConfigError, LoraConfig, RMConfig, SFTConfig, load_config
from fastppo.models import load_models, load_tokenizer, response_logprobs, scalar_head, score_at, sequence_logprobs
from fastppo.optim import make_optimizer
from fastppo.reward_training import train_rm
from fastppo.sft import sft
from fastppo.train import train
from fastppo_testing.distributed import output, torchrun
from fastppo_testing.tiny_models import write_jsonl
from fastppo_testing.trainer import read_metrics, tiny_setups  # noqa: F401  (fixture)

CPU = torch.device("cpu")


def _lora_cfg(setup, **extra):
    return load_config(None, setup.overrides(**{"model.lora.rank": 4, "model.lora.alpha": 8,
                                                "model.critic_lora.rank": 2, **extra}))


def _randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter matrix random values: PEFT starts B at 0, where the adapted model equals its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _trained_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _distinct_bytes(*models) -> int:
    """Bytes of the distinct parameter tensors held by the models together (a shared tensor counts once)."""
    seen = {}
    for m in models:
        for p in m.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def _batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) (B, L), left-padded."""
    rows = [tok(t)["input_ids"] for t in texts]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tok.pad_token_id)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return ids, mask


TEXTS = ["tell me about the red fox : the fox runs and jumps", "the cat : it sleeps", "describe a dog : it is kind ."]


def _labels(ids, mask):
    """Next-token labels (B, L): ids shifted left, ignored (-100) on padding and at the last column."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return labels


@pytest.fixture(scope="module")
def lora_models(tiny_setups):
    """The four models of a LoRA run (policy rank 4, critic rank 2) with random adapters, and the setup."""
    setup = tiny_setups("llama")
    cfg = _lora_cfg(setup)
    torch.manual_seed(0)
    models = load_models(cfg.model, CPU)
    _randomise_adapters(models.policy)
    _randomise_adapters(models.critic, seed=1)
    return setup, cfg, models


# ----------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------

def test_loss_and_gradients_equal_the_manual_low_rank_update(tiny_setups):
    setup = tiny_setups("llama")
    base = AutoModelForCausalLM.from_pretrained(setup.policy).double()
    model = lora.apply(copy.deepcopy(base), LoraConfig(rank=3, alpha=6.0), field="model.lora", classifier=False)
    _randomise_adapters(model)
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    # all-linear: the 7 projections of attention and MLP in each of the 2 blocks, never the lm_head
    assert len(adapted) == 14 and "lm_head" not in adapted

    ids, mask = _batch(load_tokenizer(str(setup.policy)), TEXTS)
    labels = _labels(ids, mask)

    def loss_of(logits):                                  # token-mean NLL, float64
        lp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return -(lp * (labels >= 0)).sum() / (labels >= 0).sum()

    loss = loss_of(model(input_ids=ids, attention_mask=mask).logits)
    loss.backward()

    # The same loss by hand: every adapted weight replaced by W + (alpha / r) B A, A and B the leaves.
    scale = 6.0 / 3
    leaves = {n: (m.lora_A["default"].weight.detach().clone().requires_grad_(),
                  m.lora_B["default"].weight.detach().clone().requires_grad_()) for n, m in adapted.items()}
    params = dict(base.named_parameters())
    for n, (A, B) in leaves.items():
        params[f"{n}.weight"] = params[f"{n}.weight"].detach() + scale * B @ A
    manual = loss_of(functional_call(base, params, kwargs=dict(input_ids=ids, attention_mask=mask)).logits)
    manual.backward()

    # float64, the same function computed in another association (x (W + s B A)^T vs x W^T + s (x A^T) B^T):
    # rounding of order (terms per dot product) * 2^-53 relative, ~1e-14 here; 1e-9 leaves a wide margin
    # and still catches a wrong scale, a transposed factor or a missing layer (relative errors of order 1).
    torch.testing.assert_close(loss, manual, rtol=1e-9, atol=0)
    for n, (A, B) in leaves.items():
        torch.testing.assert_close(adapted[n].lora_A["default"].weight.grad, A.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(adapted[n].lora_B["default"].weight.grad, B.grad, rtol=1e-9, atol=1e-12)
    # Nothing but the adapters is trained (nor receives a gradient).
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


# ----------------------------------------------------------------------------
# The reference, memory, the optimizer
# ----------------------------------------------------------------------------

def test_reference_is_the_base_policy_and_no_copy_is_loaded(lora_models):
    setup, cfg, models = lora_models
    assert isinstance(models.ref, lora.ReferenceView)
    full = load_models(load_config(None, setup.overrides()).model, CPU)    # the same run without LoRA
    ids, mask = _batch(models.tokenizer, TEXTS)
    P = 4
    rmask = mask[:, P:].bool()
    kw = dict(prompt_width=P, temperature=0.8)
    for fused in (True, False):
        ref = response_logprobs(models.ref, ids, mask, rmask, fused=fused, **kw).logprobs
        base = response_logprobs(full.policy, ids, mask, rmask, fused=fused, **kw).logprobs
        policy = response_logprobs(models.policy, ids, mask, rmask, fused=fused, **kw).logprobs
        # The same float32 operations on the same weights (an adapter layer with its adapter disabled runs its
        # base layer alone): equal up to a few ulps of the logprobs (|lp| < 8, ulp 4.8e-7) should BLAS block
        # the two calls differently.
        torch.testing.assert_close(ref, base, rtol=0, atol=2e-6)
        assert (policy - ref).abs().max() > 1e-2                       # the adapters are on outside the view
    # Disabling is scoped: the adapters are trainable again afterwards.
    assert all(p.requires_grad for n, p in models.policy.named_parameters() if "lora_" in n)

    # No second copy of the policy: the view holds the policy's own tensors, and the four models together hold
    # the full-fine-tuning run's tensors minus one policy, plus the trained adapters (and the critic's head copy).
    assert {p.data_ptr() for p in models.ref.parameters()} == {p.data_ptr() for p in models.policy.parameters()}
    lora_bytes = _distinct_bytes(models.policy, models.ref, models.critic, models.reward)
    full_bytes = _distinct_bytes(full.policy, full.ref, full.critic, full.reward)
    assert lora_bytes == (full_bytes - _distinct_bytes(full.policy)
                          + _trained_bytes(models.policy) + _trained_bytes(models.critic))


def test_only_adapters_and_the_value_head_are_in_the_optimizer(lora_models):
    _, cfg, models = lora_models
    for model, extra in ((models.policy, ()), (models.critic, ("score.modules_to_save.",))):
        opt = make_optimizer(model, 1e-3, cfg.optim)
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in in_opt}
        assert names and all("lora_" in n or n.startswith(extra) for n in names), sorted(names)[:5]
        assert names == {n for n, p in model.named_parameters() if p.requires_grad}
        assert sum(p.numel() for n, p in model.named_parameters() if n in names) < 0.2 * sum(
            p.numel() for p in model.parameters())
    assert any(n.startswith("score.modules_to_save.") for n, _ in models.critic.named_parameters())
    # The value head the critic's forward uses is the trained copy.
    assert scalar_head(models.critic).weight.requires_grad


def test_an_adapted_lm_head_is_refused_and_bad_settings_name_the_field(tiny_setups):
    setup = tiny_setups("llama")
    model = AutoModelForCausalLM.from_pretrained(setup.policy)
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules=.*lm_head"):
        lora.apply(model, LoraConfig(target_modules=["q_proj", "lm_head"]), field="model.lora", classifier=False)
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules=\['nope'\]"):
        lora.apply(AutoModelForCausalLM.from_pretrained(setup.policy), LoraConfig(target_modules=["nope"]),
                   field="model.lora", classifier=False)
    for override, field in (("model.lora.rank=0", "model.lora.rank"), ("model.critic_lora.dropout=1.0",
                            "model.critic_lora.dropout"), ("model.lora.target_modules=[]", "model.lora.target_modules"),
                            ("run.export_adapter=true", "run.export_adapter")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, setup.overrides() + [override])
    with pytest.raises(ConfigError, match=r"model\.lora\.alpha"):
        load_config(None, schema=SFTConfig, overrides=["model.path=x", "data.train_path=y", "model.lora.alpha=0"])


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------

def test_merged_and_adapter_exports_reproduce_the_policy(lora_models, tmp_path):
    setup, _, models = lora_models
    tok, V = models.tokenizer, len(models.tokenizer)
    ids, mask = _batch(tok, TEXTS)
    labels = _labels(ids, mask)
    with torch.no_grad():
        want = sequence_logprobs(models.policy, ids, mask, labels, vocab_size=V)

    merged_dir = export_hf(models.policy, tok, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter_dir = export_hf(models.policy, tok, tmp_path / "adapter", adapter_only=True)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.policy), adapter_dir)
    with torch.no_grad():
        got_merged = sequence_logprobs(merged, ids, mask, labels, vocab_size=V)
        got_adapter = sequence_logprobs(peft_model.get_base_model(), ids, mask, labels, vocab_size=V)
    # The adapter export runs the policy's exact computation on the same weights: a few ulps at most. The merged
    # weights W + s B A are rounded to float32 once (relative 6e-8), which moves each dot product of the 2 blocks
    # by ~(terms) * 6e-8 of its magnitude, ~1e-5 of the logprobs (|lp| < 8) at the very most; 1e-4 leaves a margin
    # and still catches unmerged adapters (the difference is > 1e-2 here, checked below).
    torch.testing.assert_close(got_adapter, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_merged, want, rtol=0, atol=1e-4)
    with torch.no_grad():
        base = sequence_logprobs(AutoModelForCausalLM.from_pretrained(setup.policy), ids, mask, labels, vocab_size=V)
    assert (base - want).abs().max() > 1e-2
    # The live policy is untouched by the export (the merge runs on a copy).
    assert lora.is_lora(models.policy)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(models.policy, ids, mask, labels, vocab_size=V), want,
                                   rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Training: checkpoints, resume, the stages
# ----------------------------------------------------------------------------

def test_checkpoint_holds_adapters_only_and_resume_is_exact(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    common = {"run.iterations": 2, "run.save_every": 1, "run.keep_last": 5, "data.ptx_path": setup.sft,
              "model.gradient_checkpointing": True}
    straight = train(_lora_cfg(setup, **common, **{"run.output_dir": tmp_path / "a"}))
    first = train(_lora_cfg(setup, **common, **{"run.output_dir": tmp_path / "b", "run.stop_after": 1}))
    assert first.interrupted and first.iterations_done == 1
    torch.manual_seed(12345)  # the resumed run must not depend on the caller's RNG
    resumed = train(_lora_cfg(setup, **common, **{"run.output_dir": tmp_path / "b", "run.resume": "latest"}))
    assert resumed.iterations_done == 2
    for role, head in (("policy", ()), ("critic", ("score.modules_to_save.",))):
        a, b = read_weights(straight.checkpoint, role), read_weights(resumed.checkpoint, role)
        assert a.keys() == b.keys() and a
        assert all("lora_" in k or k.startswith(head) for k in a), sorted(a)[:5]     # no frozen base weight
        for k in a:   # bitwise: the same code on the same inputs and shapes in one process (determinism)
            assert torch.equal(a[k], b[k]), k
        first_w = read_weights(first.checkpoint, role)
        assert any(not torch.equal(first_w[k], a[k]) for k in a)                # and the adapters did train
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("loss/policy", "loss/value", "kl/ref_per_sequence", "score/raw/mean"):
        assert [r[key] for r in ma] == [r[key] for r in mb], key
    # The KL to the reference starts at 0 (the adapters start with B = 0) and moves once they train.
    assert ma[0]["kl/ref_per_sequence"] == pytest.approx(0.0, abs=1e-6)
    assert abs(ma[-1]["kl/ref_per_sequence"]) > 1e-6
    # The merged export at the end reloads as a plain causal LM.
    assert (tmp_path / "a" / "export" / "policy" / "model.safetensors").is_file()
    # Other LoRA settings cannot continue the checkpoint.
    with pytest.raises(Exception, match=r"model\.lora\.rank"):
        train(_lora_cfg(setup, **{**common, "run.iterations": 3, "model.lora.rank": 8},
                        **{"run.output_dir": tmp_path / "b", "run.resume": "latest"}))


def test_sft_and_train_rm_take_model_lora(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    run = ["run.max_steps=3", "run.batch_size=2", "run.micro_batch_size=1", "run.progress_bar=false",
           "run.tensorboard=false", "run.log_level=WARNING", "data.eval_fraction=0", "optim.lr=1e-2",
           "model.lora.rank=2"]
    # sft: the export is a plain causal LM whose adapted projections moved and whose embeddings did not.
    res = sft(load_config(None, schema=SFTConfig, overrides=[f"model.path={setup.policy}", f"data.train_path={setup.sft}",
                                                      f"run.output_dir={tmp_path / 'sft'}", *run]))
    out, init = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (res.export_dir, setup.policy))
    assert torch.equal(out["model.embed_tokens.weight"][:init["lm_head.weight"].size(0)],
                       init["model.embed_tokens.weight"])
    assert not torch.equal(out["model.layers.0.self_attn.q_proj.weight"], init["model.layers.0.self_attn.q_proj.weight"])

    # train-rm: the merged export and the adapter export (with the fully trained scalar head) score alike.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "describe the red fox :", "chosen": "the red fox is kind .", "rejected": "the fox is bad ."},
        {"prompt": "tell me about the cat :", "chosen": "the cat sleeps .", "rejected": "no ."}])
    rm_kw = [f"model.path={setup.policy}", f"data.train_path={pairs}", *run]
    merged = train_rm(load_config(None, schema=RMConfig, overrides=[*rm_kw, f"run.output_dir={tmp_path / 'rm_m'}"]))
    adapter = train_rm(load_config(None, schema=RMConfig, overrides=[*rm_kw, f"run.output_dir={tmp_path / 'rm_a'}",
                                                              "run.export_adapter=true"]))
    rm = AutoModelForSequenceClassification.from_pretrained(merged.export_dir)
    base = AutoModelForSequenceClassification.from_pretrained(setup.policy, num_labels=1)
    rm_peft = PeftModel.from_pretrained(base, adapter.export_dir).get_base_model()
    ids, mask = _batch(load_tokenizer(str(setup.policy)), TEXTS)
    last = mask.size(1) - 1 + torch.zeros(len(TEXTS), dtype=torch.long)
    with torch.no_grad():
        a, b = score_at(rm, ids, mask, last), score_at(rm_peft, ids, mask, last)
    # Same seeds, same steps: the two runs trained the same weights; merged vs unmerged float32 (see above).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_sharded_lora_stores_frozen_base_weights_in_the_compute_dtype(tiny_setups, tmp_path, monkeypatch):
    """FSDP2 (one CPU process, shard=always) with bfloat16 compute: adapters and AdamW state in float32, the frozen
    base weights of the policy and critic stored in bfloat16 like a frozen model's; an iteration runs."""
    train_module = importlib.import_module("fastppo.train")       # `fastppo.train` the attribute is the function
    setup = tiny_setups("llama")
    loaded = []
    real = train_module.load_models
    monkeypatch.setattr(train_module, "load_models", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    result = train(_lora_cfg(setup, **{"parallel.shard": "always", "parallel.param_dtype": "bfloat16",
                                       "run.iterations": 1, "run.output_dir": tmp_path / "run"}))
    assert result.iterations_done == 1 and result.metrics["train/skipped_steps"] == 0
    models = loaded[0]
    for model in (models.policy, models.critic):
        assert lora.is_lora(model) and parallel.is_sharded(model)
        for name, p in model.named_parameters():
            assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name


# ----------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------

def test_two_processes_equal_one_process(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    lora_kw = {"model.lora.rank": 4, "model.lora.alpha": 8, "model.critic_lora.rank": 2, "run.iterations": 2,
               "run.save_every": 0, "run.log_level": "INFO"}
    two = torchrun(["-m", "fastppo.cli", "train", *setup.overrides(**lora_kw, **{
        "run.output_dir": tmp_path / "two", "ppo.micro_batch_size": 1})], cwd=tmp_path)
    assert two.returncode == 0, output(two)
    one = train(load_config(None, setup.overrides(**lora_kw, **{"run.output_dir": tmp_path / "one",
                                                               "ppo.micro_batch_size": 2})))
    assert one.iterations_done == 2
    # Each rank holds half of each block, adapters included (sharded with their base modules).
    text = (tmp_path / "two" / "train.rank1.log").read_text()
    assert "policy: fully_shard over mesh (2,)" in text and "reference: fully_shard" not in text
    # The same sums in another order (see tests/test_distributed.py): rtol 1e-5.
    for ra, rb in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), strict=True):
        for k in ("loss/policy", "loss/value", "kl/ref_per_sequence", "grad_norm/policy", "grad_norm/critic"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (k, ra[k], rb[k])
    # The sharded export (gathered to rank 0, merged there) holds W + (alpha / r) B A of the final adapters of
    # the sharded run's checkpoint, and the base weights elsewhere.
    export = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "export" / "policy").state_dict()
    base = AutoModelForCausalLM.from_pretrained(setup.policy).state_dict()
    adapters = read_weights(tmp_path / "two" / "checkpoints" / "iter_00000002", "policy")
    merged = 0
    for name, w in export.items():
        a_key = name.replace(".weight", ".lora_A.default.weight")
        if a_key in adapters:
            want = base[name] + (8 / 4) * adapters[a_key.replace("lora_A", "lora_B")] @ adapters[a_key]
            # float32 sums of r = 4 products, then one addition, in PEFT's order or this one: a few ulps of w
            torch.testing.assert_close(w, want, rtol=0, atol=8 * torch.finfo(torch.float32).eps * want.abs().max())
            merged += 1
        else:
            torch.testing.assert_close(w[:base[name].size(0)], base[name], rtol=0, atol=0)   # frozen, copied
    assert merged == 14
