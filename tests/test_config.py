"""One config schema for `train`, `sft` and `train-rm`: shared sections declared once, choices as str enums
that OmegaConf rejects naming the field, one loader, one validation."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re

import pytest

import fastppo.config as config_module
from fastppo.config import (Config, ConfigError, KLEstimator, ModelConfig, RMConfig, SFTConfig, StageModelConfig,
                            load_config, to_yaml, validate)
from fastppo_testing.trainer import logged  # noqa: F401  (fixture)

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


# ----------------------------------------------------------------------------
# Values of the wrong shape: one line naming the field and what to write
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_seed_lies_in_numpys_range(schema):
    assert _load(schema, f"run.seed={2 ** 32 - 1}").run.seed == 2 ** 32 - 1
    for seed in (-1, 2 ** 32):
        with pytest.raises(ConfigError, match=rf"field 'run\.seed': must lie in \[0, 2\^32\), got {seed}"):
            _load(schema, f"run.seed={seed}")


@pytest.mark.parametrize("override, form", [
    ("reward.functions.0.name=fastppo.rewards:math_answer",
     "reward.functions=[{name: fastppo.rewards:math_answer, weight: 1.0}]"),
    ("reward.functions=fastppo.rewards:math_answer", "reward.functions=[{name: fastppo.rewards:math_answer, weight: 1.0}]"),
    ("reward.functions=[a:b, c:d]", "reward.functions=[{name: a:b, weight: 1.0}, {name: c:d, weight: 1.0}]"),
    ("reward.functions.0.weight=2", "reward.functions=[{name: <name>, weight: 2}]"),
    ("model.lora.target_modules=q_proj", "model.lora.target_modules=[q_proj]"),
    ("optim.betas=0.9", "optim.betas=[0.9]"),
])
def test_a_list_set_as_anything_but_a_list_says_the_list_form(override, form):
    """An indexed override, a bare string or a list of strings for a list of sections: the list to write, built from
    what was given (not OmegaConf's 'Cannot merge incompatible container types' traceback or 'AnyNode')."""
    name = form.split("=", 1)[0]
    with pytest.raises(ConfigError, match=rf"command-line overrides: field '{re.escape(name)}': is a list: set it whole, "
                                          rf"e\.g\. {re.escape(form)}$"):
        _load(Config, override)


def test_a_section_set_to_a_value_names_the_section():
    from fastppo.config import from_dict

    with pytest.raises(ConfigError, match=r"field 'ppo': is a section, not a value: set its fields, e\.g\. ppo\.ppo_epochs"):
        _load(Config, "ppo=3")
    with pytest.raises(ConfigError, match=r"field 'model\.lora': is a section, .*, or model\.lora=null"):
        _load(Config, "model.lora=3")
    with pytest.raises(ConfigError, match=r"in dict: field 'ppo': is a section"):
        from_dict({"ppo": 3, "model": {"policy_path": "p", "reward_path": "r"}, "data": {"prompt_path": "d"}})
    with pytest.raises(ConfigError, match=r"overrides must look like key\.sub=value, got '=3'"):
        _load(Config, "=3")


@pytest.mark.parametrize("schema", SCHEMAS)
def test_a_bool_takes_true_or_false_and_a_string_no_bool(schema):
    """OmegaConf reads 2 as true and stores false in a string field as 'False' (then 'no such checkpoint: False')."""
    with pytest.raises(ConfigError, match=r"field 'run\.tensorboard': must be true or false, got 2"):
        _load(schema, "run.tensorboard=2")
    assert _load(schema, "run.tensorboard=0").run.tensorboard is False
    with pytest.raises(ConfigError, match=r"field 'data\.prompt_field': must be a string, got true"):
        _load(schema, "data.prompt_field=true")
    if schema is Config:
        with pytest.raises(ConfigError, match=r"field 'ppo\.packing': must be true or false, got 2"):
            _load(schema, "ppo.packing=2")
        with pytest.raises(ConfigError, match=r"field 'run\.resume': must be a string or null, got false"):
            _load(schema, "run.resume=false")


@pytest.mark.parametrize("attr, value, said", [
    ("ppo.clip_eps", "0.2", "field 'ppo.clip_eps': must be a number, got str '0.2'"),
    ("run.iterations", None, "field 'run.iterations': must be an int, got NoneType None"),
    ("rollout.rollout_batch_size", 4.0, "field 'rollout.rollout_batch_size': must be an int, got float 4.0"),
    ("ppo.packing", 2, "field 'ppo.packing': must be true or false, got int 2"),
    ("ppo", {"clip_eps": 0.1}, "field 'ppo': must be a PPOConfig, got dict {'clip_eps': 0.1}"),
    ("reward.functions", ["fastppo.rewards:math_answer"],
     "field 'reward.functions[0]': must be a RewardFunctionConfig, got str 'fastppo.rewards:math_answer'"),
    ("reward.kl_clamp", "1", "field 'reward.kl_clamp': must be a number or None, got str '1'"),
])
def test_a_config_edited_in_python_gets_its_types_checked(attr, value, said):
    cfg = _load(Config)
    section, _, name = attr.rpartition(".")
    setattr(functools.reduce(getattr, section.split("."), cfg) if section else cfg, name, value)
    with pytest.raises(ConfigError, match=re.escape(said)):
        validate(cfg)


def test_a_config_edited_in_python_keeps_ints_for_floats_and_str_for_choices():
    cfg = _load(Config)
    cfg.ppo.clip_eps, cfg.reward.kl_estimator = 1, "k3"
    validate(cfg)


def test_a_tilde_in_a_path_field_is_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["model.policy_path=~/p", "model.reward_path=r", "data.prompt_path=~/d.jsonl",
                             "run.output_dir=~/runs/x", "run.resume=~/runs/x/checkpoints/iter_00000001"])
    assert (cfg.model.policy_path, cfg.data.prompt_path, cfg.run.output_dir, cfg.run.resume) == (
        f"{tmp_path}/p", f"{tmp_path}/d.jsonl", f"{tmp_path}/runs/x", f"{tmp_path}/runs/x/checkpoints/iter_00000001")
    assert cfg.model.reward_path == "r" and cfg.data.prompt_field == "prompt"
    stage = load_config(None, ["model.path=~/m", "data.train_path=~/t.jsonl", "data.eval_path=~/e.jsonl"],
                        schema=SFTConfig)
    assert (stage.model.path, stage.data.train_path, stage.data.eval_path) == (
        f"{tmp_path}/m", f"{tmp_path}/t.jsonl", f"{tmp_path}/e.jsonl")


def test_overrides_are_a_list_and_a_config_file_a_file(tmp_path):
    with pytest.raises(TypeError, match=r"overrides must be a list of 'key\.sub=value' strings, got str 'ppo\.clip_eps=0\.1'"):
        load_config(None, "ppo.clip_eps=0.1")
    with pytest.raises(ConfigError, match=rf"config file {tmp_path} is a directory, not a YAML file"):
        load_config(tmp_path, PATHS[Config])
    with pytest.raises(ConfigError, match=r"got 'my\.yaml' \(a YAML file\? pass it as --config my\.yaml\)"):
        load_config(None, [*PATHS[Config], "my.yaml"])


def test_ptx_coef_without_ptx_data_warns_when_set(logged):
    _load(Config)                                                      # ppo_max's 0.1: on only with data.ptx_path
    assert not [m for m in logged if "ptx" in m]
    _load(Config, "ppo.ptx_coef=0.5")
    assert "WARNING ppo.ptx_coef=0.5 but data.ptx_path is not set: the ptx loss is off" in logged
