"""One config schema for `train`, `sft` and `train-rm`: shared sections declared once, choices as str enums
that OmegaConf rejects naming the field, one loader, one validation."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

import fastppo.config as config_module
from fastppo.config import (Config, ConfigError, KLEstimator, ModelConfig, RMConfig, SFTConfig, StageModelConfig,
                            load_config, to_yaml, validate)

PATHS = {Config: ["model.policy_path=p", "model.reward_path=r", "data.prompt_path=d"],
         SFTConfig: ["model.path=m", "data.train_path=t"], RMConfig: ["model.path=m", "data.train_path=t"]}
SCHEMAS = list(PATHS)


def _load(schema, *overrides, path=None):
    return load_config(path, [*PATHS[schema], *overrides], schema=schema)


def _config_classes() -> list[ast.ClassDef]:
    tree = ast.parse(inspect.getsource(config_module))
    return [n for n in tree.body if isinstance(n, ast.ClassDef)
            and any(isinstance(d, ast.Name) and d.id == "dataclass" for d in n.decorator_list)]


def test_every_field_of_every_section_has_a_docstring():
    classes = _config_classes()
    assert {"BaseModelConfig", "BaseRunConfig", "StageRunConfig", "RMConfig"} <= {c.name for c in classes}
    for node in classes:
        if node.name == "Derived":
            continue
        for i, stmt in enumerate(node.body):
            if isinstance(stmt, ast.AnnAssign):
                nxt = node.body[i + 1] if i + 1 < len(node.body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                    f"{node.name}.{stmt.target.id} has no docstring"


@pytest.mark.parametrize("section", ["model", "data", "optim", "run"])
def test_a_field_shared_by_train_and_the_stages_is_declared_once(section):
    train_cls, stage_cls = type(getattr(Config(), section)), type(getattr(SFTConfig(), section))
    assert type(getattr(RMConfig(), section)) is stage_cls
    own = lambda cls: set(cls.__dict__.get("__annotations__", {}))          # noqa: E731  declared in that class
    assert not own(train_cls) & own(stage_cls)
    shared = {f.name for f in dataclasses.fields(train_cls)} & {f.name for f in dataclasses.fields(stage_cls)}
    assert shared, section
    base = next(b for b in train_cls.__mro__[1:] if b in stage_cls.__mro__ and dataclasses.is_dataclass(b))
    assert shared == {f.name for f in dataclasses.fields(base)}


def test_choices_are_strings_and_print_as_their_value():
    cfg = _load(Config, "reward.kl_estimator=abs", "run.backend=torch")
    assert cfg.reward.kl_estimator is KLEstimator.abs
    assert cfg.reward.kl_estimator == "abs" and cfg.run.backend == "torch" and cfg.run.backend in ("triton", "torch")
    assert f"{cfg.reward.kl_estimator}" == str(cfg.reward.kl_estimator) == "abs"
    assert {"abs": 1}[cfg.reward.kl_estimator] == 1
    assert "kl_estimator: abs" in to_yaml(cfg)


@pytest.mark.parametrize("schema, override, field", [
    (Config, "reward.kl_estimator=k4", "reward.kl_estimator"),
    (Config, "parallel.shard=sometimes", "parallel.shard"),
    (Config, "run.backend=cuda", "run.backend"),
    (SFTConfig, "optim.schedule=step", "optim.schedule"),
    (RMConfig, "model.dtype=int8", "model.dtype"),
])
def test_a_bad_choice_fails_naming_the_field_and_the_choices(schema, override, field):
    with pytest.raises(ConfigError, match=rf"command-line overrides: field '{field}': must be one of .*, got"):
        _load(schema, override)


def test_a_bad_choice_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model:\n  attn_implementation: flash\n")
    with pytest.raises(ConfigError, match=r"sft\.yaml: field 'model\.attn_implementation': must be one of sdpa, eager"):
        _load(SFTConfig, path=path)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_a_config_built_in_python_gets_its_choices_checked(schema):
    cfg = _load(schema)
    cfg.model.dtype = "int8"
    with pytest.raises(ConfigError, match="field 'model.dtype': must be one of float32, bfloat16, float16, got 'int8'"):
        validate(cfg)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_shared_checks_apply_to_every_command(schema):
    for override, field in (("optim.max_grad_norm=0", "optim.max_grad_norm"), ("run.device=gpu", "run.device"),
                            ("run.max_nonfinite_in_a_row=0", "run.max_nonfinite_in_a_row"),
                            ("model.lm_head_chunk_size=0", "model.lm_head_chunk_size"),
                            ("run.log_level=LOUD", "run.log_level")):
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            _load(schema, override)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_saved_resolved_config_loads_back_unchanged(schema, tmp_path):
    cfg = _load(schema, "model.attn_implementation=eager", "optim.warmup_steps=3", "run.log_level=debug")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path, schema=schema) == cfg


def test_stage_defaults_and_presets():
    sft, rm = _load(SFTConfig), _load(RMConfig)
    assert sft.run.output_dir == "runs/sft" and rm.run.output_dir == "runs/rm"
    assert sft.optim.schedule == "cosine" and sft.optim.min_lr_ratio == 0.1 and sft.optim.lr == 1e-5
    assert _load(Config).optim.schedule == "constant" and _load(Config).run.output_dir == "runs/fastppo"
    with pytest.raises(ConfigError, match="presets are for `fastppo train` only"):
        load_config(None, PATHS[SFTConfig], preset="vanilla", schema=SFTConfig)
    with pytest.raises(ConfigError, match="schema must be one of Config, SFTConfig, RMConfig"):
        load_config(None, [], schema=ModelConfig)
    assert isinstance(_load(SFTConfig).model, StageModelConfig)


def test_a_dict_config_names_its_preset_like_a_yaml_file():
    """train(dict) reads a top-level `preset` key as a YAML file's is read, and an unknown one is a ConfigError."""
    from fastppo.config import from_dict

    required = {"model": {"policy_path": "p", "reward_path": "r"}, "data": {"prompt_path": "d"}}
    assert from_dict({**required, "preset": "vanilla"}).reward.kl_coef == 0.0       # vanilla: no KL penalty
    assert from_dict(required).reward.kl_coef == 0.05                              # ppo_max by default
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'"):
        from_dict({**required, "preset": "nope"})
