"""The PPO update's two policy-loss paths: fused `linear_ppo_loss` (ppo.fused_policy_loss=true, the
default) and composed `linear_token_logprobs` + `ppo_loss` give the same update on a tiny model, with and
without the KL loss term (ppo.kl_loss_coef), whose value is `algo.kl_loss` of the policy's logprobs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastppo.update
from fastppo import algo
from fastppo.config import load_config
from fastppo.experience import Experience
from fastppo.metrics import MetricBuffer
from fastppo.models import load_models, response_logprobs, response_values
from fastppo.optim import UpdateCounters
from fastppo_testing.trainer import tiny_setups, update  # noqa: F401  (fixture)


class RecordingOptimizer:
    """Stands in for AdamW: records the gradients of every step instead of applying them."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = []

    def step(self):
        self.steps.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class NoSchedule:
    def step(self):
        pass


def _away_from_clip_points(r, eps, margin=2e-3):
    for p in (math.log(1 - eps), math.log(1 + eps)):
        near = (r - p).abs() < margin
        r = torch.where(near, p + margin * torch.where(r >= p, 1.0, -1.0), r)
    return r


def synthetic_experience(models, cfg, *, prompt_width=5, response_lens=(6, 3, 4, 1)) -> Experience:
    """Random sequences with left-padded prompts, responses of different lengths (right padding), old
    logprobs near the policy's (ratios kept away from the clip points), random advantages and returns."""
    b, r = len(response_lens), max(response_lens)
    vocab = models.vocab_size                                                   # real tokens, not alignment padding
    sequences = torch.randint(4, vocab - 1, (b, prompt_width + r))
    attention_mask = torch.ones(b, prompt_width + r, dtype=torch.long)
    attention_mask[1, :2] = 0                                                   # left padding
    response_mask = torch.zeros(b, r, dtype=torch.bool)
    for i, n in enumerate(response_lens):
        response_mask[i, :n] = True
        attention_mask[i, prompt_width + n:] = 0
    T = cfg.rollout.temperature
    with torch.no_grad():
        lp = response_logprobs(models.policy, sequences, attention_mask, response_mask, prompt_width=prompt_width,
                               temperature=T).logprobs
        values = response_values(models.critic, sequences, attention_mask, response_mask, prompt_width=prompt_width)
    noise = _away_from_clip_points(torch.randn(b, r) * 0.2, cfg.ppo.clip_eps)
    m = response_mask.float()
    return Experience(
        sequences=sequences, attention_mask=attention_mask, response_mask=response_mask,
        old_logprobs=(lp - noise) * m, ref_logprobs=(lp + 0.3 * torch.randn(b, r)) * m, old_values=(values + 0.1 * torch.randn(b, r)) * m,
        rewards=torch.zeros(b, r), advantages=torch.randn(b, r) * m, returns=torch.randn(b, r) * m,
        prompt_width=prompt_width,
    )


# The surrogate's per-token weight (a loss aggregation other than the token mean) and clip-higher must reach
# both paths: a path that dropped them would train another loss than the one the other path logs.
WEIGHTED = {"ppo.loss_agg": "seq_mean_token_mean", "ppo.clip_eps_high": 0.28}
KL = {"ppo.kl_loss_coef": 0.2, "ppo.kl_loss_estimator": "k3"}


# GSPO's sequence ratio and CISPO's truncated weight must reach both paths too (the fused op cuts its chunks at
# sequence boundaries: a chunk of 4 rows splits the 6-token response, whose logits it then computes twice).
GSPO = {"ppo.ratio_level": "sequence", "model.lm_head_chunk_size": 4}
CISPO = {"ppo.policy_loss": "cispo", "ppo.dual_clip": None, "ppo.clip_eps_high": 0.1}


@pytest.mark.parametrize("extra", [{}, WEIGHTED, KL, {**WEIGHTED, **KL}, {**GSPO, **WEIGHTED}, {**CISPO, **KL}],
                         ids=["token_mean", "seq_mean_clip_high", "kl_token_mean", "kl_seq_mean", "gspo_seq_mean",
                              "cispo_kl"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: lm_head tied to the input embedding
def test_fused_and_composed_policy_loss_give_the_same_update(arch, extra, tiny_setups, monkeypatch):
    setup = tiny_setups(arch)
    overrides = setup.overrides(**{"ppo.ent_coef": 0.01, "ppo.dual_clip": 3.0, "rollout.temperature": 0.9,
                                   "optim.max_grad_norm": None, **extra})
    base = load_config(None, overrides)
    assert base.ppo.fused_policy_loss                                            # the default
    models = load_models(base.model, torch.device("cpu"))
    assert models.fused_lm_head
    exp = synthetic_experience(models, base)

    calls = []
    real = fastppo.update.linear_ppo_loss
    monkeypatch.setattr(fastppo.update, "linear_ppo_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = {}
    for fused_loss in (True, False):
        cfg = load_config(None, overrides + [f"ppo.fused_policy_loss={str(fused_loss).lower()}"])
        policy, critic = copy.deepcopy(models.policy), copy.deepcopy(models.critic)
        policy_opt, critic_opt = RecordingOptimizer(policy), RecordingOptimizer(critic)
        metrics = MetricBuffer()
        torch.manual_seed(0)                                                     # the same minibatch order
        update(exp, policy=policy, critic=critic, policy_opt=policy_opt, critic_opt=critic_opt,
                   policy_sched=NoSchedule(), critic_sched=NoSchedule(), cfg=cfg, train_policy=True,
                   fused=models.fused_lm_head, ptx_batches=None, counters=UpdateCounters(), metrics=metrics)
        runs[fused_loss] = (policy_opt.steps, critic_opt.steps, metrics.flush())
        n_calls = len(calls)
        calls.clear()
        micro_batches = cfg.ppo.ppo_epochs * len(exp) // cfg.ppo.micro_batch_size
        assert n_calls == (micro_batches if fused_loss else 0)

    (p_fused, c_fused, m_fused), (p_comp, c_comp, m_comp) = runs[True], runs[False]
    assert len(p_fused) == len(p_comp) == len(exp) // base.ppo.minibatch_size
    for step_f, step_c in zip(p_fused, p_comp):
        for gf, gc in zip(step_f, step_c):
            torch.testing.assert_close(gf, gc, atol=1e-6 * max(1.0, gc.abs().max().item()), rtol=1e-4)
    assert any(g.abs().max() > 0 for step in p_fused for g in step)
    for step_f, step_c in zip(c_fused, c_comp):
        for gf, gc in zip(step_f, step_c):
            torch.testing.assert_close(gf, gc, atol=1e-6, rtol=1e-5)
    assert m_fused.keys() == m_comp.keys()
    for key in m_comp:
        assert m_fused[key] == pytest.approx(m_comp[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("fused_loss", [True, False])
def test_the_kl_loss_is_algos(agg, fused_loss, tiny_setups):
    """loss/kl of one minibatch (the whole batch, one step) is `algo.kl_loss` of the policy's logprobs against the
    reference's, aggregated as the policy loss, in float64 from the same float32 logprobs (k3 of a difference d
    moves by |1 - e^-d|·|err d| <= (e^|d| + 1)·u·|lp| per token: a few float32 ulps of the logprobs)."""
    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides(**{"ppo.kl_loss_coef": 0.5, "ppo.loss_agg": agg,
                                               "ppo.fused_policy_loss": fused_loss, "ppo.minibatch_size": 4,
                                               "ppo.micro_batch_size": 2, "rollout.rollout_batch_size": 4}))
    models = load_models(cfg.model, torch.device("cpu"))
    exp = synthetic_experience(models, cfg)
    with torch.no_grad():
        lp = response_logprobs(models.policy, exp.sequences, exp.attention_mask, exp.response_mask,
                               prompt_width=exp.prompt_width, temperature=cfg.rollout.temperature).logprobs
    mask = exp.response_mask
    n_i = mask.sum(-1, keepdim=True).double()
    weight = None if agg == "token_mean" else (mask.sum() / (mask.any(-1).sum() * n_i)).expand_as(lp)
    want = algo.kl_loss(lp.double(), exp.ref_logprobs.double(), mask, estimator="k3", weight=weight)
    metrics = MetricBuffer()
    update(exp, policy=models.policy, critic=models.critic, policy_opt=RecordingOptimizer(models.policy),
           critic_opt=RecordingOptimizer(models.critic), policy_sched=NoSchedule(), critic_sched=NoSchedule(), cfg=cfg,
           counters=UpdateCounters(), metrics=metrics)
    got = metrics.flush()["loss/kl"]
    d = (lp.double() - exp.ref_logprobs.double()).abs()
    bound = (((d.exp() + 1) * lp.double().abs() * 2 ** -23).sum() / mask.sum()).item() * 4 + 1e-7
    assert got == pytest.approx(want.item(), abs=bound), (got, want.item(), bound)
    assert want.item() > 1e-3                                                   # the reference differs: a real KL


@pytest.mark.parametrize("fused_loss", [True, False])
@pytest.mark.parametrize("kind", [("sequence", "ppo"), ("token", "cispo"), ("sequence", "cispo")],
                         ids=["gspo", "cispo", "gspo_cispo"])
def test_the_policy_loss_is_algos(kind, fused_loss, tiny_setups):
    """A critic-free (GRPO) update with ppo.ratio_level / ppo.policy_loss: loss/policy of one minibatch (the whole
    batch) is `algo.ppo_loss`'s with the same options, in float64 from the same float32 logprobs, and not the
    token-level PPO value (an update that ignored the options would log that). Bound: each token's term moves
    by at most |A|·max(ρ, 1)·(1 + |lp|)·|err lp| (the ratio, and CISPO's lp factor), |err lp| ≤ 4 ulps of lp."""
    ratio_level, policy_loss = kind
    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides(**{"advantage.estimator": "grpo", "ppo.ratio_level": ratio_level,
                                               "ppo.policy_loss": policy_loss, "ppo.clip_eps": 0.1,
                                               "ppo.fused_policy_loss": fused_loss, "ppo.minibatch_size": 4,
                                               "ppo.micro_batch_size": 2, "rollout.rollout_batch_size": 2,
                                               "rollout.n_samples_per_prompt": 2, "reward.kl_coef": 0.0}))
    models = load_models(cfg.model, torch.device("cpu"))                         # the critic: old values only
    torch.manual_seed(1)
    exp = synthetic_experience(models, cfg)
    with torch.no_grad():
        lp = response_logprobs(models.policy, exp.sequences, exp.attention_mask, exp.response_mask,
                               prompt_width=exp.prompt_width, temperature=cfg.rollout.temperature).logprobs
    mask = exp.response_mask
    args = (lp.double(), exp.old_logprobs.double(), exp.advantages.double(), torch.zeros_like(lp).double(),
            torch.zeros_like(lp).double(), torch.zeros_like(lp).double(), mask)
    want = algo.ppo_loss(*args, clip_eps=0.1, value_clip=None, ratio_level=ratio_level, policy_loss=policy_loss)
    token_ppo = algo.ppo_loss(*args, clip_eps=0.1, value_clip=None)
    metrics = MetricBuffer()
    update(exp, policy=models.policy, critic=None, policy_opt=RecordingOptimizer(models.policy), critic_opt=None,
           policy_sched=NoSchedule(), critic_sched=None, cfg=cfg, counters=UpdateCounters(), metrics=metrics)
    got = metrics.flush()
    ratio = (lp.double() - exp.old_logprobs.double()).exp().clamp(min=1)
    term = exp.advantages.double().abs() * ratio * (1 + lp.double().abs()) * lp.double().abs() * 2 ** -23 * 4
    bound = (term * mask).sum().item() / mask.sum().item() + 1e-7
    assert got["loss/policy"] == pytest.approx(want.policy_loss.item(), abs=bound)
    assert abs(want.policy_loss.item() - token_ppo.policy_loss.item()) > 100 * bound
    for key, name in (("policy/clipfrac", "clipfrac"), ("policy/ratio_mean", "ratio_mean")):
        assert got[key] == pytest.approx(getattr(want, name).item(), abs=1e-5), key
