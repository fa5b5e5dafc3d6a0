"""Padding-free (packed) forwards and token-budget micro-batches (fastppo/packing.py, docs/packing.md).

Tolerances. A packed and a padded forward compute the same per-token math in float32; only the order of
some sums differs: the matmuls run over another number of rows (BLAS may pick another kernel, blocking
the H-long dot products differently), and attention's softmax and weighted sum run over a different set of
masked-out keys (exact zeros, but tiled differently). A float32 sum of n terms in another order moves by at
most ~n * 2^-24 of the sum of the terms' magnitudes; with hidden size 32, 2 layers and sequences of
<= 11 tokens that is below 1e-6 relative per op, and a handful of ops deep below 1e-5. So: logprobs,
entropies, values, scores and losses (magnitudes <= ~5) with rtol 1e-5, atol 1e-5; gradients, which add
those terms over every token, with rtol 1e-5 and atol 1e-5 of the tensor's largest gradient.
"""

from __future__ import annotations

import copy
from pathlib import Path


import pytest
import torch

from fastppo import packing
from fastppo.config import ConfigError, load_config
from fastppo.experience import Experience
from fastppo.models import IGNORE_INDEX, load_models, response_logprobs, response_values, score_at
from fastppo.packing import (Packing, first_fit_decreasing, in_row_order, index_targets, micro_batches, plan,
                             response_targets)
from fastppo.models import ptx_loss
from fastppo.data import SFTBatch
from fastppo.reward_training import PairBatch, pair_scores
from fastppo.rollout import Rollout
from fastppo.train import train
from fastppo_testing.distributed import RESPONSE_LENGTHS, output, run_update, torchrun, uneven_experience
from fastppo_testing.tiny_models import ARCHS
from fastppo_testing.trainer import outcomes_for, read_metrics, score, tiny_setups  # noqa: F401  (fixture)

TOL = dict(rtol=1e-5, atol=1e-5)
MAX_NEW_TOKENS = 6
PROMPT_LENGTHS = (5, 1, 3, 2, 4, 5)
RESPONSE_LENGTHS_MIXED = (6, 1, 3, 2, 5, 4)      # from 1 token to max_new_tokens
ENDED = (False, True, True, True, True, True)    # the 6-token response was cut at max_new_tokens


def _assert_grads_close(got: dict, want: dict) -> None:
    """Packed and padded gradients sum the same per-token terms in another float32 order: each entry moves by
    ~n u (sum of |terms|), which a cancelling sum can make far larger than the entry itself (a reward model's
    d(sum r_c - sum r_r) / d(final norm bias) is exactly 0: B v - B v, and came out 7e-9 in one layout). So
    atol is 1e-5 of the tensor's largest entry, but never below 1e-8 of the model's largest gradient entry
    (keys are '<model index>.<parameter>'), which still catches a wrong tensor 1000x smaller than the
    model's largest gradients."""
    assert got.keys() == want.keys()
    scale = {}
    for k, g in want.items():
        model = k.split(".", 1)[0]
        scale[model] = max(scale.get(model, 0.0), g.abs().max().item())
    for k, g in want.items():
        floor = 1e-3 * scale[k.split(".", 1)[0]]
        torch.testing.assert_close(got[k], g, rtol=1e-5, atol=1e-5 * max(g.abs().max().item(), floor),
                                   msg=lambda m: f"gradient of {k}: {m}")


def mixed_rollout(models, seed: int = 0) -> Rollout:
    """Left-padded prompts of mixed lengths, right-padded responses of 1 to MAX_NEW_TOKENS tokens ending in EOS
    (but the one cut at MAX_NEW_TOKENS)."""
    tok = models.tokenizer
    g = torch.Generator().manual_seed(seed)
    B, P, R = len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), MAX_NEW_TOKENS
    special = {tok.pad_token_id, tok.eos_token_id}
    words = torch.tensor([i for i in range(len(tok)) if i not in special])
    ids = words[torch.randint(len(words), (B, P + R), generator=g)]
    cols = torch.arange(P + R)
    plen, rlen = torch.tensor(PROMPT_LENGTHS)[:, None], torch.tensor(RESPONSE_LENGTHS_MIXED)[:, None]
    attention_mask = ((cols >= P - plen) & (cols < P + rlen)).long()
    ended = torch.tensor(ENDED)
    eos_col = (P + rlen - 1).squeeze(1)
    ids[torch.arange(B), eos_col] = torch.where(ended, tok.eos_token_id, ids[torch.arange(B), eos_col])
    ids = torch.where(attention_mask.bool(), ids, tok.pad_token_id)
    return Rollout(sequences=ids, attention_mask=attention_mask, response_mask=attention_mask[:, P:].bool(),
                   lengths=rlen.squeeze(1), ended=ended, prompt_width=P)


def mixed_experience(models, seed: int = 0) -> Experience:
    ro = mixed_rollout(models, seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = ro.response_mask

    def noise(scale):
        return torch.randn(mask.shape, generator=g) * scale * mask

    old_values, advantages = noise(0.5), noise(1.0)
    return Experience(sequences=ro.sequences, attention_mask=ro.attention_mask, response_mask=mask,
                      old_logprobs=-(torch.rand(mask.shape, generator=g) * 3 + 2.5) * mask, ref_logprobs=noise(0.0),
                      old_values=old_values, rewards=noise(1.0), advantages=advantages,
                      returns=advantages + old_values + noise(0.1), prompt_width=ro.prompt_width)


def _config(tiny_setups, arch: str, **extra):
    """(overrides, config): 6 rollouts, one minibatch of 6, micro-batches of 3 rows, entropy bonus."""
    overrides = tiny_setups(arch).overrides(**{
        "rollout.rollout_batch_size": 6, "ppo.minibatch_size": 6, "ppo.micro_batch_size": 3,
        "rollout.temperature": 0.7, "rollout.max_new_tokens": MAX_NEW_TOKENS, "ppo.ent_coef": 0.01,
        "optim.max_grad_norm": None, **extra})
    return overrides, load_config(None, overrides)


def _setup(tiny_setups, arch: str, **extra):
    """(overrides, config, models). Compare runs on copies of one set of models: loading GPT-2 gives its
    added pad token a fresh random (tied) embedding row, which enters every softmax."""
    overrides, cfg = _config(tiny_setups, arch, **extra)
    return overrides, cfg, load_models(cfg.model, torch.device("cpu"))


def _grads(*models) -> dict[str, torch.Tensor]:
    out = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(models) for n, p in m.named_parameters()
           if p.grad is not None}
    for m in models:
        m.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------
# Forwards: packed == padded, for every architecture
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused,one_row", [(True, False), (False, False), (True, True)])
def test_packed_forwards_equal_padded(tiny_setups, arch, fused, one_row):
    """Logprobs, entropies, critic values and reward scores (and their gradients in the weights) of a packed
    forward equal the padded one's, with left-padded prompts of mixed lengths and responses of 1 to
    max_new_tokens tokens; the padded layout comes back. Rows as wide as the longest sequence (sdpa's layout,
    fillers included) and one row (flash-attn's; here through sdpa's block-diagonal mask)."""
    _, cfg, models = _setup(tiny_setups, arch)
    ro = mixed_rollout(models)
    P, ids, mask, rmask = ro.prompt_width, ro.sequences, ro.attention_mask, ro.response_mask
    pack = Packing.build(mask, response_targets(rmask, P), "cpu", one_row=one_row)
    assert pack.n_tokens == int(mask.sum()) < mask.numel()
    assert pack.position_ids.size(0) == 1 if one_row else 1 < pack.position_ids.size(0) < mask.size(0)
    # The scalar heads: the critic (trained) also stands in for the reward model, so the score's gradient is checked.
    idx = P + ro.lengths - 1
    score_pack = Packing.build(mask, index_targets(idx, mask.size(1)), "cpu", one_row=one_row)
    w = torch.randn(rmask.shape)                            # upstream gradients, the same for both layouts
    results = {}
    for name, p, sp in (("padded", None, None), ("packed", pack, score_pack)):
        models.policy.zero_grad(set_to_none=True)
        lp = response_logprobs(models.policy, ids, mask, rmask, prompt_width=P, temperature=0.7, return_entropy=True,
                               fused=fused, pack=p)
        values = response_values(models.critic, ids, mask, rmask, prompt_width=P, pack=p)
        scores = score_at(models.critic, ids, mask, idx, pack=sp)
        ((lp.logprobs * w).sum() + (lp.entropy * w.flip(0)).sum() + (values * w).sum() + scores.sum()).backward()
        results[name] = (lp.logprobs.detach(), lp.entropy.detach(), values.detach(), scores.detach(),
                         _grads(models.policy, models.critic))
    for got, want in zip(results["packed"][:4], results["padded"][:4]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL)
    assert (results["packed"][0][~rmask] == 0).all() and (results["packed"][2][~rmask] == 0).all()
    assert (results["padded"][0][rmask] != 0).all()          # not a trivially zero comparison
    _assert_grads_close(results["packed"][4], results["padded"][4])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_lm_loss_and_pair_scores_equal_padded(tiny_setups, arch):
    """The stages' losses: sft's LM loss (ptx_loss, right-padded rows with prompt tokens unlabelled) and
    train-rm's scores read at each sequence's last token, packed vs padded, values and gradients."""
    _, cfg, models = _setup(tiny_setups, arch)
    ro = mixed_rollout(models)
    # Right-padded rows, as collate_sft and collate_pairs make them.
    B, L = ro.sequences.shape
    lengths = ro.attention_mask.sum(1)
    ids = torch.full_like(ro.sequences, models.tokenizer.pad_token_id)
    mask = torch.zeros_like(ro.attention_mask)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b in range(B):
        n = int(lengths[b])
        ids[b, :n] = ro.sequences[b][ro.attention_mask[b].bool()]
        mask[b, :n] = 1
        labels[b, PROMPT_LENGTHS[b] - 1:n - 1] = ids[b, PROMPT_LENGTHS[b]:n]
    batch = SFTBatch(ids, mask, labels)
    pairs = PairBatch(ids, mask, lengths - 1, labels[:B // 2])
    out = {}
    for packed in (False, True):
        loss = ptx_loss(models.policy, batch, fused=True, backend=None, chunk_size=None, packed=packed)
        rc, rr = pair_scores(models.critic, pairs, packed)
        (loss + (rc - rr).sum()).backward()
        out[packed] = (loss.detach(), rc.detach(), rr.detach(), _grads(models.policy, models.critic))
    for got, want in zip(out[True][:3], out[False][:3]):
        torch.testing.assert_close(got, want, **TOL)
    _assert_grads_close(out[True][3], out[False][3])


def test_fused_ops_see_no_padding_rows(tiny_setups, monkeypatch):
    """The fused lm_head ops get exactly the valid response tokens' states (a spy on their inputs), in the
    score phase and in the update."""
    import fastppo.models as models_module
    import fastppo.update as ppo_module

    _, cfg, models = _setup(tiny_setups, "llama", **{"ppo.micro_batch_size": 6})
    exp = mixed_experience(models)
    n_valid = int(exp.response_mask.sum())
    seen = []

    def spy(real):
        def wrapped(hidden, *args, **kwargs):
            seen.append((real.__name__, hidden.shape[:-1].numel()))
            return real(hidden, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(models_module, "linear_token_logprobs", spy(models_module.linear_token_logprobs))
    monkeypatch.setattr(ppo_module, "linear_ppo_loss", spy(ppo_module.linear_ppo_loss))
    ro = Rollout(exp.sequences, exp.attention_mask, exp.response_mask, exp.response_mask.sum(1),
                 torch.ones(len(exp), dtype=torch.bool), exp.prompt_width)
    score(models, ro, cfg, batch_size=6, fused=True)
    assert seen == [("linear_token_logprobs", n_valid)] * 2         # policy and reference
    seen.clear()
    run_update(models, cfg, exp)
    # run_update's own two reference forwards (padded, outside the update) come first.
    assert seen[1:] == [("linear_ppo_loss", n_valid)], seen


# ----------------------------------------------------------------------------
# Score phase and update: packed == padded, token budget == one micro-batch
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_score_phase_packed_with_a_token_budget_equals_padded(tiny_setups, arch):
    """score_rollout packed, in token-budget micro-batches (rows regrouped longest first), gives the padded
    row-count results in the rollout's row order."""
    _, cfg, models = _setup(tiny_setups, arch, **{"ppo.packing": False})
    ro = mixed_rollout(models)
    want = score(models, ro, cfg, batch_size=2, fused=True)
    cfg_packed = _config(tiny_setups, arch, **{"rollout.forward_batch_tokens": 12})[1]
    (every_row,) = micro_batches([(ro.attention_mask, response_targets(ro.response_mask, ro.prompt_width))],
                                 rows=2, tokens=12, packed=True)
    assert len(every_row.micro) > 2 and any(len(mb.rows) > 1 for mb in every_row.micro)
    got = score(models, ro, cfg_packed, batch_size=2, fused=True)
    for name in ("old_logprobs", "old_entropy", "ref_logprobs", "values", "scores"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_update_equals_padded_update(tiny_setups, arch):
    """One ppo_update (fused policy loss, value loss, entropy bonus) on packed micro-batches: the same losses
    and gradients as on padded ones."""
    _, cfg, models = _setup(tiny_setups, arch, **{"ppo.packing": False})
    exp = mixed_experience(models)
    models_packed = copy.deepcopy(models)
    want = run_update(models, cfg, exp)
    cfg_packed = _config(tiny_setups, arch)[1]
    got = run_update(models_packed, cfg_packed, exp)
    for k in ("loss/policy", "loss/value", "loss/total", "policy/entropy_new", "policy/approx_kl",
              "values/explained_variance"):
        assert got["metrics"][k] == pytest.approx(want["metrics"][k], rel=TOL["rtol"], abs=TOL["atol"]), k
    assert len(got["grads"]) == len(want["grads"]) == 2
    for g, w in zip(got["grads"], want["grads"]):
        _assert_grads_close(g, w)


@pytest.mark.parametrize("fused_policy_loss", [True, False])
def test_token_budget_micro_batches_give_the_update_of_one_micro_batch(tiny_setups, fused_policy_loss):
    """A minibatch split by a token budget into several packed micro-batches (of different sizes) gives the
    gradient of the whole minibatch in one micro-batch: the token-mean normaliser is the minibatch's."""
    fl = {"ppo.fused_policy_loss": fused_policy_loss}
    _, cfg_one, models = _setup(tiny_setups, "qwen2", **fl, **{"ppo.micro_batch_size": 6})
    exp = mixed_experience(models)
    models_split = copy.deepcopy(models)
    want = run_update(models, cfg_one, exp)
    lengths = exp.attention_mask.sum(1).tolist()
    budget = max(lengths) + 2
    bins = first_fit_decreasing(lengths, budget)
    assert 2 < len(bins) < len(lengths) and len({len(b) for b in bins}) > 1, bins
    cfg_split = _config(tiny_setups, "qwen2", **fl, **{"ppo.micro_batch_tokens": budget})[1]
    got = run_update(models_split, cfg_split, exp)
    for k in ("loss/policy", "loss/value", "loss/total", "policy/entropy_new", "values/explained_variance"):
        assert got["metrics"][k] == pytest.approx(want["metrics"][k], rel=TOL["rtol"], abs=TOL["atol"]), k
    for g, w in zip(got["grads"], want["grads"]):
        _assert_grads_close(g, w)


def test_dummy_micro_batches_change_nothing(tiny_setups, monkeypatch):
    """A rank that runs dummy micro-batches (to keep FSDP's collectives in step with a rank holding more)
    computes the update it would compute without them."""
    _, cfg, models = _setup(tiny_setups, "llama", **{"ppo.micro_batch_tokens": 12})
    exp = mixed_experience(models)
    models2 = copy.deepcopy(models)
    want = run_update(models, cfg, exp)
    planned = []
    real_plan = packing.plan

    def plan_with_dummies(lengths, **kw):          # as if another rank had 2 micro-batches more
        out = real_plan(lengths, **kw)
        out = out + [packing.MicroBatch([0], dummy=True)] * 2
        planned.append(out)
        return out

    monkeypatch.setattr(packing, "plan", plan_with_dummies)
    got = run_update(models2, cfg, exp)
    assert planned and all(any(mb.dummy for mb in p) for p in planned)
    for k in ("loss/policy", "loss/value", "loss/total", "policy/entropy_new", "policy/clipfrac"):
        assert got["metrics"][k] == pytest.approx(want["metrics"][k], rel=TOL["rtol"], abs=TOL["atol"]), k
    for g, w in zip(got["grads"], want["grads"]):
        _assert_grads_close(g, w)


def test_two_ranks_with_unequal_micro_batch_counts_match_one_process(tiny_setups, tmp_path):
    """2 processes (gloo, FSDP2-sharded models) whose shares of the minibatch fall into different numbers of
    token-budget micro-batches: the rank with fewer runs dummies, FSDP's all-gathers and reduce-scatters
    match, and the losses and gradients equal one process's."""
    setup = tiny_setups("llama")
    # uneven_experience: prompt 3 + responses (8, 4, 2, 1) -> sequences of 11, 7, 5 and 4 tokens.
    lengths = [3 + n for n in RESPONSE_LENGTHS]
    torch.manual_seed(0)                                        # the minibatch shuffle of run_update
    order = torch.randperm(len(lengths)).tolist()
    shares = [[lengths[i] for i in order[:2]], [lengths[i] for i in order[2:]]]
    budget = next(b for b in range(max(lengths), sum(lengths))
                  if len(first_fit_decreasing(shares[0], b)) != len(first_fit_decreasing(shares[1], b)))
    counts = [len(first_fit_decreasing(s, budget)) for s in shares]
    overrides = setup.overrides(**{"ppo.minibatch_size": 4, "ppo.micro_batch_size": 1, "rollout.temperature": 0.7,
                                   "ppo.ent_coef": 0.01, "optim.max_grad_norm": None,
                                   "ppo.micro_batch_tokens": budget})
    proc = torchrun(["-m", "fastppo_testing.distributed", "update", tmp_path, *overrides], cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    cfg = load_config(None, overrides)
    models = load_models(cfg.model, torch.device("cpu"))
    want = run_update(models, cfg, uneven_experience(len(models.tokenizer)))
    assert counts[0] != counts[1], (shares, budget)
    for r in ranks:
        for k in ("loss/policy", "loss/value", "loss/total", "policy/entropy_new", "policy/approx_kl"):
            assert r["metrics"][k] == pytest.approx(want["metrics"][k], rel=TOL["rtol"], abs=1e-6), k
        assert len(r["grads"]) == len(want["grads"]) == 2
        for g, w in zip(r["grads"], want["grads"]):
            _assert_grads_close(g, w)


def test_training_with_token_budgets_in_two_processes_equals_one(tiny_setups, tmp_path):
    """`fastppo train` with token-budget micro-batches in the score phase and the update (ptx too), 2 processes
    (FSDP2, gloo) vs 1: the same losses, statistics and gradient norms every iteration, whatever number
    of micro-batches each rank's share of the sampled responses falls into."""
    setup = tiny_setups("llama")

    def overrides(out, ptx_rows):    # ppo.micro_batch_size now sizes only the ptx batch (per rank): 2 in all
        return setup.overrides(**{"run.output_dir": out, "run.iterations": 2, "data.ptx_path": setup.sft,
                                  "ppo.ptx_coef": 0.5, "ppo.ent_coef": 0.01, "ppo.micro_batch_size": ptx_rows,
                                  "ppo.micro_batch_tokens": 14, "rollout.forward_batch_tokens": 14})

    proc = torchrun(["-m", "fastppo.cli", "train", *overrides(tmp_path / "two", 1)], cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    train(load_config(None, overrides(tmp_path / "one", 2)))
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 2
    for ra, rb in zip(m1, m2):
        for k in ("loss/policy", "loss/value", "loss/total", "loss/ptx", "policy/entropy_new", "score/raw/mean",
                  "kl/ref_per_sequence", "grad_norm/policy", "grad_norm/critic", "response/length_mean"):
            assert ra[k] == pytest.approx(rb[k], rel=TOL["rtol"], abs=1e-6), (ra["iteration"], k)


# ----------------------------------------------------------------------------
# The planner and the packing itself
# ----------------------------------------------------------------------------

def test_first_fit_decreasing_respects_the_budget_and_places_every_row_once():
    g = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
    for _ in range(50):
        costs = torch.randint(1, 40, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        budget = int(torch.randint(1, 80, (1,), generator=g))
        bins = first_fit_decreasing(costs, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(costs)))
        for b in bins:
            assert b == sorted(b)
            assert len(b) == 1 or sum(costs[i] for i in b) <= budget          # an item over budget goes alone
        # First fit: a bin was opened only for an item that fitted no earlier bin, so no two bins could merge.
        loads = [sum(costs[i] for i in b) for b in bins]
        assert all(a + b > budget for i, a in enumerate(loads) for b in loads[i + 1:])
    # Longest first: 6 opens a bin, 5 another, 4 a third; 3 joins 5, 2 joins 6.
    assert first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[0, 1], [2], [3, 4]]


def test_plan_by_rows_and_by_tokens():
    assert [mb.rows for mb in plan([3, 4, 5, 6, 7], rows=2, tokens=None, padded_width=9, packed=True)] == \
        [[0, 1], [2, 3], [4]]
    assert [mb.rows for mb in plan([3, 4, 5, 6, 7], rows=2, tokens=10, padded_width=9, packed=True)] == \
        [[0, 4], [1, 3], [2]]
    # Padded forwards cost their full width per row: a budget of 2 rows' width.
    assert [len(mb.rows) for mb in plan([3, 4, 5, 6, 7], rows=2, tokens=18, padded_width=9, packed=False)] == \
        [2, 2, 1]
    assert not any(mb.dummy for mb in plan([3, 4], rows=1, tokens=None, padded_width=4, packed=True))


def test_packing_layout():
    """Positions restart at 0 per sequence, cu_seqlens delimit the sequences, targets map back to their
    padded (row, column), and in_row_order undoes a regrouping of rows. One row (flash-attn), or rows as wide
    as the longest sequence, filled first fit decreasing, with a filler block closing a row."""
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    targets = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 0], [0] * 5, [0, 0, 0, 0, 1]]).bool()
    ids = torch.arange(20).view(4, 5)
    p = Packing.build(mask, targets, "cpu", one_row=True)
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert p.cu_seqlens.tolist() == [0, 3, 5, 8] and p.max_seqlen == 3 and p.n_tokens == 8
    assert p.pack(ids).tolist() == [[1, 2, 3, 5, 6, 17, 18, 19]]
    assert p.gather(p.pack(ids)).tolist() == p.take(ids).tolist() == [2, 3, 5, 19]
    rows = Packing.build(mask, targets, "cpu")
    assert rows.position_ids.tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 2]]        # [1, 0]'s filler: position 0
    assert rows.pack(ids).tolist() == [[1, 2, 3], [5, 6, 0], [17, 18, 19]]
    assert rows.cu_seqlens.tolist() == [0, 3, 5, 6, 9] and rows.max_seqlen == 3 and rows.n_tokens == 8
    assert rows.gather(rows.pack(ids)).tolist() == [2, 3, 5, 19]
    lengths = torch.tensor([7, 2, 5, 4, 3, 1])
    wide = Packing.build(torch.arange(8) < lengths[:, None], torch.zeros(6, 8, dtype=torch.bool), "cpu")
    assert tuple(wide.position_ids.shape) == (4, 7) and wide.n_tokens == 22         # [7], [5, 2], [4, 3], [1]
    p = rows
    back = p.unpack(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert back.tolist() == [[0, 0, 1, 2, 0], [3, 0, 0, 0, 0], [0] * 5, [0, 0, 0, 0, 4]]
    assert p.attention_kwargs(type("C", (), {"_attn_implementation": "sdpa"})()) == {}
    fa = p.attention_kwargs(type("C", (), {"_attn_implementation": "flash_attention_2"})())
    assert fa["cu_seq_lens_q"] is p.cu_seqlens and fa["max_length_k"] == 3
    with pytest.raises(ValueError, match="targets must lie on valid tokens"):
        Packing.build(mask, torch.ones_like(targets), "cpu")
    x = torch.arange(5.0)
    assert in_row_order([torch.tensor([3, 0]), torch.tensor([4, 1, 2])], [x[[3, 0]], x[[4, 1, 2]]]).tolist() == x.tolist()


@pytest.mark.parametrize("field", ["ppo.micro_batch_tokens", "rollout.forward_batch_tokens"])
def test_token_budgets_must_be_positive(tiny_setups, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, tiny_setups("llama").overrides(**{field: 0}))


# ----------------------------------------------------------------------------
# The benchmark's forced lengths (bench/forced_lengths.py)
# ----------------------------------------------------------------------------

def test_forced_lengths_make_generate_stop_at_the_drawn_length(tiny_setups):
    """bench/trainer.py --lengths longtail: sampling through HF generate (as TRL does, EOS not a stop token)
    with ForcedLengths gives every response exactly its drawn length, EOS last, pad after."""
    import importlib.util

    from transformers import AutoModelForCausalLM, LogitsProcessorList

    spec = importlib.util.spec_from_file_location("forced_lengths",
                                                  Path(__file__).resolve().parent.parent / "bench" / "forced_lengths.py")
    fl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fl)
    setup = tiny_setups("llama")
    model = AutoModelForCausalLM.from_pretrained(setup.policy)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, model.config.vocab_size, (12, 5), generator=g)
    lengths = fl.draw_lengths(prompts.tolist(), 9, seed=0)
    assert min(lengths.values()) >= 1 and max(lengths.values()) <= 9 and len(set(lengths.values())) > 2
    eos, pad = model.config.eos_token_id, 0
    forced = fl.ForcedLengths(lengths, prompt_len=5, eos_id=eos, pad_id=pad)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=9,
                         eos_token_id=None, pad_token_id=pad, logits_processor=LogitsProcessorList([forced]))
    for row, prompt in zip(out[:, 5:].tolist(), prompts.tolist()):
        n = lengths[fl.prompt_key(prompt)]
        assert row[n - 1] == eos and eos not in row[:n - 1] and pad not in row[:n], (n, row)
        assert all(t == pad for t in row[n:]), (n, row)


def test_packed_and_padded_drop_the_same_nan_rows(tiny_setups):
    """A sequence whose forward is NaN (here: a token with a NaN embedding in all four models) must not take the
    sequences packed beside it down with it (0 x NaN in the attention): the reward-model scores and the
    policy / reference / critic outputs of a packed pass flag exactly the rows a padded pass flags, and the
    other rows keep their values."""
    from fastppo.config import load_config
    from fastppo.models import load_models
    from fastppo.rollout import Rollout

    setup = tiny_setups("llama")
    cfg = load_config(None, setup.overrides())
    models = load_models(cfg.model, torch.device("cpu"))
    tok = models.tokenizer
    poison = tok.convert_tokens_to_ids("sad")
    with torch.no_grad():
        for m in (models.policy, models.ref, models.critic, models.reward):
            m.get_input_embeddings().weight[poison] = float("nan")
    words = [tok.convert_tokens_to_ids(w) for w in "the red fox is kind and quick".split()]
    # Left-padded prompts of 2-4 tokens, responses of 1-5: one long row sets the packed rows' width, the short
    # ones share rows, the poisoned row 2 among them.
    P, R = 4, 5
    prompt_len, resp_len = [4, 2, 2, 3, 2, 2], [5, 2, 1, 2, 1, 2]
    B = len(prompt_len)
    seq = torch.full((B, P + R), tok.pad_token_id)
    mask = torch.zeros(B, P + R, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for b in range(B):
        ids = torch.tensor(words)[torch.randint(len(words), (prompt_len[b] + resp_len[b],), generator=g)]
        seq[b, P - prompt_len[b]:P + resp_len[b]] = ids
        mask[b, P - prompt_len[b]:P + resp_len[b]] = 1
    seq[2, P] = poison
    rmask = mask[:, P:].bool()
    rollout = Rollout(seq, mask, rmask, rmask.sum(-1), torch.ones(B, dtype=torch.bool), P)
    results = {}
    for packing in (False, True):
        cfg.ppo.packing = packing
        outcomes = outcomes_for(models, rollout, cfg, batch_size=B)
        results[packing] = score(models, rollout, cfg, batch_size=B, fused=models.fused_lm_head,
                                         outcomes=outcomes)
    for packing, scored in results.items():
        assert scored.nonfinite.tolist() == [False, False, True, False, False, False], (packing, scored.nonfinite)
    padded, packed = results[False], results[True]
    for name in ("scores", "old_logprobs", "old_entropy", "ref_logprobs", "values"):
        a, b = getattr(padded, name), getattr(packed, name)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        # float32 forwards of the same sequences in another layout: rounding-level differences
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
