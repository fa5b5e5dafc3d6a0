"""The health monitor: each check on made-up series, the verdict on the demo's recorded runs (vanilla warns, ppo_max
does not), and health.action in a tiny `train` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastppo.config import ConfigError, HealthConfig, load_config
from fastppo.health import HealthMonitor, check_run
from fastppo.train import train
from fastppo_testing.trainer import logged, read_metrics, tiny_setups  # noqa: F401  (fixtures)

RECORDED = Path(__file__).resolve().parent / "support" / "fastppo_testing" / "data"


def run_monitor(cfg: HealthConfig, records: list[dict]) -> list:
    monitor = HealthMonitor(cfg)
    return [a for i, r in enumerate(records, start=1) for a in monitor.observe(r.get("iteration", i), r)]


@pytest.mark.parametrize("check, key, good, bad, field", [
    ("entropy_collapse", "policy/entropy", 0.8, 0.1, "health.entropy_floor"),
    ("kl_drift", "kl/ref_per_sequence", 5.0, 20.0, "health.kl_ceiling"),
    ("rollout_mismatch_kl", "rollout/kl_k3", 1e-4, 0.05, "health.mismatch_kl_ceiling"),
    ("rollout_mismatch_frac", "rollout/diff_gt_0.1_frac", 0.0, 0.2, "health.mismatch_frac_ceiling"),
    ("clip_frac", "policy/clipfrac", 0.01, 0.5, "health.clip_frac_ceiling"),
])
def test_a_threshold_check_fires_once_after_warmup_naming_metric_value_and_threshold(check, key, good, bad, field):
    cfg = HealthConfig(warmup=3)
    records = [{key: bad}] * 3 + [{key: good}] * 4 + [{key: bad}] * 3      # bad during warmup is not counted
    alerts = run_monitor(cfg, records)
    assert [(a.check, a.iteration) for a in alerts] == [(check, 8)]
    assert key in alerts[0].message and field in alerts[0].message and f"{bad:.4g}" in alerts[0].message
    off = HealthConfig(warmup=3, **{field.split(".")[1]: None})
    assert run_monitor(off, records) == []


def test_nonfinite_steps_and_scores_count_from_the_first_iteration():
    cfg = HealthConfig(warmup=10, nonfinite_steps=2)
    records = [{"train/skipped_steps": 0.0, "score/nonfinite": 0.0}, {"train/skipped_steps": 1.0, "score/nonfinite": 1.0},
               {"train/skipped_steps": 2.0, "score/nonfinite": 0.0}, {"train/skipped_steps": 3.0, "score/nonfinite": 1.0}]
    alerts = run_monitor(cfg, records)
    assert [(a.check, a.iteration) for a in alerts] == [("nonfinite_steps", 3), ("nonfinite_scores", 4)]
    assert "train/skipped_steps = 2 >= health.nonfinite_steps = 2" in alerts[0].message


def _collapse(n: int, *, clipped: tuple, repeat: tuple, ppl: tuple) -> list[dict]:
    """n records whose metrics move linearly from the first value of each pair to the second."""
    return [{"response/clipped_frac": clipped[0] + (clipped[1] - clipped[0]) * i / (n - 1),
             "response/repeat_frac": repeat[0] + (repeat[1] - repeat[0]) * i / (n - 1),
             "policy/perplexity": ppl[0] + (ppl[1] - ppl[0]) * i / (n - 1)} for i in range(n)]


def test_pattern_collapse_needs_clipping_up_and_repetition_up_or_perplexity_down():
    cfg = HealthConfig(warmup=0, window=5)
    assert [a.check for a in run_monitor(cfg, _collapse(20, clipped=(0, 1), repeat=(0, 0.3), ppl=(2, 3)))] == \
        ["pattern_collapse"]
    assert [a.check for a in run_monitor(cfg, _collapse(20, clipped=(0, 1), repeat=(0, 0), ppl=(2, 1)))] == \
        ["pattern_collapse"]
    assert run_monitor(cfg, _collapse(20, clipped=(0, 1), repeat=(0, 0), ppl=(2, 2))) == []      # only longer
    assert run_monitor(cfg, _collapse(20, clipped=(0, 0), repeat=(0, 0.5), ppl=(2, 1))) == []    # not cut off
    alerts = run_monitor(cfg, _collapse(20, clipped=(0, 1), repeat=(0, 0.3), ppl=(2, 3)))
    assert "response/clipped_frac" in alerts[0].message and "health.clipped_rise = 0.25" in alerts[0].message
    assert "response/repeat_frac" in alerts[0].message and "perplexity" not in alerts[0].message
    assert run_monitor(cfg, _collapse(9, clipped=(0, 1), repeat=(0, 1), ppl=(2, 1))) == []      # < two windows


def test_reward_hacking_is_reward_up_while_the_evaluation_falls():
    cfg = HealthConfig(warmup=0, window=3)
    rewards = [{"score/raw/mean": 0.1 * i} for i in range(10)]
    falling = [dict(r) for r in rewards]
    falling[0]["eval/reward_mean"], falling[5]["eval/reward_mean"], falling[9]["eval/reward_mean"] = 1.0, 0.95, 0.7
    alerts = run_monitor(cfg, falling)
    assert [(a.check, a.iteration) for a in alerts] == [("reward_hacking", 10)]
    assert "eval/reward_mean 1 -> 0.7" in alerts[0].message and "health.hacking_reward_rise = 0.5" in alerts[0].message
    rising = [dict(r) for r in rewards]
    rising[0]["eval/reward_mean"], rising[9]["eval/reward_mean"] = 1.0, 1.2
    assert run_monitor(cfg, rising) == []


@pytest.mark.parametrize("preset, fires", [("ppo_max", []), ("vanilla", ["pattern_collapse"])])
def test_the_default_thresholds_on_the_demos_recorded_runs(preset, fires, tmp_path):
    # The metrics `make demo ARGS="--compare vanilla"` logged (seed 0, the keys the monitor reads), kept in
    # tests/support: vanilla's responses run to the length limit repeating phrases, ppo_max's stay healthy.
    records = [json.loads(line) for line in (RECORDED / f"demo_{preset}_metrics.jsonl").read_text().splitlines()]
    alerts = run_monitor(HealthConfig(), records)
    assert [a.check for a in alerts] == fires
    (tmp_path / "metrics.jsonl").write_text((RECORDED / f"demo_{preset}_metrics.jsonl").read_text())
    assert [a.check for a in check_run(tmp_path, HealthConfig())] == fires


def test_bad_thresholds_name_the_field(tiny_setups):
    setup = tiny_setups("llama")
    for override, field in (("health.window=0", "health.window"), ("health.entropy_floor=-1", "health.entropy_floor"),
                            ("health.perplexity_drop=1.5", "health.perplexity_drop"),
                            ("health.action=panic", "health.action")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, [*setup.overrides(), override])


def test_health_action_warn_logs_and_stop_checkpoints_and_stops(tiny_setups, tmp_path, logged):
    setup = tiny_setups("llama")
    # An entropy floor no tiny random model stays above: the check fires at the first iteration after warmup.
    common = {"health.entropy_floor": 1e6, "health.warmup": 1, "run.iterations": 4}
    warned = train(load_config(None, setup.overrides(**common, **{"run.output_dir": tmp_path / "warn"})))
    assert warned.iterations_done == 4 and not warned.interrupted
    messages = [m for m in logged if "entropy collapse" in m]
    assert len(messages) == 1 and messages[0].startswith("WARNING health: entropy collapse: policy/entropy = ")
    assert "< health.entropy_floor = 1e+06 at iteration 2" in messages[0]
    records = read_metrics(tmp_path / "warn")
    assert [r["iteration"] for r in records if "health/entropy_collapse" in r] == [2]
    assert [r["health/alerts"] for r in records] == [0.0, 1.0, 1.0, 1.0]

    stopped = train(load_config(None, setup.overrides(**common, **{"run.output_dir": tmp_path / "stop",
                                                                    "health.action": "stop"})))
    assert stopped.interrupted and stopped.iterations_done == 2 and stopped.export is None
    assert stopped.checkpoint is not None and stopped.checkpoint.name == "iter_00000002"
    assert any("stopped by the health monitor (entropy_collapse; health.action=stop)" in m for m in logged)
    # Resumed (with the check off), the run goes on; a check that fired before the checkpoint does not fire again.
    resumed = train(load_config(None, setup.overrides(**common, **{"run.output_dir": tmp_path / "stop",
                                                                    "run.resume": "latest"})))
    assert resumed.iterations_done == 4 and not resumed.interrupted
    assert sum("entropy collapse" in m for m in logged) == 2          # warn run + stop run, none after the resume


def test_a_stop_during_the_first_evaluation_checkpoints_after_iteration_one(tiny_setups, tmp_path, monkeypatch):
    """SIGTERM once `train` has opened its metrics.jsonl (here: while it evaluates before its first update) is a
    graceful stop like any other: the run goes on to iteration 1's checkpoint and returns. It used to arrive
    before the stop handler, which `fastppo demo`'s stop test hit now and then."""
    import os
    import signal

    from fastppo import health

    start = health.RunMonitor.start

    def start_and_stop(self, writer, iteration):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None), \
            "no stop handler while train evaluates before its first update"
        os.kill(os.getpid(), signal.SIGTERM)
        start(self, writer, iteration)

    monkeypatch.setattr(health.RunMonitor, "start", start_and_stop)
    setup = tiny_setups("llama")
    result = train(load_config(None, setup.overrides(**{"run.iterations": 3, "run.output_dir": tmp_path})))
    assert result.interrupted and result.iterations_done == 1
    assert result.checkpoint is not None and result.checkpoint.name == "iter_00000001"


def test_bigram_repeats_counts_what_seq_rep_2_counts():
    # Reference: per response, the bigrams of consecutive masked tokens; repeated = total - distinct (Welleck et al.).
    import torch
    from fastppo.metrics import bigram_repeats

    g = torch.Generator().manual_seed(0)
    responses = torch.randint(0, 5, (7, 13), generator=g)
    mask = torch.rand(7, 13, generator=g) < 0.8                 # holes too: an environment's observations
    mask[0] = False                                              # an empty row
    repeated = total = 0
    for row, m in zip(responses.tolist(), mask.tolist()):
        grams = [(row[t], row[t + 1]) for t in range(len(row) - 1) if m[t] and m[t + 1]]
        repeated, total = repeated + len(grams) - len(set(grams)), total + len(grams)
    assert total > repeated > 0
    assert [float(x) for x in bigram_repeats(responses, mask)] == [repeated, total]
    big = torch.tensor([[2 ** 31 - 1, 2 ** 31 - 2, 2 ** 31 - 1, 2 ** 31 - 2]])     # the largest token ids stay exact
    assert [float(x) for x in bigram_repeats(big, torch.ones_like(big, dtype=torch.bool))] == [1.0, 3.0]
