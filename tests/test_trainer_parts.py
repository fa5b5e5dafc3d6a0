"""Config, data, running moments, checkpoints and model loading: the trainer's parts on their own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastppo.checkpoint import list_checkpoints, save_checkpoint
from fastppo.config import PRESETS, Config, ConfigError, load_config, to_yaml
from fastppo.data import DataError, EpochSampler, collate_prompts, collate_sft, load_prompts, load_sft
from fastppo.metrics import RunningMoments
from fastppo.models import ModelError, load_models
from fastppo_testing.tiny_models import build_tokenizer, make_tiny_setup
from fastppo_testing.trainer import tiny_setups  # noqa: F401  (fixture)

REQUIRED = ["model.policy_path=p", "model.reward_path=r", "data.prompt_path=d"]


# ----------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------

def test_presets_follow_spec_table():
    m, r, v = PRESETS["ppo_max"](), PRESETS["moss_release"](), PRESETS["vanilla"]()
    assert (m.reward.kl_coef, m.reward.reward_clip, m.advantage.lam, m.optim.critic_lr) == (0.05, 0.8, 0.9, 1.65e-6)
    assert m.reward.reward_scale and m.reward.reward_norm and m.ppo.critic_warmup_steps > 0
    assert (r.reward.kl_coef, r.reward.reward_norm, r.reward.reward_clip, r.advantage.lam) == (0.01, False, None, 0.95)
    assert r.reward.reward_scale and r.ppo.ptx_coef == 0
    assert (v.reward.kl_coef, v.reward.reward_scale, v.ppo.value_clip, v.optim.max_grad_norm) == (0.0, False, None, None)
    assert v.advantage.whiten and not m.advantage.whiten
    for cfg in (m, r, v):
        assert (cfg.rollout.rollout_batch_size, cfg.ppo.minibatch_size, cfg.ppo.ppo_epochs) == (128, 32, 1)
        assert (cfg.rollout.temperature, cfg.rollout.top_p) == (0.8, 0.9)
    assert Config().reward.kl_coef == m.reward.kl_coef  # a fresh config is the ppo_max column


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import fastppo.config as config_module

    tree = ast.parse(inspect.getsource(config_module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in {"ModelConfig", "DataConfig", "RolloutConfig", "RewardConfig",
                                                             "PPOConfig", "OptimConfig", "RunConfig", "Config"}:
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                        f"{node.name}.{stmt.target.id} has no docstring"


def test_yaml_preset_and_overrides_layer(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: vanilla\nmodel:\n  policy_path: p\n  reward_path: r\ndata:\n  prompt_path: d\nadvantage:\n  lam: 0.5\n")
    cfg = load_config(y, ["advantage.lam=0.7", "reward.reward_clip=0.3"])
    assert cfg.advantage.lam == 0.7 and cfg.reward.reward_clip == 0.3 and cfg.advantage.whiten  # vanilla base
    assert load_config(y, [], preset="ppo_max").advantage.whiten is False  # explicit preset wins
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg  # the saved resolved config round-trips


@pytest.mark.parametrize("override,field", [
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("ppo.micro_batch_size=5", "ppo.micro_batch_size"),
    ("optim.schedule=step", "optim.schedule"),
    ("model.dtype=int8", "model.dtype"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("run.keep_last=0", "run.keep_last"),
    ("ppo.dual_clip=0.5", "ppo.dual_clip"),
    ("rollout.max_new_tokens=ten", "rollout.max_new_tokens"),
    ("nonsense=1", "nonsense"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, REQUIRED + [override])


def test_unknown_preset_and_missing_fields():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, REQUIRED, preset="ppo_min")
    with pytest.raises(ConfigError, match="data.prompt_path"):
        load_config(None, REQUIRED[:2])


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_prompts_plain_chat_parquet_and_truncation(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": "tell me about the red fox :"}, {"q": [{"role": "user", "content": "hello"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(tmp_path / "p.jsonl", tok, field="q", prompt_format="auto", max_len=4)
    assert prompts[0] == tok("tell me about the red fox :")["input_ids"][-4:]  # keeps the end
    chat = tok.apply_chat_template(rows[1]["q"], tokenize=False, add_generation_prompt=True)
    assert prompts[1] == tok(chat, add_special_tokens=False)["input_ids"][-4:]
    pq.write_table(pa.table({"q": ["the cat :", "a dog :"]}), tmp_path / "p.parquet")
    assert len(load_prompts(tmp_path / "p.parquet", tok, field="q", prompt_format="plain", max_len=16)) == 2
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.table({"q": ["the cat :"]}), tmp_path / "dir" / "a.parquet")
    assert len(load_prompts(tmp_path / "dir", tok, field="q", prompt_format="chat", max_len=16)) == 1

    batch = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "ok"}\n{"prompt": \n', r"p\.jsonl:2: invalid JSON"),
    ('{"prompt": "ok"}\n{"text": "x"}\n', r"p\.jsonl:2: missing field 'prompt'"),
    ('{"prompt": 3}\n', r"p\.jsonl:1: field 'prompt' must be a string or a list of messages"),
    ('{"prompt": [{"role": "user"}]}\n', r"p\.jsonl:1: field 'prompt' message 0"),
    ('{"prompt": "  "}\n', r"p\.jsonl:1: field 'prompt' is empty"),
    ('', r"no prompts found"),
    ('[1, 2]\n', r"p\.jsonl:1: each line must be a JSON object"),
])
def test_malformed_prompt_data_names_file_line_field(tok, tmp_path, content, match):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        load_prompts(tmp_path / "p.jsonl", tok, field="prompt", prompt_format="auto", max_len=8)


def test_missing_file_and_bad_format(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl", tok, field="prompt", prompt_format="auto", max_len=8)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="unsupported data format"):
        load_prompts(tmp_path / "x.csv", tok, field="prompt", prompt_format="auto", max_len=8)


def test_sft_examples_and_labels(tok, tmp_path):
    rows = [{"prompt": "the cat :", "response": "it sleeps"},
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_sft(tmp_path / "s.jsonl", tok, prompt_field="prompt", response_field="response",
                  messages_field="messages", max_len=64)
    assert ex[0].input_ids[-1] == tok.eos_token_id
    batch = collate_sft(ex, pad_id=tok.pad_token_id)
    labels = batch.labels[0]
    targets = labels[labels != -100].tolist()
    assert targets == tok("it sleeps", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'response'"):
        load_sft(tmp_path / "bad.jsonl", tok, prompt_field="prompt", response_field="response",
                 messages_field="messages", max_len=64)


def test_sampler_is_resumable():
    a = EpochSampler(5, seed=3)
    first = a.next(3) + a.next(4)
    assert sorted(first[:5]) == list(range(5))  # one epoch is a permutation
    b = EpochSampler(5, seed=3)
    b.next(3)
    c = EpochSampler(5, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.next(4) == first[3:]
    with pytest.raises(DataError, match="data changed"):
        EpochSampler(6, seed=3).load_state_dict(b.state_dict())


# ----------------------------------------------------------------------------
# running moments, checkpoints, models
# ----------------------------------------------------------------------------

def test_running_moments_match_numpy():
    rng = np.random.default_rng(0)
    data = [rng.normal(3.0, 2.0, size=n) for n in (5, 1, 17, 64)]
    m = RunningMoments()
    for chunk in data:
        m.update(torch.tensor(chunk, dtype=torch.float32))
    allx = np.concatenate(data)
    assert m.count.item() == len(allx)
    # float64 state: the only error is the float32 rounding of the inputs, <= 2^-24 * mean|x| / |mean| ~ 7e-8 here.
    assert m.mean.item() == pytest.approx(allx.mean(), rel=1e-6)
    assert m.std.item() == pytest.approx(allx.std(), rel=1e-5)
    m2 = RunningMoments()
    m2.load_state_dict(m.state_dict())
    assert m2.state_dict() == m.state_dict()


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for it in (1, 2, 3):
        save_checkpoint(tmp_path, it, policy=model, critic=model, policy_opt=opt, critic_opt=opt, trainer_state={},
                        config_yaml="x: 1\n", keep_last=2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-iter_00000004-999").mkdir()        # a crash mid-save leaves this behind...
    (root / "iter_00000005").mkdir()                 # ...or an incomplete directory
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_00000002", "iter_00000003"]


def test_tokenizer_vocabulary_mismatch_is_a_clear_error(tmp_path, tiny_setups):
    setup = tiny_setups("llama")
    other = make_tiny_setup(tmp_path / "gpt2", "gpt2", n_prompts=2)
    cfg = load_config(None, setup.overrides(**{"model.reward_path": other.reward}))
    with pytest.raises(ModelError, match="tokenizer.*differ"):
        load_models(cfg.model, torch.device("cpu"))


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path, REQUIRED)  # paths overridden: every other key must be valid
