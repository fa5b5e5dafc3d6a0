"""FSDP2 and torchrun, on CPU with gloo and `torchrun --nproc_per_node=2`.

- all four models sharded: DTensor shards of half the rows on each rank, checkpoint shards per rank;
- 2 processes give the losses and final parameters of 1 process (same global batch and seeds);
- a checkpoint saved by 2 processes resumes in 1 (and one saved by 1 resumes in 2, with an HSDP mesh);
- the token-mean normaliser counts the tokens of all ranks when they hold unequal numbers of tokens;
- a stuck rank makes the others exit with a clear message; a torchrun restart resumes from the last checkpoint.

Tolerances of the 1-vs-2-process comparisons (float32). The two runs add the same numbers in different
orders (all-reduces of per-rank sums instead of one sum; one forward over 2 rows instead of two over 1
row; BLAS kernels chosen by shape), so sums and gradients differ by rounding only: a float32 sum of n
terms in another order is off by at most ~n * 2^-24 of the terms' magnitude, below 1e-5 of it for the
few hundred terms here. Losses, KL, entropy and gradient norms (means over many tokens) are compared
with rtol 1e-5 and atol 1e-6 (the atol for means near 0, e.g. whitened advantages); gradients with
rtol 1e-5 and atol 1e-5 of the tensor's largest gradient.

Weights are not compared that tightly: Adam divides each gradient element by its own running RMS, so
an element whose gradient is at rounding level (a sum that cancels, a rarely seen embedding row) can
take a different step of up to ~lr in each run from a rounding-level difference (seen: 2.2e-6 in one
of 1920 embedding elements, on an AVX-512 machine). The bound that holds on any machine is Adam's
step bound (`adam_drift_bound`); the trajectories themselves are checked by the tight comparison of
every iteration's losses and gradient norms, which are computed by the updated models. Every element
whose gradient is well above rounding level takes the same Adam step up to rounding. Only an element whose
gradient is at rounding level can step apart, and the loss is flat along it to first order: a move δ <= lr
changes a loss by O(δ²·curvature) and a gradient norm by O(δ·its Hessian row), and such an element's
Hessian row is small with its gradient (e.g. a token's embedding row that this batch barely touches). The
largest weight difference seen across machines was 2.2e-6, far below lr.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastppo.checkpoint import read_weights
from fastppo.config import load_config
from fastppo.train import train
from fastppo_testing.distributed import RESPONSE_LENGTHS, output, run_update, torchrun, uneven_experience
from fastppo_testing.trainer import read_metrics, tiny_setups  # noqa: F401  (fixture)

TOL = dict(rtol=1e-5, atol=1e-6)
LR = 1e-3        # optim.policy_lr and optim.critic_lr of the tiny setups (constant schedule, no weight decay)
STEPS_PER_ITERATION = 2   # optimizer steps: rollout_batch_size 4 / minibatch_size 2, one PPO epoch, no warm-up
LOSSES = ("loss/policy", "loss/value", "loss/total", "loss/ptx", "policy/approx_kl", "policy/clipfrac",
          "policy/entropy_new", "score/raw/mean", "kl/ref_per_sequence", "advantages/mean", "returns/mean",
          "grad_norm/policy", "grad_norm/critic", "values/explained_variance", "response/length_mean")


def _common(setup, out: Path, **extra) -> list[str]:
    """3 iterations of a global batch of 4 rollouts, minibatches of 2; every global statistic in play
    (whitening, reward moments, ptx, entropy bonus), activation checkpointing on."""
    return setup.overrides(**{
        "run.output_dir": out, "run.iterations": 3, "run.save_every": 2, "run.keep_last": 5,
        "data.ptx_path": setup.sft, "ppo.ptx_coef": 0.5, "ppo.ent_coef": 0.01, "advantage.whiten": True,
        "model.gradient_checkpointing": True, "run.log_level": "INFO", **extra})


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v for m in ("policy", "critic") for k, v in read_weights(ckpt, m).items()}


def adam_drift_bound(lr: float, steps: int, betas=(0.9, 0.95)) -> float:
    """Largest |w_a - w_b| after two runs of `steps` Adam steps from the same weights, whatever their gradients.

    One step moves a weight by lr * |m_hat| / (sqrt(v_hat) + eps) <= lr * |m_hat| / sqrt(v_hat) (no weight
    decay). m_hat and v_hat are weighted means of g_t and g_t^2 (weights a_t and b_t, each summing to 1), so by
    Cauchy-Schwarz m_hat^2 <= v_hat * sum_t a_t^2 / b_t (Kingma & Ba 2015, sec. 2.1, made exact for the bias
    corrections); that factor is 1 at the first step and below 1.36 for betas (0.9, 0.95) at any step.
    """
    b1, b2 = betas
    ratio = 1.0
    for k in range(1, steps + 1):
        s = sum(((1 - b1) * b1 ** j / (1 - b1 ** k)) ** 2 / ((1 - b2) * b2 ** j / (1 - b2 ** k)) for j in range(k))
        ratio = max(ratio, s)
    return 2 * lr * steps * ratio ** 0.5


def _assert_same_weights(a: Path, b: Path, steps: int) -> None:
    """The weights of two runs that took `steps` optimizer steps each since they last had equal weights.

    Within Adam's step bound (see the module docstring): this holds on any machine and still catches a
    parameter saved, loaded or resharded in the wrong place (the tiny models' weights are ~0.02, the bound
    2.3e-3 per step pair at lr 1e-3).
    """
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    bound = adam_drift_bound(LR, steps)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=bound, msg=lambda m: f"{k}: {m}")


def _assert_same_metrics(ra: dict, rb: dict) -> None:
    assert ra["iteration"] == rb["iteration"]
    for k in LOSSES:
        assert (k in ra) == (k in rb), k
        if k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=TOL["rtol"], abs=TOL["atol"]), (ra["iteration"], k, ra[k], rb[k])


@pytest.fixture(scope="module")
def runs(tiny_setups, tmp_path_factory):
    """The same 3 iterations with 2 processes (torchrun, the real CLI) and with 1 (in this process).

    Per-rank micro-batches of 1 with 2 ranks, of 2 with 1 rank: the same global minibatch and the
    same ptx batch (micro_batch_size examples per rank and step) either way.
    """
    setup = tiny_setups("llama")
    root = tmp_path_factory.mktemp("dist_runs")
    two = torchrun(["-m", "fastppo.cli", "train", *_common(setup, root / "two", **{"ppo.micro_batch_size": 1})],
                   cwd=root)
    assert two.returncode == 0, output(two)
    one = train(load_config(None, _common(setup, root / "one", **{"ppo.micro_batch_size": 2})))
    assert one.iterations_done == 3
    return {"setup": setup, "root": root, "two": root / "two", "one": root / "one", "two_proc": two}


def test_two_processes_shard_all_four_models(runs):
    two = runs["two"]
    for log_name in ("train.log", "train.rank1.log"):
        text = (two / log_name).read_text()
        for role in ("reference", "policy", "reward", "critic"):
            line = next((ln for ln in text.splitlines() if f"{role}: fully_shard over mesh (2,)" in ln), None)
            assert line is not None, (log_name, role, text[-3000:])
            held, total = (int(x) for x in line.split("holds ")[1].split(" parameters")[0].split(" of "))
            assert abs(held - total / 2) <= total * 0.01, line                         # half the parameters
    ckpt = two / "checkpoints" / "iter_00000003"
    assert {p.name for p in (ckpt / "model").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # one per rank
    # HF export: gathered to rank 0, the trained weights, under the model's own class name.
    from transformers import AutoModelForCausalLM

    export = two / "export" / "policy"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(export)
    final = read_weights(ckpt, "policy")
    rows = AutoModelForCausalLM.from_pretrained(runs["setup"].policy).get_input_embeddings().num_embeddings
    assert model.get_input_embeddings().num_embeddings == rows < final["model.embed_tokens.weight"].size(0)
    for k, v in model.state_dict().items():                                   # without the alignment rows
        torch.testing.assert_close(v, final[k][:v.size(0)], rtol=0, atol=0)   # gathered and copied: no arithmetic
    assert [r["iteration"] for r in read_metrics(two)] == [1, 2, 3]
    assert "fastppo: 3 iterations" in runs["two_proc"].stdout


def test_two_processes_equal_one_process(runs):
    m1, m2 = read_metrics(runs["one"]), read_metrics(runs["two"])
    assert len(m1) == len(m2) == 3
    for ra, rb in zip(m1, m2):
        _assert_same_metrics(ra, rb)
    for it in (2, 3):
        _assert_same_weights(runs["one"] / "checkpoints" / f"iter_{it:08d}", runs["two"] / "checkpoints" / f"iter_{it:08d}",
                             steps=it * STEPS_PER_ITERATION)


def test_checkpoint_from_two_processes_resumes_in_one(runs, tmp_path):
    """Saved by 2 ranks at iteration 2, resumed by 1 process: iteration 3 equals the 2-process run's."""
    out = tmp_path / "resumed"
    result = train(load_config(None, _common(runs["setup"], out, **{
        "ppo.micro_batch_size": 2, "run.resume": runs["two"] / "checkpoints" / "iter_00000002"})))
    assert result.iterations_done == 3
    _assert_same_metrics(read_metrics(out)[-1], read_metrics(runs["two"])[-1])
    _assert_same_weights(result.checkpoint, runs["two"] / "checkpoints" / "iter_00000003", steps=STEPS_PER_ITERATION)


def test_checkpoint_from_one_process_resumes_in_two_with_hsdp(runs, tmp_path):
    """Saved by 1 process, resumed by 2 on a 2-D (replicate=2, shard=1) mesh: iteration 3 equals the 1-process run's."""
    out = tmp_path / "resumed"
    shutil.copytree(runs["one"] / "checkpoints" / "iter_00000002", out / "checkpoints" / "iter_00000002")
    proc = torchrun(["-m", "fastppo.cli", "train", *_common(runs["setup"], out, **{
        "ppo.micro_batch_size": 1, "run.resume": "latest", "parallel.replicate_degree": 2})], cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "policy: fully_shard over mesh (2, 1)" in (out / "train.log").read_text()
    _assert_same_metrics(read_metrics(out)[-1], read_metrics(runs["one"])[-1])
    _assert_same_weights(out / "checkpoints" / "iter_00000003", runs["one"] / "checkpoints" / "iter_00000003",
                         steps=STEPS_PER_ITERATION)


def test_global_normaliser_with_uneven_tokens_and_sharded_lm_head(tiny_setups, tmp_path):
    """One minibatch of 4 rows holding 8, 4, 2 and 1 response tokens: every split over 2 ranks is
    uneven. The minibatch's losses and gradients equal one process's, which they would not with
    per-rank token means (the updated parameters: within Adam's step bound). Also: every parameter of the four models is a DTensor holding
    half the rows, and the fused lm_head op (which takes the lm_head weight) sees the full weight."""
    from fastppo.models import load_models

    setup = tiny_setups("llama")
    overrides = setup.overrides(**{"ppo.minibatch_size": 4, "ppo.micro_batch_size": 1, "rollout.temperature": 0.7,
                                   "ppo.ent_coef": 0.01, "optim.max_grad_norm": None})
    proc = torchrun(["-m", "fastppo_testing.distributed", "update", tmp_path, *overrides], cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    cfg = load_config(None, overrides)
    models = load_models(cfg.model, torch.device("cpu"))
    exp = uneven_experience(len(models.tokenizer))
    want = run_update(models, cfg, exp)

    tokens = [r["local_tokens"] for r in ranks]
    assert sum(tokens) == sum(RESPONSE_LENGTHS) and tokens[0] != tokens[1], tokens
    for r in ranks:
        for k in ("loss/policy", "loss/value", "loss/total", "policy/entropy_new", "policy/approx_kl"):
            assert r["metrics"][k] == pytest.approx(want["metrics"][k], rel=TOL["rtol"], abs=TOL["atol"]), k
        assert len(r["grads"]) == len(want["grads"]) == 2                       # one step of each optimizer
        for got_step, want_step in zip(r["grads"], want["grads"]):
            assert got_step.keys() == want_step.keys()
            for k, g in want_step.items():
                torch.testing.assert_close(got_step[k], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(),
                                           msg=lambda m: f"gradient of {k}: {m}")
        for k, v in want["params"].items():
            torch.testing.assert_close(r["params"][k], v, rtol=0, atol=adam_drift_bound(LR, 1), msg=lambda m: f"{k}: {m}")
        # Fused lm_head under FSDP: equal to full logits under FSDP and to the unsharded model.
        torch.testing.assert_close(r["fused_logprobs"], r["plain_logprobs"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["fused_logprobs"], want["fused_logprobs"], **TOL)
        torch.testing.assert_close(r["fused_entropy"], want["fused_entropy"], **TOL)
        for role, layout in r["layout"].items():
            for name, full, local, placements in layout:
                assert placements == "(Shard(dim=0),)", (role, name, placements)
                rows = (full[0] + 1) // 2 if r["rank"] == 0 else full[0] // 2         # torch.chunk's split
                assert local == (rows, *full[1:]), (role, name, full, local)
    lm_head = dict((n, loc) for n, _, loc, _ in ranks[0]["layout"]["policy"])["lm_head.weight"]
    assert lm_head[0] == (models.policy.lm_head.weight.shape[0] + 1) // 2


def test_a_stuck_rank_makes_the_others_exit_with_a_clear_message(tiny_setups, tmp_path):
    """Rank 1 stops answering in iteration 2; rank 0's next collective times out (parallel.timeout_s)
    and it exits with a message naming the cause, instead of waiting forever."""
    setup = tiny_setups("llama")
    overrides = setup.overrides(**{"run.output_dir": tmp_path / "run", "parallel.timeout_s": 3})
    # The stuck rank wakes up (and fails) after 8 s, as a rank stuck in a collective would after its own
    # timeout; rank 0 must have given up long before.
    proc = torchrun(["-m", "fastppo_testing.distributed", "train", *overrides], cwd=tmp_path, timeout=180,
                    env={"FASTPPO_TEST_FAULT": "1:2:hang", "FASTPPO_TEST_HANG_S": "8"})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, output(proc)
    assert "rank 0/2: a collective failed during training" in text and "Timed out" in text, output(proc)
    assert "Another rank has probably failed or is stuck" in text
    assert proc.wall_s < 90, proc.wall_s


def test_torchrun_restart_resumes_from_the_last_checkpoint(tiny_setups, tmp_path):
    """Rank 1 dies in iteration 3; torchrun (--max-restarts=1) restarts both ranks, which resume from
    the iteration-2 checkpoint on their own (no run.resume given) and finish."""
    setup = tiny_setups("llama")
    out = tmp_path / "run"
    overrides = setup.overrides(**{"run.output_dir": out, "run.iterations": 4, "run.save_every": 2,
                                   "run.export_at_end": False, "run.log_level": "INFO"})
    proc = torchrun(["-m", "fastppo_testing.distributed", "train", *overrides], cwd=tmp_path, max_restarts=1,
                    env={"FASTPPO_TEST_FAULT": "1:3:raise"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, output(proc)
    assert "injected fault on rank 1 at iteration 3" in text
    assert "torchrun restart 1: resuming" in text
    assert "resumed from" in (out / "train.log").read_text() and "iter_00000002" in (out / "train.log").read_text()
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "iter_00000004" / "trainer_state.pt").exists()


def test_global_batch_sizes_must_split_over_the_ranks(tiny_setups):
    from fastppo.config import ConfigError, derived, validate_world

    cfg = load_config(None, tiny_setups("llama").overrides(**{"rollout.rollout_batch_size": 8, "ppo.minibatch_size": 4,
                                                                "ppo.micro_batch_size": 2}))
    validate_world(cfg, 2)
    d = derived(cfg, 2)
    assert (d.rollouts_per_rank, d.minibatch_per_rank, d.micro_batches_per_minibatch) == (4, 2, 1)
    with pytest.raises(ConfigError, match="ppo.minibatch_size.*4 x 2"):
        validate_world(cfg, 4)
    with pytest.raises(ConfigError, match="rollout.rollout_batch_size.*divisible by the number of processes \\(3\\)"):
        validate_world(cfg, 3)


def test_grpo_two_processes_equal_one_process(tiny_setups, tmp_path):
    """GRPO with groups of 2 (the real CLI under torchrun): each rank generates whole groups, so the group
    statistics are local to it, and the run equals one process's (metrics, and weights within Adam's bound)."""
    setup = tiny_setups("llama")

    def overrides(out, micro):
        return setup.overrides(**{"run.output_dir": out, "run.iterations": 2, "run.save_every": 2,
                                  "run.export_at_end": False, "rollout.n_samples_per_prompt": 2,
                                  "ppo.minibatch_size": 4, "ppo.micro_batch_size": micro})

    two = torchrun(["-m", "fastppo.cli", "train", "--preset", "grpo", *overrides(tmp_path / "two", 1)], cwd=tmp_path)
    assert two.returncode == 0, output(two)
    train(load_config(None, overrides(tmp_path / "one", 2), preset="grpo"))
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 2
    # Iteration 1 starts from equal weights; later rollouts come from weights that may differ within Adam's bound
    # (gradients summed over ranks in another order), which the weights check below covers.
    _assert_same_metrics(m1[0], m2[0])
    assert not [k for r in (*m1, *m2) for k in r if k.startswith(("loss/value", "grad_norm/critic", "values/"))]
    ckpt = Path("checkpoints") / "iter_00000002"
    wa, wb = read_weights(tmp_path / "one" / ckpt, "policy"), read_weights(tmp_path / "two" / ckpt, "policy")
    assert wa.keys() == wb.keys() and read_weights(tmp_path / "two" / ckpt, "critic") == {}
    for k in wa:   # 2 iterations x 2 optimizer steps (8 rollouts, minibatches of 4)
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=adam_drift_bound(LR, 4), msg=lambda m: f"{k}: {m}")
