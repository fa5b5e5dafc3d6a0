"""Critic-free estimators (`fastppo.advantages`): each against the float64 statement of its paper's formula
(`fastppo.algo`), hand-checked small groups, the loss aggregations, dynamic sampling, presets and validation, and short
trainer runs that load no critic."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from fastppo import algo
from fastppo.advantages import GROUP_STD_EPS, estimate_advantages, group_advantages, outcome_rewards
from fastppo.groups import signal_groups
from fastppo.update import loss_agg_weight, minibatch_counts
from fastppo.checkpoint import read_weights
from fastppo.config import PRESETS, ConfigError, LossAgg, derived, load_config, validate_world
from fastppo.rollout import Rollout, cat_rollouts
from fastppo.run_dir import RunDirError
from fastppo.train import train
from fastppo_testing.trainer import read_metrics, tiny_setups  # noqa: F401  (fixture)

U32 = 2.0 ** -24          # unit roundoff of float32
REWARD_FNS = "fastppo_testing.reward_fns"


def _cfg(**over):
    base = {"model.policy_path": "p", "model.reward_path": "r", "data.prompt_path": "d"}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _random_groups(seed, groups, G):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(groups * G, generator=g)
    valid = torch.rand(groups * G, generator=g) > 0.2
    valid[:G] = True                                           # one whole group, one group of equal rewards
    scores[G:2 * G] = 0.75
    valid[G:2 * G] = True
    return scores, valid


# Both sides compute in float64 from the same float32 inputs; the estimator then rounds its result to float32:
# at most half an ulp, 2^-24 relative (doubled for margin). atol covers results that are exactly 0 in one and
# ~1e-16 in the other (float64 sums in another order).
F32_OUT = dict(rtol=2 * U32, atol=1e-12)


@pytest.mark.parametrize("G", [2, 3, 8])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_and_dr_grpo_match_float64(G, scale_by_std):
    scores, valid = _random_groups(G, 6, G)
    got = group_advantages(scores, valid, G, estimator="grpo", scale_by_std=scale_by_std)
    want = algo.grpo_advantages(scores.double(), valid, G, scale_by_std=scale_by_std, eps=GROUP_STD_EPS)
    torch.testing.assert_close(got.double(), want, **F32_OUT)
    assert got.dtype == torch.float32 and torch.all(got[G:2 * G] == 0)      # equal rewards: no signal


@pytest.mark.parametrize("G", [2, 3, 8])
def test_rloo_matches_float64(G):
    scores, valid = _random_groups(10 + G, 6, G)
    got = group_advantages(scores, valid, G, estimator="rloo")
    torch.testing.assert_close(got.double(), algo.rloo_advantages(scores.double(), valid, G), **F32_OUT)


def test_group_estimators_by_hand():
    s = torch.tensor([1.0, 3.0, 1.0, 2.0, 6.0, 9.0])
    ones = torch.ones(6, dtype=torch.bool)
    # grpo, G = 2: group [1, 3] has mean 2, sample std sqrt(2)
    r2 = 1 / (math.sqrt(2) + GROUP_STD_EPS)
    torch.testing.assert_close(group_advantages(s[:2], ones[:2], 2, estimator="grpo"), torch.tensor([-r2, r2]))
    torch.testing.assert_close(group_advantages(s[:2], ones[:2], 2, estimator="grpo", scale_by_std=False),
                               torch.tensor([-1.0, 1.0]))
    # rloo, G = 3: [1, 2, 6] -> 1 - 4, 2 - 3.5, 6 - 1.5
    torch.testing.assert_close(group_advantages(s[2:5], ones[:3], 3, estimator="rloo"), torch.tensor([-3.0, -1.5, 4.5]))
    # an invalid row is out of its group's statistics: [1, 2, (6)] -> [-0.5, 0.5, 0] for Dr. GRPO, [-1, 1, 0] for rloo
    v = torch.tensor([True, True, False])
    torch.testing.assert_close(group_advantages(s[2:5], v, 3, estimator="grpo", scale_by_std=False),
                               torch.tensor([-0.5, 0.5, 0.0]))
    torch.testing.assert_close(group_advantages(s[2:5], v, 3, estimator="rloo"), torch.tensor([-1.0, 1.0, 0.0]))
    # whatever an invalid row holds (a NaN from a broken reward) never reaches its group
    nan = torch.tensor([1.0, 2.0, float("nan")])
    for estimator in ("grpo", "rloo"):
        torch.testing.assert_close(group_advantages(nan, v, 3, estimator=estimator),
                                   group_advantages(s[2:5], v, 3, estimator=estimator))
    # one valid row: no baseline, advantage 0
    assert group_advantages(s[:2], torch.tensor([True, False]), 2, estimator="rloo").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        group_advantages(s, ones, 4, estimator="grpo")


def test_signal_groups_by_hand():
    s = torch.tensor([1.0, 1.0, 1.0, 2.0, 5.0, 7.0, 3.0, 3.0])
    v = torch.tensor([True, True, True, True, True, False, True, True])
    assert signal_groups(s, v, 2).tolist() == [False, True, False, False]    # [5, (7)]: one valid row


def _reinforce_cfg(advantage, G=2, gamma=1.0):
    return load_config(None, _cfg(**{"rollout.n_samples_per_prompt": G, "advantage.gamma": gamma, "advantage.estimator": advantage,
                                     "rollout.rollout_batch_size": 4, "ppo.minibatch_size": 4,
                                     "ppo.micro_batch_size": 4}), preset="reinforce_pp")


def test_reinforce_pp_returns_to_go_by_hand():
    cfg = _reinforce_cfg("reinforce_pp", G=1, gamma=0.5)
    rewards = torch.tensor([[0.1, 0.2, 1.0, 0.0], [0.3, 0.0, 0.0, 0.0], [0.0, 0.5, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    _, returns = estimate_advantages(cfg.advantage, rewards=rewards, values=torch.zeros_like(rewards), response_mask=mask,
                                     shaped=torch.zeros(4), valid=torch.ones(4, dtype=torch.bool), group_size=1)
    # 0.1 + 0.5 * 0.2 + 0.25 * 1 = 0.45, 0.2 + 0.5 * 1 = 0.7, 1
    torch.testing.assert_close(returns[0], torch.tensor([0.45, 0.7, 1.0, 0.0]))
    torch.testing.assert_close(returns[3], torch.tensor([1.875, 1.75, 1.5, 1.0]))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_float64(gamma):
    cfg = _reinforce_cfg("reinforce_pp", G=1, gamma=gamma)
    g = torch.Generator().manual_seed(3)
    B, R = 4, 8
    lengths = torch.tensor([8, 1, 5, 3])
    mask = torch.arange(R)[None] < lengths[:, None]
    rewards = torch.where(mask, torch.rand(B, R, generator=g) * 2 - 1, 0.0)
    got, returns = estimate_advantages(cfg.advantage, rewards=rewards, values=torch.zeros_like(rewards),
                                       response_mask=mask, shaped=torch.zeros(B), valid=torch.ones(B, dtype=torch.bool),
                                       group_size=1)
    want, want_returns = algo.reinforce_pp_advantages(rewards.double(), mask, gamma=gamma)
    # The fused gae op sums the returns in float32: at most R additions of partial sums bounded by R·max|r|, each
    # rounding by 2^-24 relative, so |returns error| <= R^2·max|r|·2^-24. Whitening divides that by the std
    # (an error in the mean adds as much again, one in the std scales the result by 1 + err/std).
    bound = R * R * rewards.abs().max().item() * U32
    std = want_returns[mask].std().item()
    torch.testing.assert_close(returns.double(), want_returns, rtol=0, atol=bound)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * bound / std * (1 + want.abs().max().item()))


def test_reinforce_pp_baseline_subtracts_the_group_mean():
    cfg = _reinforce_cfg("reinforce_pp_baseline", G=2)
    s = torch.tensor([1.0, 3.0, 7.0, 5.0])
    assert outcome_rewards(s, torch.ones(4, dtype=torch.bool), cfg.advantage, 2).tolist() == [-1.0, 1.0, 1.0, -1.0]
    assert outcome_rewards(s, torch.tensor([True, True, False, True]), cfg.advantage, 2).tolist() == [-1.0, 1.0, 0.0, 0.0]
    grpo = load_config(None, _cfg(), preset="grpo")
    assert outcome_rewards(s, torch.ones(4, dtype=torch.bool), grpo.advantage, 2) is s        # the other estimators: R_i as is


@pytest.mark.parametrize("mode", [m.value for m in LossAgg])
def test_loss_aggregation_weights_give_each_definition(mode):
    """Σ over micro-batches of Σ_t w·ℓ / N (what the loss ops compute with policy_weight=w) against the float64
    definitions, with an empty row and uneven lengths."""
    g = torch.Generator().manual_seed(7)
    B, R, M = 6, 7, 9                                          # M = max_new_tokens (> R: the padded width)
    lengths = torch.tensor([7, 1, 0, 4, 5, 2])
    mask = torch.arange(R)[None] < lengths[:, None]
    loss = torch.rand(B, R, generator=g)                       # per-token losses, positive
    n_tokens, n_seqs = minibatch_counts(mask)
    got = 0.0
    for s in range(0, B, 2):                                   # micro-batches of 2 rows
        w = loss_agg_weight(mask[s:s + 2], mode=mode, n_tokens=n_tokens, n_seqs=n_seqs, max_new_tokens=M)
        w = mask[s:s + 2].float() if w is None else w
        got += (w.double() * loss[s:s + 2].double()).sum().item() / n_tokens.item()
    ld, rows = loss.double() * mask, [i for i in range(B) if lengths[i] > 0]
    want = {"token_mean": ld.sum().item() / lengths.sum().item(),
            "seq_mean_token_mean": sum(ld[i].sum().item() / lengths[i].item() for i in rows) / len(rows),
            "seq_mean_token_sum_norm": sum(ld[i].sum().item() / M for i in rows) / len(rows)}[mode]
    # Each float32 weight is at most 3 roundings (two products, one quotient) from its exact value, 3·2^-24
    # relative; the losses are positive, so the sum's relative error is at most that (rtol doubled for margin).
    assert got == pytest.approx(want, rel=6 * U32, abs=0)
    if mode != "token_mean":
        assert torch.all(loss_agg_weight(mask, mode=mode, n_tokens=n_tokens, n_seqs=n_seqs, max_new_tokens=M)[~mask] == 0)


def test_cat_rollouts_pads_prompts_left_and_responses_right():
    a = Rollout(sequences=torch.tensor([[5, 6, 7, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                response_mask=torch.tensor([[True, True]]), lengths=torch.tensor([2]), ended=torch.tensor([True]),
                prompt_width=2)
    b = Rollout(sequences=torch.tensor([[8, 9]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                response_mask=torch.tensor([[True]]), lengths=torch.tensor([1]), ended=torch.tensor([False]),
                prompt_width=1)
    c = cat_rollouts([a, b], pad_id=0, response_width=3)
    assert c.prompt_width == 2
    assert c.sequences.tolist() == [[5, 6, 7, 2, 0], [0, 8, 9, 0, 0]]
    assert c.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 0, 0]]
    assert c.response_mask.tolist() == [[True, True, False], [True, False, False]]
    assert c.lengths.tolist() == [2, 1] and c.ended.tolist() == [True, False]


# ----------------------------------------------------------------------------
# Config: presets and validation
# ----------------------------------------------------------------------------

def test_presets_hold_their_papers_settings():
    cfgs = {name: load_config(None, _cfg(), preset=name) for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "dapo")}
    assert [cfgs[n].advantage.estimator for n in cfgs] == ["grpo", "grpo", "rloo", "reinforce_pp", "grpo"]
    assert cfgs["grpo"].rollout.n_samples_per_prompt == 64 and cfgs["grpo"].advantage.scale_by_std
    assert not cfgs["dr_grpo"].advantage.scale_by_std and cfgs["dr_grpo"].ppo.loss_agg == "seq_mean_token_sum_norm"
    assert cfgs["rloo"].rollout.n_samples_per_prompt == 4
    assert cfgs["reinforce_pp"].reward.kl_coef == 0.01 and cfgs["reinforce_pp"].rollout.n_samples_per_prompt == 1
    dapo = cfgs["dapo"]
    assert (dapo.ppo.clip_eps, dapo.ppo.clip_eps_high, dapo.rollout.dynamic_sampling) == (0.2, 0.28, True)
    assert load_config(None, _cfg()).advantage.estimator == "gae"                       # PPO-max stays the default
    for name, cfg in cfgs.items():
        assert derived(cfg).critic_optimizer_steps == 0, name
    assert set(cfgs) < set(PRESETS)


@pytest.mark.parametrize("over, field, message", [
    ({"rollout.n_samples_per_prompt": 1, "ppo.minibatch_size": 16}, "rollout.n_samples_per_prompt",
     "must be >= 2 with advantage.estimator=grpo"),
    ({"advantage.estimator": "ppo"}, "advantage.estimator", "must be one of gae, grpo"),
    ({"ppo.loss_agg": "sum"}, "ppo.loss_agg", "must be one of token_mean"),
    ({"ppo.clip_eps_high": -0.1}, "ppo.clip_eps_high", "must be > 0 or null"),
    ({"ppo.critic_warmup_steps": 3}, "ppo.critic_warmup_steps", "must be 0 with advantage.estimator=grpo"),
    ({"advantage.whiten": True}, "advantage.whiten", "must be false with advantage.estimator=grpo"),
    ({"rollout.dynamic_sampling_max_tries": 0}, "rollout.dynamic_sampling_max_tries", "must be >= 1"),
    ({"ppo.minibatch_size": 48}, "ppo.minibatch_size", r"must divide the rollouts per iteration, rollout.rollout_batch_size x rollout.n_samples_per_prompt \(16 x 64\)"),
])
def test_validation_names_the_field(over, field, message):
    with pytest.raises(ConfigError, match=rf"field '{re.escape(field)}': {message}"):
        load_config(None, _cfg(**over), preset="grpo")


def test_dynamic_sampling_needs_groups_and_gae_needs_a_critic():
    with pytest.raises(ConfigError, match=r"field 'rollout\.dynamic_sampling': needs groups"):
        load_config(None, _cfg(**{"rollout.dynamic_sampling": True}), preset="reinforce_pp")
    with pytest.raises(ConfigError, match=r"field 'model\.critic_path': advantage\.estimator=gae trains a critic"):
        load_config(None, _cfg(**{"model.reward_path": "null", "reward.functions": "[{name: a:b}]"}))


def test_groups_are_kept_whole_on_each_rank():
    cfg = load_config(None, _cfg(**{"rollout.rollout_batch_size": 6, "rollout.n_samples_per_prompt": 4,
                                    "ppo.minibatch_size": 8, "ppo.micro_batch_size": 2}), preset="grpo")
    d = derived(cfg, world_size=2)
    assert (d.groups_per_rank, d.rollouts_per_rank, d.minibatches_per_epoch) == (3, 12, 3)
    validate_world(cfg, 2)
    # 6 prompts over 4 ranks would split a group (24 rows would split evenly, but not by whole groups)
    with pytest.raises(ConfigError, match=r"field 'rollout\.rollout_batch_size': must be divisible by the number of "
                                          r"processes \(4\) so that each rank holds whole groups"):
        validate_world(cfg, 4)


# ----------------------------------------------------------------------------
# Trainer runs without a critic
# ----------------------------------------------------------------------------

def _train_module():
    return importlib.import_module("fastppo.train")              # (the package's `train` is the function)


def _overrides(setup, out, **extra):
    return setup.overrides(**{"run.output_dir": out, "run.iterations": 2, "run.export_at_end": False,
                              "rollout.rollout_batch_size": 2, "rollout.n_samples_per_prompt": 2,
                              "ppo.minibatch_size": 2, **extra})


@pytest.fixture
def no_critic_spy(monkeypatch):
    """Fails on any critic forward; records the loaded models, the optimizers made and each update's batch."""
    import fastppo.models as models

    tm = _train_module()
    spy = {"models": [], "optimizers": [], "batches": []}

    def no_values(*a, **kw):
        raise AssertionError("a critic forward in a critic-free run")

    monkeypatch.setattr(models, "response_values", no_values)
    real_load, real_opt, real_update = tm.load_models, tm.make_optimizer, tm.ppo_update
    monkeypatch.setattr(tm, "load_models", lambda *a, **kw: spy["models"].append(real_load(*a, **kw)) or spy["models"][-1])
    monkeypatch.setattr(tm, "make_optimizer", lambda model, *a: spy["optimizers"].append(model) or real_opt(model, *a))

    def update(exp, *a, **kw):
        spy["batches"].append((len(exp), int(exp.response_mask.any(-1).sum())))
        return real_update(exp, *a, **kw)

    monkeypatch.setattr(tm, "ppo_update", update)
    return spy


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_each_estimator_trains_without_a_critic(advantage, tiny_setups, tmp_path, no_critic_spy):
    setup = tiny_setups("llama")
    preset = "reinforce_pp" if advantage.startswith("reinforce") else advantage
    result = train(load_config(None, _overrides(setup, tmp_path / "run", **{"advantage.estimator": advantage}), preset=preset))
    assert result.iterations_done == 2
    models = no_critic_spy["models"][0]
    assert models.critic is None and models.reward is not None
    assert no_critic_spy["optimizers"] == [models.policy]                         # no critic optimizer
    assert no_critic_spy["batches"] == [(4, 4), (4, 4)]                          # 2 prompts x G = 2
    m = read_metrics(tmp_path / "run")[-1]
    assert m["grad_norm/policy"] > 0 and m["train/optimizer_steps"] == 4
    assert not [k for k in m if k.startswith(("values/", "loss/value", "grad_norm/critic", "lr/critic"))]
    assert read_weights(result.checkpoint, "critic") == {} and read_weights(result.checkpoint, "policy")
    if advantage in ("grpo", "rloo"):
        assert abs(m["advantages/mean"]) < 1e-6                                   # centred within each group


@pytest.mark.parametrize("kl_loss_coef", [0.04, 0.0])
def test_grpo_loads_a_reference_only_for_its_kl_loss(kl_loss_coef, tiny_setups, tmp_path, no_critic_spy, monkeypatch):
    """The grpo preset's KL loss term (DeepSeekMath's beta 0.04, k3) needs the reference: it is loaded, scored and
    logged as loss/kl. With ppo.kl_loss_coef=0 nothing reads the reference: no reference model is loaded and the
    score phase runs no reference forward (the policy's logprobs alone)."""
    import fastppo.models as models_module

    assert load_config(None, _cfg(), preset="grpo").ppo.kl_loss_coef == 0.04
    scored_models = []
    real = models_module.response_logprobs
    monkeypatch.setattr(models_module, "response_logprobs",
                        lambda model, *a, **kw: scored_models.append(model) or real(model, *a, **kw))
    train(load_config(None, _overrides(tiny_setups("llama"), tmp_path / "run",
                                       **{"ppo.kl_loss_coef": kl_loss_coef}), preset="grpo"))
    models = no_critic_spy["models"][0]
    m = read_metrics(tmp_path / "run")[-1]
    if kl_loss_coef:
        assert models.ref is not None and any(x is models.ref for x in scored_models)
        assert m["loss/kl"] >= 0 and "kl/ref_per_sequence" in m
    else:
        assert models.ref is None and "loss/kl" not in m and "kl/ref_per_sequence" not in m
        assert all(x is models.policy for x in scored_models)


def test_dr_grpo_preset_trains(tiny_setups, tmp_path, no_critic_spy):
    result = train(load_config(None, _overrides(tiny_setups("llama"), tmp_path / "run"), preset="dr_grpo"))
    assert result.iterations_done == 2 and no_critic_spy["models"][0].critic is None


def test_dapo_preset_trains(tiny_setups, tmp_path, no_critic_spy):
    over = {"rollout.max_new_tokens": 6, "reward.functions": f"[{{name: '{REWARD_FNS}:text_hash'}}]"}
    result = train(load_config(None, _overrides(tiny_setups("llama"), tmp_path / "run", **over), preset="dapo"))
    assert result.iterations_done == 2


def test_dynamic_sampling_that_finds_no_signal_keeps_the_batch_size_and_stops(tiny_setups, tmp_path, no_critic_spy):
    """Every reward equal: every group is dropped; after max_tries rounds the batch is filled with masked groups."""
    over = {"rollout.dynamic_sampling": True, "rollout.dynamic_sampling_max_tries": 3, "run.iterations": 1,
            "reward.functions": f"[{{name: '{REWARD_FNS}:constant'}}]", "model.reward_path": None}
    result = train(load_config(None, _overrides(tiny_setups("llama"), tmp_path / "run", **over), preset="grpo"))
    m = read_metrics(tmp_path / "run")[-1]
    assert (m["rollout/sampling_tries"], m["rollout/groups_dropped"], m["rollout/groups_short"]) == (3, 6, 2)
    assert no_critic_spy["batches"] == [(4, 0)]                 # the batch size kept, every row out of the update
    state = torch.load(result.checkpoint / "trainer_state.pt", weights_only=False)
    assert state["sampler"]["position"] == 3 * 2                # 3 rounds of 2 prompts drawn


def test_dynamic_sampling_refills_dropped_groups(tiny_setups, tmp_path, no_critic_spy):
    """Signal only for prompts not about 'blue' things: the other groups are dropped and replaced by new prompts."""
    over = {"rollout.dynamic_sampling": True, "rollout.dynamic_sampling_max_tries": 8,
            "reward.functions": f"[{{name: '{REWARD_FNS}:hash_unless_blue'}}]", "model.reward_path": None}
    train(load_config(None, _overrides(tiny_setups("llama"), tmp_path / "run", **over), preset="grpo"))
    records = read_metrics(tmp_path / "run")
    assert all(r["rollout/groups_short"] == 0 for r in records)
    assert all("rollout/logprob_diff_mean" in r for r in records)   # the kept groups keep the generator's logprobs
    assert sum(r["rollout/groups_dropped"] for r in records) > 0 and max(r["rollout/sampling_tries"] for r in records) > 1
    assert no_critic_spy["batches"] == [(4, 4), (4, 4)]         # full batches of valid rows


def test_resume_with_groups_and_dynamic_sampling_is_bitwise_identical(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    common = {"run.iterations": 4, "run.save_every": 2, "rollout.dynamic_sampling": True,
              "rollout.dynamic_sampling_max_tries": 4, "optim.schedule": "cosine",
              "reward.functions": f"[{{name: '{REWARD_FNS}:hash_unless_blue', weight: 0.5}}]"}
    straight = train(load_config(None, _overrides(setup, tmp_path / "a", **common), preset="grpo"))
    first = train(load_config(None, _overrides(setup, tmp_path / "b", **common, **{"run.stop_after": 2}), preset="grpo"))
    assert first.interrupted and first.iterations_done == 2
    torch.manual_seed(12345)                                    # the resumed run must not depend on the caller's RNG
    resumed = train(load_config(None, _overrides(setup, tmp_path / "b", **common, **{"run.resume": "latest"}),
                                preset="grpo"))
    a, b = read_weights(straight.checkpoint, "policy"), read_weights(resumed.checkpoint, "policy")
    for k in a:  # bitwise: the same code on the same inputs and shapes in one process (determinism)
        assert torch.equal(a[k], b[k]), k
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ("score/raw/mean", "loss/policy", "rollout/groups_dropped", "rollout/sampling_tries"):
        assert ma[-1][key] == mb[-1][key], key


def test_a_ppo_checkpoint_is_not_resumed_by_a_critic_free_run(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    train(load_config(None, setup.overrides(**{"run.output_dir": tmp_path / "run", "run.iterations": 1,
                                               "run.export_at_end": False})))
    cfg = load_config(None, _overrides(setup, tmp_path / "run", **{"run.resume": "latest"}), preset="grpo")
    with pytest.raises(RunDirError, match=r"cannot resume .* with advantage\.estimator=grpo: it was saved by a run with "
                                          r"advantage\.estimator=gae, with a critic"):
        train(cfg)
