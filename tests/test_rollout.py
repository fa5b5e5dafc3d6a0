"""Counter-based sampling (`rollout.CounterSampler`): the right distribution, HF's top-k / top-p
semantics, and responses that depend on (seed, sample id) only, never on the batch or the rank."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastppo.config import RolloutConfig
from fastppo.data import collate_prompts, load_prompts
from fastppo.models import load_models
from fastppo.rollout import CounterSampler, generate, gumbel_noise, sampling_seed
from fastppo_testing.trainer import tiny_setups  # noqa: F401  (fixture)


def test_gumbel_noise_is_a_pure_function_with_gumbel_moments():
    ids = torch.arange(512)
    g = gumbel_noise(7, ids, step=3, vocab=1000)
    assert g.shape == (512, 1000) and g.dtype == torch.float32 and torch.isfinite(g).all()
    assert torch.equal(g, gumbel_noise(7, ids, step=3, vocab=1000))
    assert torch.equal(g[100:200], gumbel_noise(7, ids[100:200], step=3, vocab=1000))      # rows are independent
    assert not torch.equal(g, gumbel_noise(8, ids, step=3, vocab=1000))
    assert not torch.equal(g, gumbel_noise(7, ids, step=4, vocab=1000))
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6 (512K draws).
    assert g.double().mean().item() == pytest.approx(0.5772, abs=0.01)
    assert g.double().var().item() == pytest.approx(math.pi ** 2 / 6, rel=0.02)
    # No visible correlation between neighbouring rows, steps or tokens.
    for a, b in ((g[:-1], g[1:]), (g[:, :-1], g[:, 1:]), (g, gumbel_noise(7, ids, step=4, vocab=1000))):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01


def _sample(logits: torch.Tensor, n: int, **rollout) -> torch.Tensor:
    """n draws from one row of logits, one per sample id."""
    cfg = RolloutConfig(**rollout)
    sampler = CounterSampler(cfg, seed=sampling_seed(3), sample_ids=torch.arange(n), prompt_width=0)
    return sampler(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, -1)).argmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_follow_softmax_at_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    freq = torch.bincount(_sample(logits, n, temperature=temperature, top_p=1.0), minlength=6).double() / n
    want = torch.softmax(logits.double() / temperature, -1)
    assert (freq - want).abs().max().item() < 4 * math.sqrt(0.25 / n), (freq, want)


def test_top_k_and_top_p_keep_the_tokens_hf_keeps():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(64, 50) * 3
    for T, k, p in ((0.8, 0, 0.9), (1.0, 5, 1.0), (0.7, 10, 0.5), (1.3, 0, 0.3)):
        cfg = RolloutConfig(temperature=T, top_k=k, top_p=p)
        ours = CounterSampler(cfg, seed=0, sample_ids=torch.arange(64), prompt_width=0)
        kept = torch.isfinite(ours(torch.zeros(64, 0, dtype=torch.long), scores))
        hf = TemperatureLogitsWarper(T)(None, scores.clone())
        if k:
            hf = TopKLogitsWarper(k)(None, hf)
        if p < 1:
            hf = TopPLogitsWarper(p)(None, hf)
        assert torch.equal(kept, torch.isfinite(hf)), (T, k, p)
    freq = torch.bincount(_sample(torch.tensor([3.0, 2.0, 1.0, 0.0]), 2000, top_k=2, top_p=1.0), minlength=4)
    assert freq[2:].sum() == 0 and freq[:2].min() > 0


@pytest.fixture(scope="module")
def policy_and_prompts(tiny_setups):
    from fastppo.config import load_config

    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides())
    models = load_models(cfg.model, torch.device("cpu"))
    tok = models.tokenizer
    prompts = load_prompts(setup.prompts, tok, field="prompt", prompt_format="auto", max_len=16)
    return models.policy, tok, collate_prompts(prompts[:6], tok.pad_token_id)


def test_a_sample_does_not_depend_on_its_batch(policy_and_prompts):
    """The same (seed, sample id) gives the same response alone, in any chunking, on any 'rank'."""
    policy, tok, batch = policy_and_prompts
    cfg = RolloutConfig(max_new_tokens=8, temperature=1.0, top_p=0.95)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=11)
    whole = generate(policy, batch, cfg, generation_batch_size=6, **kw)
    chunked = generate(policy, batch, cfg, generation_batch_size=4, **kw)
    assert torch.equal(whole.sequences, chunked.sequences)
    # "Rank 1 of 2": rows 3..5 with their global ids, generated without rows 0..2.
    from fastppo.data import PromptBatch

    part = generate(policy, PromptBatch(batch.input_ids[3:], batch.attention_mask[3:]), cfg, generation_batch_size=3,
                    sample_ids=torch.arange(3, 6), **kw)
    R = part.response_mask.size(1)
    assert torch.equal(part.responses, whole.responses[3:, :R])
    other = generate(policy, batch, cfg, generation_batch_size=6, **{**kw, "seed": 12})
    assert not torch.equal(other.sequences, whole.sequences)


def test_model_generation_config_cannot_turn_hf_sampling_back_on(policy_and_prompts):
    policy, tok, batch = policy_and_prompts
    cfg = RolloutConfig(max_new_tokens=6)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=5, generation_batch_size=6)
    want = generate(policy, batch, cfg, **kw)
    saved = policy.generation_config
    try:
        policy.generation_config = type(saved)(do_sample=True, temperature=0.05, top_p=0.5, top_k=3)
        torch.manual_seed(123)
        got = generate(policy, batch, cfg, **kw)
    finally:
        policy.generation_config = saved
    assert torch.equal(got.sequences, want.sequences)


def test_the_sampler_sees_float32_logits_of_the_last_hidden_state(policy_and_prompts, monkeypatch):
    """With a bf16 model, the sampler's logits are hidden_last @ W^T computed in float32 (what the score phase's
    fused op computes from the same bf16 operands), not the bf16-rounded logits of the model's own lm_head."""
    from fastppo.models import backbone

    policy, tok, batch = policy_and_prompts
    model = copy.deepcopy(policy).to(torch.bfloat16)
    hidden, scores = [], []
    handle = backbone(model).register_forward_hook(lambda _m, _a, out: hidden.append(out.last_hidden_state[:, -1]))
    real_call = CounterSampler.__call__

    def spy(self, input_ids, s):
        scores.append(s.clone())
        return real_call(self, input_ids, s)

    monkeypatch.setattr(CounterSampler, "__call__", spy)
    try:
        generate(model, batch, RolloutConfig(max_new_tokens=5), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 generation_batch_size=6, seed=3)
    finally:
        handle.remove()
    W = model.get_output_embeddings().weight                                          # (V, H) bf16
    assert len(scores) == len(hidden) >= 2
    gap = 0.0
    for h, s in zip(hidden, scores):
        assert s.dtype == torch.float32
        # The tokenizer's columns: rows past len(tok) are alignment padding (load_models), pushed to about
        # -1.7e38 by the lm_head's padding hook, which is no dot product.
        assert (s[:, len(tok):] <= torch.finfo(torch.float32).min / 4).all()
        s, Wt = s[:, :len(tok)], W[:len(tok)]
        want = h.float() @ Wt.float().T                                                # (B, V)
        # Both are float32 dot products of the same H bf16 products (exact in float32: 8+8 significant bits),
        # summed in some order: |error| <= H * 2^-24 * sum_k |h_k w_k| (the recursive-summation bound, n*u).
        bound = h.size(-1) * 2.0 ** -24 * (h.float().abs() @ Wt.float().abs().T)
        kept = torch.isfinite(s)                                                       # the pad token is suppressed
        assert kept.sum() >= s.numel() - s.size(0)
        assert ((s - want).abs() <= bound)[kept].all()
        gap = max(gap, ((h @ Wt.T).float() - want).abs()[kept].max().item() / bound[kept].max().item())
    assert gap > 10                                                # bf16 logits would be far outside the bound


def test_padded_vocabulary_ids_are_never_sampled():
    """Ids >= vocab_size (embedding rows added to round the vocabulary up) get -inf before sampling."""
    logits = torch.zeros(10)
    logits[7:] = 5.0                                                                  # the padded ids are the likeliest
    n = 2000
    assert (_sample(logits, n, top_p=1.0) >= 7).float().mean() > 0.5                 # without vocab_size: mostly padded
    cfg = RolloutConfig(top_p=0.9, top_k=0)
    for vs in (7, 9):
        sampler = CounterSampler(cfg, seed=sampling_seed(3), sample_ids=torch.arange(n), prompt_width=0, vocab_size=vs)
        drawn = sampler(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, -1)).argmax(-1)
        assert drawn.max() < vs and drawn.min() >= 0 and len(drawn.unique()) > 1


def test_generate_never_emits_padded_vocabulary_ids(policy_and_prompts):
    policy, tok, batch = policy_and_prompts
    model = copy.deepcopy(policy)
    n = len(tok)
    model.resize_token_embeddings(n + 13, mean_resizing=False)
    V = model.get_output_embeddings().weight.size(0)
    # Make the padded rows the likeliest tokens at every step.
    boost = model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: out.index_fill(-1, torch.arange(n, V), 100.0))
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generation_batch_size=6, seed=1)
    try:
        unmasked = generate(model, batch, RolloutConfig(max_new_tokens=6), **kw)
        masked = generate(model, batch, RolloutConfig(max_new_tokens=6), vocab_size=n, **kw)
    finally:
        boost.remove()
    assert (unmasked.responses >= n).any()
    assert (masked.responses[masked.response_mask] < n).all()
