"""Experience and update math against the float64 statement of the PPO-max formulas (fastppo.algo).

Also: reward read at EOS (EOS appended to truncated responses), and logprobs /
values / scores invariant to extra left padding (position ids from the mask).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastppo import algo
from fastppo.config import Config, load_config
from fastppo.advantages import estimate_advantages
from fastppo.experience import Experience
from fastppo.shaping import overlong_penalty, reparameterise_scores, token_rewards
from fastppo.metrics import MetricBuffer, RunningMoments
from fastppo.models import load_models, response_logprobs, response_values, score_at
from fastppo.optim import UpdateCounters, make_optimizer, make_scheduler
from fastppo.rollout import Rollout, response_mask_from_tokens, with_eos_for_scoring
from fastppo_testing.trainer import score, tiny_setups, update  # noqa: F401  (fixture)


def _cfg(setup, **extra):
    return load_config(None, setup.overrides(**extra), preset="ppo_max")


@pytest.fixture(scope="module")
def llama_models(tiny_setups):
    setup = tiny_setups("llama")
    cfg = _cfg(setup)
    torch.manual_seed(0)
    return setup, load_models(cfg.model, torch.device("cpu"))


def _fixed_rollout(tok, *, max_new_tokens: int = 5) -> Rollout:
    """Four rows: prompts of different lengths (left-padded), responses that end with EOS or are cut."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    words = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [words("tell me about the red fox :"), words("the cat :"), words("describe a dog :"),
               words("hello :")]
    responses = [words("it runs") + [eos], words("the cat is very kind"), words("yes") + [eos],
                 words("big big big big big")]  # rows 1 and 3: cut at max_new_tokens, no EOS
    P, R = max(map(len, prompts)), max_new_tokens
    seq = torch.full((4, P + R), pad)
    mask = torch.zeros((4, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq[i, P - len(p):P] = torch.tensor(p)
        seq[i, P:P + len(r)] = torch.tensor(r)
        mask[i, P - len(p):P + len(r)] = 1
    rmask, ended = response_mask_from_tokens(seq[:, P:], eos)
    return Rollout(seq, mask, rmask, rmask.sum(-1), ended, P)


def test_response_mask_stops_at_first_eos():
    eos = 9
    tokens = torch.tensor([[1, 2, eos, 3, eos], [1, 2, 3, 4, 5], [eos, 1, 1, 1, 1]])
    mask, ended = response_mask_from_tokens(tokens, eos)
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_reward_is_read_at_eos_including_truncated_responses(llama_models):
    setup, models = llama_models
    tok = models.tokenizer
    rollout = _fixed_rollout(tok)
    ids, mask, eos_index = with_eos_for_scoring(rollout, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    rows = torch.arange(4)
    assert (ids[rows, eos_index] == tok.eos_token_id).all()
    assert rollout.ended.tolist() == [True, False, True, False]
    assert (eos_index == rollout.prompt_width + rollout.lengths - rollout.ended.long()).all()
    assert (mask.sum(-1) == rollout.attention_mask.sum(-1) + (~rollout.ended).long()).all()
    scores = score_at(models.reward, ids, mask, eos_index)
    # Each row alone, unpadded, ending in EOS, scored by HF's own sequence-classification pooling.
    for i in range(4):
        row = ids[i][mask[i].bool()]
        assert row[-1] == tok.eos_token_id
        with torch.no_grad():
            expected = models.reward(input_ids=row[None]).logits[0, 0]
        torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-5)


def test_logprobs_values_scores_invariant_to_extra_left_padding(llama_models):
    _, models = llama_models
    tok = models.tokenizer
    rollout = _fixed_rollout(tok)
    extra = 3
    pad_cols = torch.full((4, extra), tok.pad_token_id)
    ids2 = torch.cat([pad_cols, rollout.sequences], 1)
    mask2 = torch.cat([torch.zeros_like(pad_cols), rollout.attention_mask], 1)
    P = rollout.prompt_width
    with torch.no_grad():
        for fused in (True, False):
            a = response_logprobs(models.policy, rollout.sequences, rollout.attention_mask, rollout.response_mask,
                                  prompt_width=P, temperature=0.7, return_entropy=True, fused=fused)
            b = response_logprobs(models.policy, ids2, mask2, rollout.response_mask, prompt_width=P + extra,
                                  temperature=0.7, return_entropy=True, fused=fused)
            torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
        va = response_values(models.critic, rollout.sequences, rollout.attention_mask, rollout.response_mask, prompt_width=P)
        vb = response_values(models.critic, ids2, mask2, rollout.response_mask, prompt_width=P + extra)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-5)
        last = P + rollout.lengths - 1
        torch.testing.assert_close(score_at(models.reward, rollout.sequences, rollout.attention_mask, last),
                                   score_at(models.reward, ids2, mask2, last + extra), rtol=1e-5, atol=1e-5)


def test_fused_and_full_logits_paths_agree(llama_models):
    _, models = llama_models
    rollout = _fixed_rollout(models.tokenizer)
    kw = dict(prompt_width=rollout.prompt_width, temperature=0.8, return_entropy=True)
    with torch.no_grad():
        a = response_logprobs(models.policy, rollout.sequences, rollout.attention_mask, rollout.response_mask, fused=True, **kw)
        b = response_logprobs(models.policy, rollout.sequences, rollout.attention_mask, rollout.response_mask, fused=False, **kw)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
    assert (a.logprobs[~rollout.response_mask] == 0).all()


# ----------------------------------------------------------------------------
# float64 reference of the PPO-max formulas
# ----------------------------------------------------------------------------

def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted by hand: 0, 1, 2, ... over attended tokens of each row, 0 on padding."""
    pos = torch.zeros_like(mask)
    for b in range(mask.size(0)):
        n = 0
        for t in range(mask.size(1)):
            if mask[b, t]:
                pos[b, t] = n
                n += 1
    return pos


def _ref_logprobs(model64, rollout: Rollout, T: float) -> torch.Tensor:
    P = rollout.prompt_width
    with torch.no_grad():
        logits = model64(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                         position_ids=_positions(rollout.attention_mask)).logits.double()
    labels = torch.where(rollout.response_mask, rollout.responses, -100)
    return algo.token_logprobs(logits[:, P - 1:-1], labels, temperature=T).logprobs   # y_t predicted at column P+t-1


def _ref_values(critic64, rollout: Rollout) -> torch.Tensor:
    P = rollout.prompt_width
    with torch.no_grad():
        h = getattr(critic64, critic64.base_model_prefix)(
            input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
            position_ids=_positions(rollout.attention_mask)).last_hidden_state
        v = critic64.score(h).squeeze(-1)
    return v[:, P - 1:-1] * rollout.response_mask


def _ref_losses(lp, old_lp, adv, v, old_v, ret, mask, *, clip_eps, value_clip):
    out = algo.ppo_loss(lp, old_lp, adv, v, old_v, ret, mask, clip_eps=clip_eps, value_clip=value_clip)
    return {"loss/policy": out.policy_loss, "loss/value": out.value_loss, "policy/clipfrac": out.clipfrac,
            "policy/approx_kl": out.approx_kl}


@pytest.mark.parametrize("scale,norm,clip", [(True, True, 0.8), (True, False, None), (False, False, 1.5)])
def test_reward_shaping_and_advantages_follow_the_float64_formulas(scale, norm, clip):
    """The trainer's phases 3-4 over three iterations: running moments of the valid scores seen so far (a
    NaN score and a dropped row never counted), k3 token rewards with a clamp, GAE + whitening + clipping.

    Error analysis (the trainer works in float32, the formulas in float64; u = 2^-24 per rounding): the batch
    moments are float32 sums of ≤ 6 scores (relative error ≤ 6u of Σ|s|; Higham, Accuracy and Stability of
    Numerical Algorithms, §3.1) merged in float64, so a shaped score |s − μ|/σ ≲ 5 is off by ≲ 10u·5 ≈ 3e-6;
    a token reward adds one exp and three roundings (kl ≤ 0.5: a few u); the returns are GAE sums of ≤ 7
    terms |δ| ≲ 20 with ≤ 3 roundings each, ≲ 21·20u ≈ 2.5e-5; whitening divides by σ_A (≳ 1 at these
    scales) and the clip only shrinks differences. Each tolerance is two to three times its bound.
    """
    cfg = Config()
    cfg.reward.reward_scale, cfg.reward.reward_norm, cfg.reward.reward_clip = scale, norm, clip
    cfg.advantage.gamma, cfg.advantage.lam, cfg.advantage.whiten, cfg.advantage.clip = 0.99, 0.9, True, 1.5
    moments, earlier = RunningMoments(), torch.zeros(0, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 2, 6])
    mask = torch.arange(7) < lengths[:, None]                                       # (6, 7) right padding
    for _ in range(3):
        scores = torch.randn(6) * 3 + 2
        scores[1] = float("nan")
        valid = torch.tensor([True, True, True, True, False, True])              # row 4 dropped
        shaped = reparameterise_scores(scores, moments, cfg.reward, valid)
        shaped64 = algo.reparameterise_scores(scores.double(), scale=scale, norm=norm, clip=clip,
                                              earlier_scores=earlier, valid=valid)
        torch.testing.assert_close(shaped.double(), shaped64, atol=1e-5, rtol=0)
        earlier = torch.cat([earlier, scores.double()[valid & torch.isfinite(scores)]])

        old_lp = -torch.rand(6, 7) * 3
        ref_lp = old_lp + torch.randn(6, 7) * 0.5
        rewards, kl = token_rewards(shaped, old_lp, ref_lp, mask, kl_coef=0.1, estimator="k3", clamp=0.5)
        rewards64, kl64 = algo.token_rewards(shaped64, old_lp.double(), ref_lp.double(), mask, kl_coef=0.1,
                                             estimator="k3", clamp=0.5)
        torch.testing.assert_close(kl.double(), kl64, atol=1e-6, rtol=0)
        torch.testing.assert_close(rewards.double(), rewards64, atol=2e-5, rtol=0)

        values = torch.randn(6, 7) * 2 * mask
        adv, ret = estimate_advantages(cfg.advantage, rewards=rewards, values=values, response_mask=mask,
                                       shaped=shaped, valid=mask.any(-1), group_size=1)
        adv64, ret64 = algo.gae(rewards64, values.double(), mask, gamma=0.99, lam=0.9)
        torch.testing.assert_close(ret.double(), ret64, atol=5e-5, rtol=0)
        white64 = algo.masked_whiten(adv64, mask).clamp(-1.5, 1.5)
        torch.testing.assert_close(adv.double(), white64, atol=5e-5, rtol=0)


def test_overlong_shaping_and_step_rewards_follow_the_float64_formulas():
    """DAPO's overlong penalty and an environment's step rewards in the token rewards, against fastppo.algo. A few
    float32 roundings of numbers ≤ 10 each (u = 2^-24): ≤ 1e-6 absolute; the tolerance is 2e-6."""
    lengths = torch.tensor([1, 9, 10, 13, 16, 16])
    torch.testing.assert_close(overlong_penalty(lengths, 16, 6, 1.5).double(),
                               algo.overlong_penalty(lengths, 16, 6, 1.5), atol=2e-6, rtol=0)
    torch.testing.assert_close(overlong_penalty(lengths, 16, 4096, 1.5).double(),
                               algo.overlong_penalty(lengths, 16, 4096, 1.5), atol=2e-6, rtol=0)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    steps = torch.zeros(3, 6)
    steps[0, 1], steps[0, 4], steps[1, 0] = 0.5, 2.0, -1.0      # each turn's reward at its last sampled token
    shaped = torch.tensor([3.0, -1.0, 7.0])
    old_lp, ref_lp = -torch.rand(3, 6) * 3, -torch.rand(3, 6) * 3
    rewards, _ = token_rewards(shaped, old_lp, ref_lp, mask, kl_coef=0.1, estimator="k1", clamp=None,
                               step_rewards=steps)
    rewards64, _ = algo.token_rewards(shaped.double(), old_lp.double(), ref_lp.double(), mask, kl_coef=0.1,
                                      step_rewards=steps.double())
    torch.testing.assert_close(rewards.double(), rewards64, atol=2e-6, rtol=0)
    assert rewards[0, 1] != rewards[0, 0] and rewards[2].abs().sum() == 0


def test_one_iteration_matches_float64_reference(tiny_setups):
    setup = tiny_setups("llama")
    T, gamma, lam, beta, delta, clip_eps, vclip = 0.8, 0.99, 0.9, 0.1, 0.8, 0.05, 0.2
    cfg = _cfg(setup, **{
        "rollout.temperature": T, "rollout.max_new_tokens": 5, "advantage.gamma": gamma, "advantage.lam": lam,
        "reward.kl_coef": beta, "reward.reward_clip": delta, "ppo.clip_eps": clip_eps, "ppo.value_clip": vclip,
        "ppo.minibatch_size": 4, "ppo.micro_batch_size": 2, "ppo.ppo_epochs": 1, "optim.policy_lr": 3e-3,
        "optim.critic_lr": 3e-3, "optim.max_grad_norm": None, "rollout.rollout_batch_size": 4})
    torch.manual_seed(0)
    models = load_models(cfg.model, torch.device("cpu"))
    tok = models.tokenizer
    rollout = _fixed_rollout(tok)
    mask = rollout.response_mask.double()
    policy64, ref64 = copy.deepcopy(models.policy).double(), copy.deepcopy(models.ref).double()
    critic64, reward64 = copy.deepcopy(models.critic).double(), copy.deepcopy(models.reward).double()

    # fastppo: phases 2-4
    scored = score(models, rollout, cfg, batch_size=2, fused=True)
    moments = RunningMoments()
    shaped = reparameterise_scores(scored.scores, moments, cfg.reward)
    rewards, kl = token_rewards(shaped, scored.old_logprobs, scored.ref_logprobs, rollout.response_mask,
                                kl_coef=beta, estimator="k1", clamp=None)
    advantages, returns = estimate_advantages(cfg.advantage, rewards=rewards, values=scored.values,
                                              response_mask=rollout.response_mask, shaped=shaped,
                                              valid=rollout.response_mask.any(-1), group_size=1)

    # reference: phases 2-4 in float64
    old_lp = _ref_logprobs(policy64, rollout, T)
    ref_lp = _ref_logprobs(ref64, rollout, T)
    values = _ref_values(critic64, rollout)
    scores = []
    for i in range(4):  # each response alone, EOS appended when cut, HF pooling at the last token
        row = rollout.sequences[i][rollout.attention_mask[i].bool()]
        if not rollout.ended[i]:
            row = torch.cat([row, torch.tensor([tok.eos_token_id])])
        with torch.no_grad():
            scores.append(reward64(input_ids=row[None]).logits[0, 0])
    scores = torch.stack(scores)
    shaped64 = algo.reparameterise_scores(scores, scale=True, norm=True, clip=delta)   # running stats = this batch
    rewards64, _ = algo.token_rewards(shaped64, old_lp, ref_lp, mask, kl_coef=beta, estimator="k1")
    adv64, ret64 = algo.gae(rewards64, values, mask, gamma=gamma, lam=lam)

    tol = dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(scored.old_logprobs.double(), old_lp, **tol)
    torch.testing.assert_close(scored.ref_logprobs.double(), ref_lp, **tol)
    torch.testing.assert_close(scored.values.double(), values, **tol)
    torch.testing.assert_close(scored.scores.double(), scores, **tol)
    torch.testing.assert_close(shaped.double(), shaped64, **tol)
    torch.testing.assert_close(rewards.double(), rewards64, **tol)
    torch.testing.assert_close(advantages.double(), adv64, **tol)
    torch.testing.assert_close(returns.double(), ret64, **tol)
    assert moments.count.item() == 4

    # phase 5, two optimizer steps: the losses at the start and after one step (ratios != 1, clipping active)
    exp = Experience(rollout.sequences, rollout.attention_mask, rollout.response_mask, scored.old_logprobs,
                     scored.ref_logprobs, scored.values, rewards, advantages, returns, rollout.prompt_width)
    popt, copt = make_optimizer(models.policy, 3e-3, cfg.optim), make_optimizer(models.critic, 3e-3, cfg.optim)
    psched, csched = make_scheduler(popt, cfg.optim, 10), make_scheduler(copt, cfg.optim, 10)
    for step in range(2):
        p64 = copy.deepcopy(models.policy).double()
        c64 = copy.deepcopy(models.critic).double()
        expected = _ref_losses(_ref_logprobs(p64, rollout, T), old_lp, adv64, _ref_values(c64, rollout), values,
                               ret64, mask, clip_eps=clip_eps, value_clip=vclip)
        buf = MetricBuffer()
        update(exp, policy=models.policy, critic=models.critic, policy_opt=popt, critic_opt=copt,
                   policy_sched=psched, critic_sched=csched, cfg=cfg, train_policy=True, fused=True,
                   ptx_batches=None, counters=UpdateCounters(), metrics=buf)
        got = buf.flush()
        for k, v in expected.items():
            assert got[k] == pytest.approx(v.item(), rel=1e-4, abs=2e-5), (step, k)
        if step == 0:
            assert got["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
            assert got["loss/policy"] == pytest.approx((-(adv64 * mask).sum() / mask.sum()).item(), rel=1e-4)
        else:
            assert got["policy/clipfrac"] > 0  # the second step really exercises the clip
