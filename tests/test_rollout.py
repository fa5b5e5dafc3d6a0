"""Generation with the fused sampler (`rollout.CounterSampler` on `fastppo.kernels.sample`): the right
distribution, HF's top-k / top-p semantics, responses that depend on (seed, sample id) only, never on the batch
or the rank, each token's rollout logprob and entropy, and the compiled decode path."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastppo.config import RolloutConfig
from fastppo.data import PromptBatch, collate_prompts, load_prompts
from fastppo.models import load_models
from fastppo.rollout import CounterSampler, Rollout, generate, pad_responses, sampling_seed
from fastppo_testing.trainer import tiny_setups  # noqa: F401  (fixture)


def _sample(logits: torch.Tensor, n: int, **rollout) -> torch.Tensor:
    """n draws from one row of logits, one per sample id."""
    cfg = RolloutConfig(**rollout)
    sampler = CounterSampler(cfg, seed=sampling_seed(3), sample_ids=torch.arange(n), prompt_width=0)
    return sampler(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_follow_softmax_at_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    freq = torch.bincount(_sample(logits, n, temperature=temperature, top_p=1.0), minlength=6).double() / n
    want = torch.softmax(logits.double() / temperature, -1)
    assert (freq - want).abs().max().item() < 4 * math.sqrt(0.25 / n), (freq, want)


def test_top_k_and_top_p_keep_the_tokens_hf_keeps():
    """Over 1500 sample ids per row, the drawn tokens are HF's warpers' kept set: none outside it, and every
    kept token of probability >= 0.01 drawn (a miss has probability (1 - 0.01)^1500 < 1e-6)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    n = 1500
    scores = torch.randn(4, 12) * 2
    for T, k, p in ((0.8, 0, 0.9), (1.0, 5, 1.0), (0.7, 10, 0.5), (1.3, 0, 0.3)):
        for row in scores:
            drawn = set(_sample(row, n, temperature=T, top_k=k, top_p=p).tolist())
            hf = TemperatureLogitsWarper(T)(None, row[None].clone())
            if k:
                hf = TopKLogitsWarper(k)(None, hf)
            if p < 1:
                hf = TopPLogitsWarper(p)(None, hf)
            probs = hf.softmax(-1)[0]
            assert drawn <= set(torch.isfinite(hf[0]).nonzero().flatten().tolist()), (T, k, p)
            assert set((probs >= 0.01).nonzero().flatten().tolist()) <= drawn, (T, k, p)


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
    part = generate(policy, PromptBatch(batch.input_ids[3:], batch.attention_mask[3:]), cfg, generation_batch_size=3,
                    sample_ids=torch.arange(3, 6), **kw)
    R = part.response_mask.size(1)
    assert torch.equal(part.responses, whole.responses[3:, :R])
    assert (part.logprobs - whole.logprobs[3:, :R]).abs().max() < ATOL     # the model's GEMMs differ by batch
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
        drawn = sampler(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
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


# ----------------------------------------------------------------------------
# Rollout logprobs and entropy
# ----------------------------------------------------------------------------

def _recomputed(policy, rollout, cfg, pad_id, penalty=None):
    """Each response token's logprob and entropy from one float32 forward over the whole sequence, at T, over the
    whole vocabulary (the pad token, never drawn, included: the policy's distribution) and, when given, with
    HF's repetition penalty applied to the tokens before it."""
    with torch.no_grad():
        logits = policy(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits.float()
    P, R = rollout.prompt_width, rollout.response_mask.size(1)
    steps = logits[:, P - 1:P - 1 + R].clone()                                         # (B, R, V)
    if penalty is not None:
        for t in range(R):
            pad_logit = steps[:, t, pad_id].clone()
            steps[:, t] = penalty(rollout.sequences[:, :P + t], steps[:, t])
            steps[:, t, pad_id] = pad_logit           # HF's generate leaves the pad token (left padding) unpenalised
    logp = torch.log_softmax(steps / cfg.temperature, -1)
    lp = logp.gather(-1, rollout.responses[..., None]).squeeze(-1)
    ent = -torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1)
    return lp, ent


# The generator's logits come from a KV-cached, one-position-at-a-time forward, the recomputation's from one
# forward over the whole sequence: the same float32 operations associated differently. On the tiny test model
# a logit is a chain of float32 dot products over the hidden size through two layers; reassociating a sum of n
# terms moves it by at most n·2^-24 times the sum of their magnitudes, ~1e-5 here, and a logprob or an entropy
# by at most twice its logits' largest change. 1e-4 leaves a factor 5 of room.
ATOL = 1e-4


def test_generate_returns_each_tokens_logprob_and_entropy(policy_and_prompts):
    policy, tok, batch = policy_and_prompts
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.7, top_p=0.8, top_k=20)
    ro = generate(policy, batch, cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generation_batch_size=4,
                  seed=21)
    assert ro.logprobs.dtype == ro.entropy.dtype == torch.float32
    assert ro.logprobs.shape == ro.entropy.shape == ro.response_mask.shape
    lp, ent = _recomputed(policy, ro, cfg, tok.pad_token_id)
    m = ro.response_mask
    assert (ro.logprobs[m] - lp[m]).abs().max() < ATOL and (ro.entropy[m] - ent[m]).abs().max() < ATOL
    assert (ro.logprobs[~m] == 0).all() and (ro.entropy[~m] == 0).all()
    assert (ro.logprobs[m] < 0).all() and (ro.entropy[m] > 0).all()
    wider = pad_responses(ro, m.size(1) + 3, tok.pad_token_id)
    assert wider.logprobs.shape == wider.response_mask.shape and (wider.logprobs[:, -3:] == 0).all()
    assert torch.equal(wider.entropy[:, :m.size(1)], ro.entropy)


def test_repetition_penalty_is_applied_and_its_scores_give_the_logprobs(policy_and_prompts):
    from transformers import RepetitionPenaltyLogitsProcessor

    policy, tok, batch = policy_and_prompts
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generation_batch_size=6, seed=4)
    cfg = RolloutConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=3.0)
    ro = generate(policy, batch, cfg, **kw)
    lp, ent = _recomputed(policy, ro, cfg, tok.pad_token_id, RepetitionPenaltyLogitsProcessor(3.0))
    m = ro.response_mask
    assert (ro.logprobs[m] - lp[m]).abs().max() < ATOL and (ro.entropy[m] - ent[m]).abs().max() < ATOL
    unpenalised, _ = _recomputed(policy, ro, cfg, tok.pad_token_id)
    assert (ro.logprobs[m] - unpenalised[m]).abs().max() > 10 * ATOL                  # the penalty was on


def test_rollouts_built_by_hand_need_no_logprobs():
    ro = Rollout(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), torch.ones(2, 3, dtype=bool),
                 torch.full((2,), 3), torch.ones(2, dtype=bool), 2)
    assert ro.logprobs is None and pad_responses(ro, 4, 0).logprobs is None


def test_the_compiled_decode_step_draws_the_eager_tokens(policy_and_prompts, monkeypatch):
    """rollout.compile: a static KV cache and a torch.compile'd decode step give the eager path's responses and
    logprobs. Dynamo captures the decode step here with its "eager" backend (graph capture, guards, the static
    cache, the float32 lm_head), since inductor's CPU code generation alone takes minutes on a shared test
    machine; inductor's kernels (the same float32 math, fused) and the speed are measured on a GPU."""
    import functools

    import fastppo.rollout as rollout_module
    from torch._dynamo.utils import counters

    policy, tok, batch = policy_and_prompts
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generation_batch_size=6, seed=8)
    eager = generate(policy, batch, RolloutConfig(max_new_tokens=4, top_p=0.9), **kw)
    gen = rollout_module.generation_kwargs(RolloutConfig(compile=True), eos_id=0, pad_id=0)
    assert gen["cache_implementation"] == "static" and gen["compile_config"].mode == "reduce-overhead"
    monkeypatch.setattr(rollout_module, "CompileConfig", functools.partial(rollout_module.CompileConfig,
                                                                           backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(policy, batch, RolloutConfig(max_new_tokens=4, top_p=0.9, compile=True), **kw)
    assert counters["stats"]["unique_graphs"] >= 1                   # the decode step went through dynamo
    torch._dynamo.reset()
    assert torch.equal(compiled.sequences, eager.sequences)
    m = eager.response_mask
    assert (compiled.logprobs[m] - eager.logprobs[m]).abs().max() < ATOL


def test_a_suppressed_token_keeps_its_probability_in_the_recorded_logprob_and_entropy():
    """The pad token is never drawn, but the recorded logprob and entropy are those of the whole softmax
    (`_with_token_back` renormalises the op's, computed without it), against float64 on the full row."""
    from fastppo.rollout import _with_token_back

    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 37, generator=g, dtype=torch.float64) * 3
    z[4, 7] = -30.0                                                       # a pad of negligible probability
    pad, chosen = 7, torch.tensor([0, 3, 9, 36, 1])
    rest = z.clone()
    rest[:, pad] = float("-inf")
    logp_r = torch.log_softmax(rest, -1)
    ent_r = -torch.where(torch.isfinite(logp_r), logp_r.exp() * logp_r, 0.0).sum(-1)
    lp, ent = _with_token_back(logp_r.gather(1, chosen[:, None]).squeeze(1).float(), ent_r.float(),
                               z.gather(1, chosen[:, None]).squeeze(1).float(), z[:, pad].float())
    logp = torch.log_softmax(z, -1)
    want_lp, want_ent = logp.gather(1, chosen[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    # float32 inputs and a handful of float32 operations on values of order 10: a few ulps of 10, ~1e-5.
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=0, atol=1e-5)
    assert ent[4] == ent[4] and abs(float(ent[4]) - float(ent_r[4])) < 1e-5   # q ~ 0: unchanged
