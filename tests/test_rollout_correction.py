"""Rollout logprobs: pi_old recomputed or reused, the generator/trainer mismatch, off-policy correction.

The formulas are checked against the float64 statement in `fastppo.algo`, token by token in Python (so the
vectorised code is compared with a plain statement of the math), and against small cases checked by hand.

Until generation returns its own logprobs, the `rollout_logprobs` fixture attaches to every rollout the
policy's teacher-forced logprobs and entropy (`response_logprobs` over the sampled tokens). Every test holds
with the sampler's own logprobs too: on CPU in float32 the two differ by rounding (~1e-6 per token), and no
assertion here needs them closer than 1e-4.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fastppo.models as models_module
from fastppo import algo
from fastppo.config import ConfigError, load_config
from fastppo.engine import HFEngine
from fastppo.experience import correction_weight, mismatch_metrics, rollout_correction
from fastppo.metrics import MetricBuffer
from fastppo.models import load_models
from fastppo.optim import UpdateCounters, make_optimizer, make_scheduler
from fastppo.rollout import Rollout
from fastppo.train import train
from fastppo_testing.distributed import output, torchrun
from fastppo_testing.rollout_logprobs import SCRIPT, with_teacher_forced_logprobs
from fastppo_testing.trainer import read_metrics, score, tiny_setups, update  # noqa: F401  (fixture)

MISMATCH_KEYS = ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/kl_k3", "rollout/diff_gt_0.1_frac")


@pytest.fixture
def rollout_logprobs(monkeypatch):
    """HFEngine.generate returns the teacher-forced logprobs and entropy of the policy when it gives none."""
    monkeypatch.setattr(HFEngine, "generate", with_teacher_forced_logprobs(HFEngine.generate))


def _mismatched(B=6, R=9, seed=0, scale=0.6):
    """π_old and π_rollout logprobs (B, R) float32 that differ by up to ~±1.5 nats, responses of different
    lengths, and garbage off the mask (which must never count)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([R, R - 1, 5, 1, 3, R])[:B]
    mask = torch.arange(R)[None] < lengths[:, None]
    rollout_lp = -torch.rand(B, R, generator=g) * 4 - 0.05
    old = rollout_lp + torch.randn(B, R, generator=g) * scale
    old = torch.where(mask, old, 50.0)                                           # off the mask: garbage
    return old.float(), rollout_lp.float(), mask


MODES = [(i, m) for i in ("none", "token", "sequence") for m in ("none", "token", "sequence") if (i, m) != ("none", "none")]


@pytest.mark.parametrize("is_mode,mask_mode", MODES)
def test_weight_matches_float64_formulas(is_mode, mask_mode):
    old, rollout_lp, mask = _mismatched()
    cap, bounds = 1.5, (0.6, 1.7)
    got, metrics = correction_weight(old, rollout_lp, mask, is_mode=is_mode, cap=cap, mask_mode=mask_mode, bounds=bounds)
    want, truncated, masked = algo.rollout_correction_weight(old, rollout_lp, mask, is_mode=is_mode, cap=cap,
                                                             mask_mode=mask_mode, bounds=bounds)
    assert got.dtype == torch.float32 and got.shape == mask.shape
    # float64 throughout, one rounding to float32 at the end: relative error <= 2^-24 (6e-8) plus float64 noise
    torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=0)
    n = mask.sum().item()
    # the data exercise every branch that is on (a test of a branch that never fires could not fail)
    if is_mode != "none":
        assert 0 < truncated.sum() < n
        assert metrics["rollout/is_truncated_frac"].item() == pytest.approx(truncated.sum().item() / n, abs=1e-7)
    else:
        assert "rollout/is_truncated_frac" not in metrics
    if mask_mode != "none":
        assert 0 < masked.sum() < n
        assert metrics["rollout/masked_frac"].item() == pytest.approx(masked.sum().item() / n, abs=1e-7)
    else:
        assert "rollout/masked_frac" not in metrics


def test_no_correction_gives_no_weight():
    old, rollout_lp, mask = _mismatched()
    assert correction_weight(old, rollout_lp, mask, is_mode="none", cap=2.0, mask_mode="none", bounds=(0.5, 2.0)) == (None, {})


def test_weight_hand_checked():
    # one response of 3 tokens with w = 3, 1/4, 1 (log-space inputs), cap 2, bounds [0.5, 2]
    rollout_lp = torch.tensor([[-2.0, -2.0, -2.0, 0.0]])
    old = rollout_lp + torch.tensor([[math.log(3), math.log(0.25), 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    kw = dict(cap=2.0, bounds=(0.5, 2.0))
    w, m = correction_weight(old, rollout_lp, mask, is_mode="token", mask_mode="none", **kw)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.25, 1.0, 0.0]]))               # min(w_t, 2); 0 off the mask
    assert m["rollout/is_truncated_frac"].item() == pytest.approx(1 / 3)
    w, m = correction_weight(old, rollout_lp, mask, is_mode="none", mask_mode="token", **kw)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))                # 3 > 2 and 1/4 < 1/2 dropped
    assert m["rollout/masked_frac"].item() == pytest.approx(2 / 3)
    w, m = correction_weight(old, rollout_lp, mask, is_mode="sequence", mask_mode="sequence", **kw)
    # product 3/4 under the cap; geometric mean 0.75^(1/3) = 0.909 inside the bounds: kept
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.75, 0.75, 0.0]]))
    assert m["rollout/is_truncated_frac"].item() == 0 and m["rollout/masked_frac"].item() == 0
    w, _ = correction_weight(old, rollout_lp, mask, is_mode="token", mask_mode="token", **kw)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))                # truncation, then the mask


def test_sequence_mode_in_log_space_on_long_responses():
    """Products of thousands of ratios: exact where a product of w_t would overflow or drift."""
    R = 4096
    alternating = torch.tensor([5.0, -5.0]).repeat(R // 2)                   # w_t = e^5, e^-5, ...: product 1
    log_w = torch.stack([
        torch.cat([alternating[:-1], torch.tensor([math.log(1.5)])]),        # product e^5 * 1.5 -> capped at 4
        torch.cat([alternating[:-2], torch.tensor([0.0, math.log(1.5)])]),   # product 1.5, under the cap
        torch.full((R,), 0.5),                                               # e^2048: overflows even in float64
        torch.full((R,), -0.01),                                             # e^-40.96 = 1.6e-18
        torch.cat([torch.tensor([math.log(4.0), -math.log(4.0)]).repeat(R // 2)]),  # geometric mean 1
    ])
    rollout_lp = torch.full_like(log_w, -6.0)
    old = (rollout_lp + log_w).float()
    mask = torch.ones_like(old, dtype=torch.bool)
    w, m = correction_weight(old, rollout_lp, mask, is_mode="sequence", cap=4.0, mask_mode="none", bounds=(0.5, 2.0))
    exact = [math.fsum((old[b].double() - rollout_lp[b].double()).tolist()) for b in range(5)]
    want = torch.tensor([min(math.exp(min(s, 700)), 4.0) for s in exact])
    assert want[1] == pytest.approx(1.5, rel=1e-5) and want[3] == pytest.approx(math.exp(-40.96), rel=1e-4)
    torch.testing.assert_close(w.double(), want[:, None].expand(5, R).double(), rtol=2e-7, atol=0)
    assert m["rollout/is_truncated_frac"].item() == pytest.approx(2 / 5)      # rows 0 and 2
    # sequence masking on the geometric mean: row 4 (w_t = 4, 1/4, ...) is kept, though token masking drops it all
    w, m = correction_weight(old, rollout_lp, mask, is_mode="none", cap=4.0, mask_mode="sequence", bounds=(0.5, 1.5))
    assert w.sum(-1).tolist() == [R, R, 0, R, R]                              # row 2: geometric mean e^0.5 > 1.5
    w, _ = correction_weight(old, rollout_lp, mask, is_mode="none", cap=4.0, mask_mode="token", bounds=(0.5, 1.5))
    assert w[4].sum() == 0


def test_mismatch_metrics_match_float64_formulas():
    old, rollout_lp, mask = _mismatched(scale=0.1)
    got = mismatch_metrics(old, rollout_lp, mask)
    d = [float(old[b, t]) - float(rollout_lp[b, t]) for b in range(mask.size(0)) for t in range(mask.size(1)) if mask[b, t]]
    n = len(d)
    want = {"rollout/logprob_diff_mean": math.fsum(abs(x) for x in d) / n,
            "rollout/logprob_diff_max": max(abs(x) for x in d),
            "rollout/kl_k3": math.fsum((math.exp(x) - 1) - x for x in d) / n,       # r = pi_old / pi_rollout
            "rollout/diff_gt_0.1_frac": sum(abs(x) > 0.1 for x in d) / n}
    assert 0 < want["rollout/diff_gt_0.1_frac"] < 1
    assert set(got) == set(want)
    for k, v in want.items():
        # float64 sums of ~40 terms of order 1 in another order: ~1e-15 relative; exp(x) - 1 in the reference
        # loses ~1e-16 / x^2 relative for |x| >= 1e-3 here, so 1e-9 holds with a wide margin
        assert got[k].item() == pytest.approx(v, rel=1e-9), k


def test_k3_of_a_rounding_level_mismatch():
    """k3 = expm1(d) - d ~ d^2/2: meaningful at d ~ 1e-6 (float32 exp(d) - 1 - d would be pure rounding)."""
    rollout_lp = torch.full((2, 3), -2.0)
    d = 2.0 ** -20                                                           # 9.5e-7, exact in float32
    old = rollout_lp + d
    assert (old - rollout_lp == d).all()                                     # the inputs carry exactly d
    k3 = mismatch_metrics(old, rollout_lp, torch.ones(2, 3, dtype=torch.bool))["rollout/kl_k3"].item()
    assert k3 == pytest.approx(d * d / 2 + d ** 3 / 6, rel=1e-6)             # Taylor series of e^d - 1 - d


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,field", [
    (["rollout.old_logprobs=reuse", "correction.importance=token"], "correction.importance"),
    (["rollout.old_logprobs=reuse", "correction.mask=sequence"], "correction.mask"),
    (["rollout.old_logprobs=keep"], "rollout.old_logprobs"),
    (["correction.importance=seq"], "correction.importance"),
    (["correction.importance_cap=0.5"], "correction.importance_cap"),
    (["correction.mask=tokens"], "correction.mask"),
    (["correction.mask_bounds=[1.2,2.0]"], "correction.mask_bounds"),
    (["correction.mask_bounds=[0.5]"], "correction.mask_bounds"),
])
def test_config_refuses_naming_the_field(overrides, field):
    base = ["model.policy_path=x", "model.reward_path=x", "data.prompt_path=x"]
    with pytest.raises(ConfigError, match=f"'{field}'") as err:
        load_config(None, base + overrides)
    if "reuse" in overrides[0]:
        assert "rollout.old_logprobs" in str(err.value)


@pytest.mark.parametrize("preset", ["ppo_max", "moss_release", "vanilla"])
def test_every_preset_recomputes(preset):
    cfg = load_config(None, ["model.policy_path=x", "model.reward_path=x", "data.prompt_path=x"], preset=preset)
    assert cfg.rollout.old_logprobs == "recompute" and cfg.correction.importance == "none" and cfg.correction.mask == "none"


# ----------------------------------------------------------------------------
# Scoring: reuse runs no policy forward
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tiny_setups):
    setup = tiny_setups("llama")
    torch.manual_seed(0)
    return setup, load_models(load_config(None, setup.overrides(), preset="ppo_max").model, torch.device("cpu"))


def _sampled(setup, models, cfg) -> Rollout:
    """A rollout of 4 prompts from the HF engine, with the rollout logprobs as `rollout_logprobs` attaches them."""
    from fastppo.data import collate_prompts, load_prompts

    tok = models.tokenizer
    prompts = load_prompts(setup.prompts, tok, field="prompt", prompt_format="auto", max_len=16)
    engine = HFEngine(models.policy, cfg.rollout, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                      vocab_size=len(tok), generation_batch_size=4)
    with engine.policy_loaded():
        return engine.generate(collate_prompts(prompts[:4], tok.pad_token_id), seed=3, sample_ids=torch.arange(4))


@pytest.mark.parametrize("mode", ["recompute", "reuse"])
def test_score_phase_policy_forwards(mode, llama, rollout_logprobs, monkeypatch):
    setup, models = llama
    cfg = load_config(None, setup.overrides(**{"rollout.old_logprobs": mode, "rollout.temperature": 0.7}))
    rollout = _sampled(setup, models, cfg)
    assert rollout.logprobs is not None and rollout.response_mask.any()
    calls = []
    original = models_module.response_logprobs
    monkeypatch.setattr(models_module, "response_logprobs", lambda model, *a, **kw: calls.append(model) or original(model, *a, **kw))
    scored = score(models, rollout, cfg, batch_size=2, fused=True)
    policy_calls = sum(m is models.policy for m in calls)
    assert sum(m is models.ref for m in calls) == 2                           # 4 rows, 2 at a time
    mask = rollout.response_mask
    if mode == "reuse":
        assert policy_calls == 0
        assert torch.equal(scored.old_logprobs, torch.where(mask, rollout.logprobs, 0.0))
        assert torch.equal(scored.old_entropy, torch.where(mask, rollout.entropy, 0.0))
        weight, metrics = rollout_correction(rollout, scored, cfg.correction, cfg.rollout.old_logprobs)
        assert weight is None and metrics == {}                               # nothing to measure: pi_old is pi_rollout
    else:
        assert policy_calls == 2
        # recomputed: the same distribution as the generator's, up to float32 rounding of another batch shape
        torch.testing.assert_close(scored.old_logprobs, torch.where(mask, rollout.logprobs, 0.0), rtol=0, atol=1e-4)
        _, metrics = rollout_correction(rollout, scored, cfg.correction, cfg.rollout.old_logprobs)
        assert set(metrics) == set(MISMATCH_KEYS)
        assert metrics["rollout/logprob_diff_max"] < 1e-4 and metrics["rollout/diff_gt_0.1_frac"] == 0


def test_reuse_without_engine_logprobs_says_what_to_set(llama):
    setup, models = llama
    cfg = load_config(None, setup.overrides(**{"rollout.old_logprobs": "reuse"}))
    rollout = _sampled(setup, models, cfg)
    rollout = dataclasses.replace(rollout, logprobs=None, entropy=None)
    with pytest.raises(ConfigError, match="rollout.old_logprobs=recompute"):
        score(models, rollout, cfg, batch_size=2, fused=True)


def test_correction_weight_is_the_function_of_scored_and_rollout_logprobs(llama, rollout_logprobs):
    setup, models = llama
    cfg = load_config(None, setup.overrides(**{"correction.importance": "sequence", "correction.mask": "token"}))
    rollout = _sampled(setup, models, cfg)
    scored = score(models, rollout, cfg, batch_size=4, fused=True)
    # a generator that drifted: half the tokens 0.3 nats more likely than under pi_old
    drift = torch.where(torch.rand(rollout.logprobs.shape, generator=torch.Generator().manual_seed(0)) < 0.5, 0.3, 0.0)
    rollout = dataclasses.replace(rollout, logprobs=(rollout.logprobs + drift) * rollout.response_mask)
    weight, metrics = rollout_correction(rollout, scored, cfg.correction, cfg.rollout.old_logprobs)
    want, _ = correction_weight(scored.old_logprobs, rollout.logprobs, rollout.response_mask, is_mode="sequence",
                                cap=2.0, mask_mode="token", bounds=(0.5, 2.0))
    torch.testing.assert_close(weight, want, rtol=0, atol=0)   # the same function on the same inputs
    assert set(metrics) == {*MISMATCH_KEYS, "rollout/is_truncated_frac", "rollout/masked_frac"}
    assert metrics["rollout/diff_gt_0.1_frac"] > 0.3


# ----------------------------------------------------------------------------
# The update: the weight multiplies the policy surrogate
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fused_policy_loss", [True, False])
def test_weighted_update_equals_scaled_advantages(fused_policy_loss, llama):
    """w * max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r)) for w >= 0 (and likewise with the dual clip):
    a weighted update gives the loss and gradients of an unweighted one on advantages w * A, with the same
    normaliser (masked tokens, w = 0, still count)."""
    import copy

    from fastppo_testing.distributed import uneven_experience

    setup, models = llama
    cfg = load_config(None, setup.overrides(**{"ppo.minibatch_size": 4, "ppo.micro_batch_size": 2,
                                               "rollout.rollout_batch_size": 4, "optim.max_grad_norm": None,
                                               "ppo.fused_policy_loss": fused_policy_loss, "ppo.dual_clip": 3.0}))
    exp = uneven_experience(models.vocab_size)
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(exp.response_mask.shape, generator=g) * 2 * (torch.rand(exp.response_mask.shape, generator=g) > 0.3)
    weight = weight * exp.response_mask
    results = []
    for e in (dataclasses.replace(exp, policy_weight=weight), dataclasses.replace(exp, advantages=exp.advantages * weight)):
        policy, critic = copy.deepcopy(models.policy), copy.deepcopy(models.critic)
        popt, copt = make_optimizer(policy, 1e-3, cfg.optim), make_optimizer(critic, 1e-3, cfg.optim)
        buf = MetricBuffer()
        torch.manual_seed(0)
        update(e, policy=policy, critic=critic, policy_opt=popt, critic_opt=copt,
                   policy_sched=make_scheduler(popt, cfg.optim, 1), critic_sched=make_scheduler(copt, cfg.optim, 1),
                   cfg=cfg, train_policy=True, fused=True, ptx_batches=None, counters=UpdateCounters(), metrics=buf)
        results.append(buf.flush())
    a, b = results
    assert a["loss/policy"] != 0
    # per token w * pg vs pg(w * A): one rounding apart (2^-24 relative), summed over a few dozen tokens
    for k in ("loss/policy", "grad_norm/policy"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


# ----------------------------------------------------------------------------
# The trainer in each mode
# ----------------------------------------------------------------------------

def _run(setup, out, **extra):
    return train(load_config(None, setup.overrides(**{"run.output_dir": out, "run.iterations": 2,
                                                      "run.export_at_end": False, **extra})))


def test_trainer_recompute_and_reuse(tiny_setups, tmp_path, rollout_logprobs, monkeypatch):
    setup = tiny_setups("llama")
    policy_scoring = []
    original = models_module.response_logprobs
    monkeypatch.setattr(models_module, "response_logprobs",
                        lambda model, *a, **kw: policy_scoring.append(kw.get("return_entropy", False)) or original(model, *a, **kw))
    recompute = _run(setup, tmp_path / "recompute")
    n_recompute = sum(policy_scoring)                  # the policy's forwards return the entropy, the ref's do not
    policy_scoring.clear()
    reuse = _run(setup, tmp_path / "reuse", **{"rollout.old_logprobs": "reuse"})
    assert n_recompute > 0 and sum(policy_scoring) == 0
    mr, mu = read_metrics(tmp_path / "recompute"), read_metrics(tmp_path / "reuse")
    for r in mr:
        assert r["rollout/logprob_diff_max"] < 1e-4 and r["rollout/diff_gt_0.1_frac"] == 0
        assert 0 <= r["rollout/kl_k3"] < 1e-8 and r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"]
    assert not any(k.startswith("rollout/") for r in mu for k in r)
    assert "policy/entropy" in mu[0]                   # from the rollout's entropy
    # Until the first optimizer step both runs see the same samples, and pi_old differs by rounding (<= 1e-4 per
    # token): the first iteration's rollout statistics agree to that.
    for k in ("score/raw/mean", "response/length_mean"):
        assert mr[0][k] == mu[0][k], k
    for k in ("kl/ref_per_token", "policy/entropy", "policy/perplexity"):
        assert mr[0][k] == pytest.approx(mu[0][k], rel=1e-4, abs=1e-4), k
    assert recompute.iterations_done == reuse.iterations_done == 2


def test_resume_is_exact_with_reuse(tiny_setups, tmp_path, rollout_logprobs):
    from fastppo.checkpoint import read_weights

    setup = tiny_setups("llama")
    common = {"run.iterations": 3, "run.save_every": 1, "rollout.old_logprobs": "reuse"}
    straight = _run(setup, tmp_path / "a", **common)
    first = _run(setup, tmp_path / "b", **common, **{"run.stop_after": 1})
    assert first.interrupted and first.iterations_done == 1
    torch.manual_seed(12345)
    resumed = _run(setup, tmp_path / "b", **common, **{"run.resume": "latest"})
    assert resumed.iterations_done == 3
    for m in ("policy", "critic"):
        a, b = read_weights(straight.checkpoint, m), read_weights(resumed.checkpoint, m)
        for k in a:  # bitwise: the same code on the same inputs and shapes in one process
            assert torch.equal(a[k], b[k]), (m, k)
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("score/raw/mean", "loss/policy", "loss/value", "policy/entropy"):
        assert ma[-1][key] == mb[-1][key], key


@pytest.mark.parametrize("is_mode,mask_mode", [("token", "token"), ("sequence", "sequence")])
def test_trainer_with_correction(is_mode, mask_mode, tiny_setups, tmp_path, rollout_logprobs, monkeypatch):
    """A generator that drifted: every other token 0.3 nats less likely than under the policy (w_t = e^0.3 = 1.35),
    beyond the cap (1.2) and the bounds ([0.8, 1.1]); the geometric mean of a response is e^0.15 = 1.16 or more."""
    setup = tiny_setups("llama")
    generate = HFEngine.generate

    def drifted(self, prompts, **kw):
        r = generate(self, prompts, **kw)
        every_other = (torch.arange(r.logprobs.size(1)) % 2 == 0)[None]
        return dataclasses.replace(r, logprobs=torch.where(every_other & r.response_mask, r.logprobs - 0.3, r.logprobs))

    monkeypatch.setattr(HFEngine, "generate", drifted)
    _run(setup, tmp_path / "run", **{"correction.importance": is_mode, "correction.mask": mask_mode,
                                     "correction.importance_cap": 1.2, "correction.mask_bounds": "[0.8,1.1]"})
    for r in read_metrics(tmp_path / "run"):
        assert set(MISMATCH_KEYS) <= set(r)
        assert r["rollout/diff_gt_0.1_frac"] > 0.4 and r["rollout/logprob_diff_max"] == pytest.approx(0.3, abs=1e-4)
        assert 0 < r["rollout/is_truncated_frac"] <= 1 and 0 < r["rollout/masked_frac"] <= 1
        if mask_mode == "token":
            assert r["rollout/masked_frac"] == pytest.approx(r["rollout/diff_gt_0.1_frac"])   # the drifted tokens
        assert math.isfinite(r["loss/policy"])


def test_two_processes_equal_one_with_reuse(tiny_setups, tmp_path, rollout_logprobs):
    """rollout.old_logprobs=reuse under FSDP2 on 2 ranks: each rank's rollout logprobs (responses padded to the
    widest on any rank) line up in the gathered batch as in one process. Tolerances: as in test_distributed.py
    (the same sums in another order: rtol 1e-5, atol 1e-6 on means over many tokens)."""
    setup = tiny_setups("llama")

    def overrides(out, micro):
        return setup.overrides(**{"run.output_dir": out, "run.iterations": 2, "run.export_at_end": False,
                                  "rollout.old_logprobs": "reuse", "ppo.micro_batch_size": micro,
                                  "advantage.whiten": True, "run.log_level": "INFO"})

    script = tmp_path / "run_with_rollout_logprobs.py"
    script.write_text(SCRIPT)
    two = torchrun([script, "train", *overrides(tmp_path / "two", 1)], cwd=tmp_path)
    assert two.returncode == 0, output(two)
    assert "fully_shard over mesh (2,)" in (tmp_path / "two" / "train.log").read_text()
    train(load_config(None, overrides(tmp_path / "one", 2)))
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 2
    for ra, rb in zip(m1, m2):
        for k in ("loss/policy", "loss/value", "policy/approx_kl", "policy/entropy", "policy/perplexity",
                  "kl/ref_per_sequence", "score/raw/mean", "advantages/mean", "grad_norm/policy"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["iteration"], k, ra[k], rb[k])


def test_pad_responses_pads_rollout_logprobs_with_zeros():
    from fastppo.rollout import pad_responses

    lp, ent = -torch.rand(2, 3), torch.rand(2, 3)
    r = Rollout(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                torch.tensor([3, 3]), torch.tensor([True, True]), 2, logprobs=lp, entropy=ent)
    p = pad_responses(r, 5, pad_id=0)
    assert torch.equal(p.logprobs, torch.cat([lp, torch.zeros(2, 2)], 1))
    assert torch.equal(p.entropy, torch.cat([ent, torch.zeros(2, 2)], 1))
    assert pad_responses(dataclasses.replace(r, logprobs=None, entropy=None), 5, pad_id=0).logprobs is None
