"""End-to-end tests of `fastppo train` on tiny CPU models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastppo.checkpoint import read_weights
from fastppo.cli import main
from fastppo.config import load_config
from fastppo.optim import NonFiniteError
from fastppo.train import train
from fastppo_testing.trainer import nan_value_loss, read_metrics, tiny_setups  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]

# What every iteration must log to catch pattern collapse (Zheng et al. 2023).
REQUIRED_METRICS = [
    "score/raw/mean", "score/raw/std", "kl/ref_per_sequence", "response/length_mean", "response/clipped_frac",
    "policy/perplexity", "policy/entropy", "policy/approx_kl", "policy/clipfrac", "values/clipfrac",
    "policy/ratio_mean", "loss/value", "loss/policy", "values/explained_variance", "advantages/mean", "returns/mean",
    "lr/policy", "lr/critic", "grad_norm/policy", "grad_norm/critic", "throughput/tokens_per_s", "memory/peak_mb",
    "time/rollout_s", "time/score_s", "time/update_s", "score/raw/histogram",
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cli_three_iterations_write_metrics_checkpoint_export(arch, tiny_setups, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup = tiny_setups(arch)
    out = tmp_path / "run"
    rc = main(["train", *setup.overrides(**{"run.output_dir": out, "run.tensorboard": True})])
    assert rc == 0, capsys.readouterr().err
    records = read_metrics(out)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    missing = [k for k in REQUIRED_METRICS if k not in records[-1]]
    assert not missing, missing
    assert all(isinstance(v, (int, float)) for k, v in records[-1].items() if not k.endswith("histogram"))
    assert (out / "config.yaml").exists() and load_config(out / "config.yaml").run.iterations == 3
    assert any((out / "tensorboard").iterdir())
    ckpt = out / "checkpoints" / "iter_00000003"
    assert {"model", "trainer_state.pt", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    export = out / "export" / "policy"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # The export has the tokenizer's rows: the alignment rows training added are not in it.
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == len(tok)
    # The export holds the trained weights: the same as the checkpointed policy (its first rows).
    ckpt_weights = read_weights(ckpt, "policy")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ckpt_weights[name][:tensor.size(0)], rtol=0, atol=0)  # copied: no arithmetic


@pytest.mark.parametrize("preset", ["ppo_max", "moss_release", "vanilla"])
def test_each_preset_runs_one_iteration(preset, tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    extra = {"run.output_dir": tmp_path / "run", "run.iterations": 1, "run.export_at_end": False}
    if preset == "ppo_max":  # with ptx data and its default critic warm-up on for this one iteration
        extra.update({"data.ptx_path": setup.sft})
    if preset == "moss_release":
        extra.update({"model.gradient_checkpointing": True})
    overrides = [o for o in setup.overrides(**extra) if not o.startswith("ppo.critic_warmup_steps")]
    cfg = load_config(None, overrides, preset=preset)
    result = train(cfg)
    assert result.iterations_done == 1
    m = result.metrics
    if preset == "ppo_max":
        assert m["train/policy_trained"] == 0.0  # critic warm-up: policy frozen
        assert m["kl/coef"] == pytest.approx(0.05)
    if preset == "vanilla":
        assert m["kl/coef"] == 0.0 and abs(m["advantages/mean"]) < 1e-5  # whitened
    assert m["train/optimizer_steps"] > 0


def test_python_api_with_a_dict_and_ptx_loss(tiny_setups, tmp_path):
    from omegaconf import OmegaConf

    from fastppo.train import train

    setup = tiny_setups("llama")
    overrides = setup.overrides(**{"run.output_dir": tmp_path / "run", "run.iterations": 1, "run.export_at_end": False,
                                   "data.ptx_path": setup.sft, "ppo.ptx_coef": 0.5, "ppo.ent_coef": 0.01})
    config = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))   # a plain nested dict
    result = train(config)
    assert result.metrics["loss/ptx"] > 0


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**{f"policy.{k}": v for k, v in read_weights(ckpt, "policy").items()},
            **{f"critic.{k}": v for k, v in read_weights(ckpt, "critic").items()}}


def test_resume_is_bitwise_identical(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    common = {"run.iterations": 4, "run.save_every": 2, "run.export_at_end": False,
              "reward.adaptive_kl": True, "data.ptx_path": setup.sft, "optim.schedule": "cosine",
              "optim.warmup_steps": 2}
    straight = train(load_config(None, setup.overrides(**common, **{"run.output_dir": tmp_path / "a"})))
    # 2 iterations, then a fresh process state resumes and runs 2 more.
    first = train(load_config(None, setup.overrides(**{**common, "run.output_dir": tmp_path / "b", "run.stop_after": 2})))
    assert first.interrupted and first.iterations_done == 2
    torch.manual_seed(12345)  # the resumed run must not depend on the caller's RNG
    resumed = train(load_config(None, setup.overrides(**common, **{"run.output_dir": tmp_path / "b",
                                                                      "run.resume": "latest"})))
    assert resumed.iterations_done == 4
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:  # bitwise: the same code on the same inputs and shapes in one process (determinism)
        assert torch.equal(a[k], b[k]), k
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["iteration"] for r in mb] == [1, 2, 3, 4]
    for key in ("score/raw/mean", "loss/policy", "loss/value", "kl/coef", "reward/running_mean"):
        assert ma[-1][key] == mb[-1][key], key


def test_nonfinite_steps_are_skipped_then_abort(tiny_setups, tmp_path, monkeypatch):
    import fastppo.update as ppo

    setup = tiny_setups("llama")
    # A NaN value loss in the update (NaN rewards or score-phase forwards never reach it: those rows are dropped,
    # see test_inputs.py and test_packing.py)
    monkeypatch.setattr(ppo, "ppo_loss", nan_value_loss(ppo.ppo_loss))
    cfg = load_config(None, setup.overrides(**{"run.output_dir": tmp_path / "run", "run.max_nonfinite_in_a_row": 3,
                                              "reward.reward_scale": False, "reward.reward_norm": False}))
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        train(cfg)
    records = read_metrics(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else []
    assert len(records) <= 1  # 2 steps per iteration: the abort comes in iteration 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_invalid_config_fails_at_start_naming_the_field(tiny_setups, tmp_path, capsys):
    setup = tiny_setups("llama")
    cases = {
        "ppo.no_such_knob=1": "ppo.no_such_knob",
        "ppo.clip_eps=abc": "ppo.clip_eps",
        "rollout.temperature=0": "rollout.temperature",
        "ppo.minibatch_size=3": "ppo.minibatch_size",
        "reward.kl_estimator=k9": "reward.kl_estimator",
    }
    for override, field in cases.items():
        rc = main(["train", *setup.overrides(**{"run.output_dir": tmp_path / "x"}), override])
        err = capsys.readouterr().err
        assert rc == 2 and field in err, (override, err)
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("model:\n  policy_pth: x\n")
    assert main(["train", "--config", str(yaml)]) == 2
    assert "model.policy_pth" in capsys.readouterr().err
    assert main(["train", "run.iterations=1"]) == 2
    assert "model.policy_path" in capsys.readouterr().err


def test_sigterm_leaves_a_resumable_checkpoint(tiny_setups, tmp_path):
    setup = tiny_setups("llama")
    out = tmp_path / "run"
    overrides = setup.overrides(**{"run.output_dir": out, "run.iterations": 10_000, "run.export_at_end": False,
                                   "run.log_level": "INFO"})
    exe = Path(sys.executable).with_name("fastppo")
    proc = subprocess.Popen([str(exe), "train", *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training never got going"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM" in output and "interrupted" in output
    done = len(read_metrics(out))
    ckpt = out / "checkpoints" / f"iter_{done:08d}"
    assert (ckpt / "trainer_state.pt").exists()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    result = train(load_config(None, setup.overrides(**{"run.output_dir": out, "run.iterations": done + 1,
                                                          "run.resume": "latest", "run.export_at_end": False})))
    assert result.iterations_done == done + 1 and not result.interrupted
