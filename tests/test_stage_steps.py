"""The stages' optimizer step (`ppo.optimizer_step`, shared with the PPO update): a step with a non-finite loss is
skipped without advancing the LR schedule, and run.max_nonfinite_in_a_row of them in a row stop the run with one
line naming what was non-finite and the fields to change."""

import json
import math

import pytest
import torch

import fastppo.sft as sft_module
from fastppo.demos import synthetic as S
from fastppo.cli import main
from fastppo.config import ConfigError, SFTConfig, load_config
from fastppo.optim import lr_lambda


def _init(root):
    from transformers import LlamaForCausalLM

    tok = S.build_tokenizer(root)
    torch.manual_seed(0)
    LlamaForCausalLM(S.tiny_llama_config(len(tok), hidden_size=32, layers=2, heads=4)).save_pretrained(root)


def _nan_on_calls(monkeypatch, bad_calls):
    """ptx_loss of the SFT stage, NaN on the given (1-based) calls: its gradient is NaN too (same graph)."""
    real, calls = sft_module.ptx_loss, []

    def ptx_loss(*args, **kwargs):
        calls.append(None)
        loss = real(*args, **kwargs)
        return loss * math.nan if bad_calls is None or len(calls) in bad_calls else loss

    monkeypatch.setattr(sft_module, "ptx_loss", ptx_loss)


def _overrides(tmp_path, **extra):
    data = S.write_jsonl(tmp_path / "sft.jsonl", S.make_sft_data(16, seed=1))
    # One micro-batch per step (batch_size == micro_batch_size) and no held-out split: one ptx_loss call per step.
    base = {"model.path": tmp_path / "init", "data.train_path": data, "run.output_dir": tmp_path / "run",
            "run.batch_size": 4, "run.micro_batch_size": 4, "data.eval_fraction": 0, "run.device": "cpu",
            "run.progress_bar": "false", "run.tensorboard": "false", "optim.lr": 1e-3, "optim.schedule": "linear",
            "optim.warmup_steps": 0, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def test_a_non_finite_sft_step_is_skipped_without_stepping_the_lr_schedule(tmp_path, monkeypatch):
    _init(tmp_path / "init")
    _nan_on_calls(monkeypatch, {2})
    cfg = load_config(schema=SFTConfig, overrides=_overrides(tmp_path, **{"run.max_steps": 4}))
    records = sft_module.sft(cfg).history
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # The schedule advances on real steps only: after step 2 (skipped) the LR is still that after step 1.
    # LambdaLR's LR is base_lr * lambda(step) in double precision, the product computed here: rel 1e-12 only
    # absorbs a different rounding order, while the next schedule step moves the LR by 1/4 of its range.
    f = lr_lambda(cfg.optim, 4)
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * f(k) for k in (1, 1, 2, 3)], rel=1e-12)
    assert [r["skipped_steps"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert math.isnan(records[1]["loss/sft"]) and "grad_norm" not in records[1]
    assert all(math.isfinite(records[i]["loss/sft"]) and math.isfinite(records[i]["grad_norm"]) for i in (0, 2, 3))


def test_non_finite_sft_steps_in_a_row_stop_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    _init(tmp_path / "init")
    _nan_on_calls(monkeypatch, None)
    rc = main(["sft", *_overrides(tmp_path, **{"run.max_steps": 10, "run.max_nonfinite_in_a_row": 3})])
    assert rc == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastppo sft: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert "non-finite loss and gradient in 3 optimizer steps in a row" in line, line
    assert "loss=nan, grad norm=nan" in line, line
    for name in ("run.max_nonfinite_in_a_row=3", "optim.lr", "optim.max_grad_norm"):
        assert name in line, (name, line)
    records = [json.loads(r) for r in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in records] == [1.0, 2.0]  # the third skipped step raises before its record


def test_max_nonfinite_in_a_row_is_validated_for_the_stages():
    with pytest.raises(ConfigError, match="run.max_nonfinite_in_a_row.*must be >= 1"):
        load_config(schema=SFTConfig, overrides=["model.path=x", "data.train_path=y", "run.max_nonfinite_in_a_row=0"])
