"""Evaluation: the pass@k estimator, `fastppo eval` on an export and a checkpoint, and `train` with eval.data_path
(the same weights as without it)."""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest
import torch
from fastppo.checkpoint import read_weights
from fastppo.cli import main
from fastppo.config import ConfigError, load_config
from fastppo.evaluation import SAMPLES_FILE, eval_metrics, pass_at_k
from fastppo.train import train
from fastppo_testing.trainer import read_metrics, tiny_setups  # noqa: F401  (fixture)

FN = "fastppo_testing.reward_fns:length"


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_is_the_probability_that_k_of_n_samples_hold_a_correct_one(n):
    # Chen et al. 2021: pass@k = P(a k-subset of the n samples, drawn uniformly, holds a correct one), counted here.
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            exact = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            # The product form rounds at most n times (relative 2^-53 each).
            assert pass_at_k(n, c, k) == pytest.approx(exact, rel=0, abs=8 * n * 2 ** -53), (n, c, k)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_eval_metrics_of_a_table():
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, float("nan"), 0.0, 0.2]])
    lengths = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]])
    m = eval_metrics(scores, lengths, pass_k=[1, 2, 4], threshold=1.0)
    assert m["eval/mean@4"] == pytest.approx(5 / 12)
    assert m["eval/pass@1"] == pytest.approx((1 / 4 + 1 + 0) / 3)
    assert m["eval/pass@2"] == pytest.approx((1 - math.comb(3, 2) / math.comb(4, 2) + 1 + 0) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)
    assert m["eval/reward_mean"] == pytest.approx(5.2 / 11)          # the NaN score left out
    assert m["eval/length_mean"] == pytest.approx(40 / 12)


def _eval_overrides(setup, **extra):
    return setup.overrides(**{"eval.data_path": setup.prompts, "eval.n_samples": 3, "eval.pass_k": "[1,3]",
                              "eval.max_prompts": 5, "eval.pass_threshold": 0.0, "reward.functions": f"[{{name: {FN}}}]",
                              **extra})


def test_train_with_evaluation_logs_eval_metrics_and_trains_the_same_weights(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    common = {"run.iterations": 3, "run.save_every": 0}
    plain = train(load_config(None, _eval_overrides(setup, **common, **{"run.output_dir": tmp_path / "a",
                                                                         "eval.data_path": None})))
    torch.manual_seed(4321)                      # neither run depends on the caller's RNG
    evaluated = train(load_config(None, _eval_overrides(setup, **common, **{"run.output_dir": tmp_path / "b",
                                                                             "eval.every": 2})))
    a, b = read_weights(plain.checkpoint, "policy"), read_weights(evaluated.checkpoint, "policy")
    for k in a:                                  # bitwise: evaluation draws nothing from the training RNG
        assert torch.equal(a[k], b[k]), k
    records = read_metrics(tmp_path / "b")
    with_eval = [r["iteration"] for r in records if "eval/pass@3" in r]
    assert with_eval == [0, 2, 3]                # before the first update, every 2, at the end
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    last = records[-1]
    for key in ("eval/reward_mean", "eval/mean@3", "eval/pass@1", "eval/length_mean", f"eval/reward_fn/{FN}/mean"):
        assert math.isfinite(last[key]), key
    assert last["eval/pass@1"] == pytest.approx(last["eval/mean@3"])     # pass@1's estimate is the accuracy
    assert last["eval/pass@1"] <= last["eval/pass@3"] <= 1
    samples = [json.loads(line) for line in (tmp_path / "b" / SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == 3 * 5 * 3 and {s["iteration"] for s in samples} == {0, 2, 3}
    first = [s for s in samples if s["iteration"] == 3]
    assert sum(s["length"] for s in first) / len(first) == pytest.approx(last["eval/length_mean"])
    assert not any(k.startswith("eval/") for k in read_metrics(tmp_path / "a")[-1])

    # `fastppo eval` of the export and of the checkpoint: the same seed samples what the run's last evaluation did.
    out_export, out_ckpt = tmp_path / "eval_export", tmp_path / "eval_ckpt"
    cfg_path = tmp_path / "b" / "config.yaml"
    assert main(["eval", str(evaluated.export), "--config", str(cfg_path), "--data", str(setup.prompts),
                 "--output-dir", str(out_export)]) == 0
    assert main(["eval", str(evaluated.checkpoint), "--checkpoint", "--output-dir", str(out_ckpt)]) == 0
    m_export, m_ckpt = read_metrics(out_export)[-1], read_metrics(out_ckpt)[-1]
    assert m_ckpt["iteration"] == 3 and m_export["iteration"] == 0
    for key in ("eval/reward_mean", "eval/pass@1", "eval/pass@3", "eval/length_mean"):
        assert m_export[key] == m_ckpt[key] == last[key], key
    cli_samples = [json.loads(line) for line in (out_ckpt / SAMPLES_FILE).read_text().splitlines()]
    assert [s["response"] for s in cli_samples] == [s["response"] for s in first]


def test_eval_without_prompts_or_with_a_bad_k_names_the_field(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    assert main(["eval", str(setup.policy), *setup.overrides(), "--output-dir", str(tmp_path / "e")]) == 2
    assert "eval.data_path" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="eval.pass_k"):
        load_config(None, setup.overrides(**{"eval.n_samples": 2, "eval.pass_k": "[1,4]"}))


def test_two_processes_evaluate_what_one_process_does(tiny_setups, tmp_path):
    """Each rank evaluates its share of 5 prompts (3 + 2, the last prompt repeated and left out) and the metrics are
    reduced over both: the same samples and metrics as one process. Scores may differ by float32 rounding (the
    reward model runs on other batches, sharded), a few ulps of numbers of order 1: rtol 1e-5."""
    from fastppo_testing.distributed import output, torchrun

    setup = tiny_setups("llama")
    common = {"run.iterations": 1, "run.save_every": 0, "run.export_at_end": False}
    one = tmp_path / "one"
    train(load_config(None, _eval_overrides(setup, **common, **{"run.output_dir": one})))
    proc = torchrun(["-m", "fastppo.cli", "train", *_eval_overrides(setup, **common, **{
        "run.output_dir": tmp_path / "two"})], cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    for ra, rb in zip(read_metrics(one), read_metrics(tmp_path / "two")):
        assert ra["iteration"] == rb["iteration"]
        for key in ("eval/reward_mean", "eval/mean@3", "eval/pass@1", "eval/pass@3", "eval/length_mean"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["iteration"], key)
    sa, sb = ([json.loads(line) for line in (d / SAMPLES_FILE).read_text().splitlines()] for d in (one, tmp_path / "two"))
    assert len(sa) == len(sb) == 2 * 5 * 3
    assert [(s["iteration"], s["prompt_index"], s["sample"], s["response"]) for s in sb] == \
        [(s["iteration"], s["prompt_index"], s["sample"], s["response"]) for s in sa]


def test_eval_of_a_lora_checkpoint_and_its_merged_export_reproduce_the_runs_last_evaluation(tiny_setups, tmp_path):
    """A LoRA run (the adapters on the frozen base): `fastppo eval --checkpoint` rebuilds the adapted policy from the
    checkpoint, and the merged export evaluates the same, as the run's own last evaluation did."""
    setup = tiny_setups("llama")
    run = train(load_config(None, _eval_overrides(setup, **{
        "run.iterations": 2, "run.save_every": 0, "run.output_dir": tmp_path / "run", "eval.every": 2,
        "model.lora.rank": 4, "model.lora.alpha": 8, "optim.policy_lr": 3e-2})))
    last = read_metrics(tmp_path / "run")[-1]
    assert last["iteration"] == 2 and "eval/pass@3" in last
    out_ckpt, out_export = tmp_path / "eval_ckpt", tmp_path / "eval_export"
    assert main(["eval", str(run.checkpoint), "--checkpoint", "--output-dir", str(out_ckpt)]) == 0
    assert main(["eval", str(run.export), "--config", str(tmp_path / "run" / "config.yaml"),
                 "--data", str(setup.prompts), "--output-dir", str(out_export)]) == 0
    m_ckpt, m_export = read_metrics(out_ckpt)[-1], read_metrics(out_export)[-1]
    for key in ("eval/reward_mean", "eval/pass@1", "eval/pass@3", "eval/length_mean"):
        assert m_ckpt[key] == last[key], key
        # The export merges W + (α/r)·B·A into float32 weights: its logits differ from the adapted forward by
        # rounding, so a sampled token could flip only at a near-tie of the Gumbel scores; lengths are compared
        # through the mean over 15 samples.
        assert m_export[key] == pytest.approx(last[key], rel=0.0, abs=0.2), key
    run_samples = [json.loads(line) for line in (tmp_path / "run" / SAMPLES_FILE).read_text().splitlines()]
    ckpt_samples = [json.loads(line) for line in (out_ckpt / SAMPLES_FILE).read_text().splitlines()]
    assert [s["response"] for s in ckpt_samples] == [s["response"] for s in run_samples if s["iteration"] == 2]
    # The adapters moved the policy: the base model alone samples other responses (what a checkpoint evaluated
    # without its adapters would give).
    assert main(["eval", str(setup.policy), "--config", str(tmp_path / "run" / "config.yaml"),
                 "--data", str(setup.prompts), "--output-dir", str(tmp_path / "eval_base")]) == 0
    base_samples = [json.loads(line) for line in (tmp_path / "eval_base" / SAMPLES_FILE).read_text().splitlines()]
    assert [s["response"] for s in base_samples] != [s["response"] for s in ckpt_samples]
