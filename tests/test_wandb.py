"""run.wandb: the metrics and the resolved config go to a wandb run (offline here: WANDB_MODE=offline)."""

from __future__ import annotations

import sys

import pytest
from fastppo.config import ConfigError, load_config
from fastppo.metrics import WANDB_ID_FILE
from fastppo.train import train
from fastppo_testing.trainer import tiny_setups  # noqa: F401  (fixture)


def test_wandb_offline_run_holds_the_metrics_and_the_config(tiny_setups, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    setup = tiny_setups("llama")
    out = tmp_path / "run"
    overrides = setup.overrides(**{"run.output_dir": out, "run.iterations": 2, "run.wandb": True,
                                   "run.wandb_project": "fastppo-test-project", "run.wandb_tags": "[tiny-tag]",
                                   "ppo.clip_eps": 0.123})
    train(load_config(None, overrides))
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    # The offline run file holds its records as protobuf: strings (keys, JSON values) appear as they are.
    data = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for text in (b"score/raw/mean", b"policy/entropy", b"health/alerts", b"fastppo-test-project", b"tiny-tag",
                 b'"clip_eps":0.123', b"run"):
        assert text in data, text
    # A resumed run logs to the same wandb run.
    resumed = train(load_config(None, [*overrides, "run.iterations=3", "run.resume=latest"]))
    assert resumed.iterations_done == 3
    assert (out / WANDB_ID_FILE).read_text().strip() == run_id


def test_wandb_missing_is_a_config_error_naming_the_field(tiny_setups, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)                  # `import wandb` raises ImportError
    setup = tiny_setups("llama")
    with pytest.raises(ConfigError, match=r"run\.wandb is true but wandb is not installed"):
        train(load_config(None, setup.overrides(**{"run.output_dir": tmp_path / "run", "run.wandb": True})))
