"""rollout.engine=static (`fastppo.static_engine`) against HF generate (`rollout.generate`, the reference).

The two run the same sampler on logits that differ by float32 rounding only (another attention width: the
static cache's masked ring of prompt width + max_new_tokens columns against HF's growing cache, and prefills
over another left padding), so the tokens are equal unless two perturbed scores tie within ~1e-6, which the
fixed seeds here do not meet, and logprobs and entropies agree to ~1e-6 (a few float32 ulps of log-softmax
terms of magnitude ~5): compared at 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from fastppo.config import ConfigError, RolloutConfig, load_config
from fastppo.data import PromptBatch, collate_prompts, load_prompts
from fastppo.engine import HFEngine, StaticEngine, make_engine
from fastppo.models import load_models
from fastppo.rollout import generate
from fastppo.static_engine import generate_static
from fastppo_testing.distributed import output, torchrun
from fastppo_testing.trainer import read_metrics, tiny_setups  # noqa: F401  (fixture)

ATOL = 1e-5
G = 3


def _policy_and_groups(setup, n_prompts=5):
    cfg = load_config(None, setup.overrides())
    models = load_models(cfg.model, torch.device("cpu"))
    tok = models.tokenizer
    prompts = load_prompts(setup.prompts, tok, field="prompt", prompt_format="auto", max_len=16)
    batch = collate_prompts(prompts[:n_prompts], tok.pad_token_id)
    groups = PromptBatch(batch.input_ids.repeat_interleave(G, 0), batch.attention_mask.repeat_interleave(G, 0))
    return models.policy, tok, groups


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.ended, b.ended)
    assert (a.logprobs - b.logprobs).abs().max() < ATOL
    assert (a.entropy - b.entropy).abs().max() < ATOL


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_static_draws_the_tokens_hf_draws(tiny_setups, arch):
    """G = 3 samples of 5 prompts on 4 slots (refilled as responses end at different steps), sample ids that do
    not start at 0: the same tokens, logprobs and entropy as HF generate."""
    policy, tok, batch = _policy_and_groups(tiny_setups(arch))
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=7, vocab_size=len(tok),
              sample_ids=torch.arange(40, 40 + batch.input_ids.size(0)))
    for rc in (RolloutConfig(max_new_tokens=24, temperature=1.0, top_p=0.9),
               RolloutConfig(max_new_tokens=24, temperature=0.7, top_k=5, top_p=1.0)):
        hf = generate(policy, batch, rc, generation_batch_size=6, **kw)
        static = generate_static(policy, batch, rc, slots=4, **kw)
        _assert_same(hf, static)
        assert hf.lengths.unique().numel() > 1 and hf.ended.any()        # responses end at different steps


@pytest.mark.parametrize("arch,window,attention", [("mistral", {"sliding_window": 5}, "sdpa"),
                                                     ("qwen2", {"use_sliding_window": True, "sliding_window": 5,
                                                                "max_window_layers": 1}, "sdpa"),
                                                     ("mistral", {"sliding_window": 5}, "eager"),
                                                     ("llama", {}, "eager")])
def test_sliding_windows_and_eager_attention(arch, window, attention):
    """A window of 5 tokens shorter than every sequence (Mistral: every layer; Qwen2: the layers past the first,
    a mask per layer type) and eager attention (an additive mask): the tokens HF generate draws."""
    from transformers import AutoModelForCausalLM

    from fastppo_testing.tiny_models import build_tokenizer, model_configs

    tok = build_tokenizer()
    cfg = model_configs(arch, len(tok), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    cfg = type(cfg)(**{**cfg.to_dict(), **window, "layer_types": None})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(tok), (6, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[1, :5] = 0
    batch = PromptBatch(ids.masked_fill(mask == 0, tok.pad_token_id).repeat_interleave(2, 0),
                        mask.repeat_interleave(2, 0))
    rc = RolloutConfig(max_new_tokens=14, temperature=1.0, top_p=0.9)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3, vocab_size=len(tok))
    _assert_same(generate(model, batch, rc, generation_batch_size=12, **kw),
                 generate_static(model, batch, rc, slots=5, **kw))


def test_a_group_is_prefilled_once(tiny_setups, monkeypatch):
    """With slots for every row, one prefill over the distinct prompts, not over the 15 rows."""
    policy, tok, batch = _policy_and_groups(tiny_setups("llama"))
    widths = []
    handle = policy.register_forward_pre_hook(lambda _m, _a, kw: widths.append(tuple(kw["input_ids"].shape)),
                                              with_kwargs=True)
    try:
        generate_static(policy, batch, RolloutConfig(max_new_tokens=4), eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id, slots=15, seed=1)
    finally:
        handle.remove()
    prefills = [w for w in widths if w[1] > 1]
    distinct = len({tuple(r) for r in batch.input_ids.tolist()})       # 5 prompts, some of them equal
    assert len(prefills) == 1 and prefills[0][0] == distinct < 15
    assert all(w[0] <= 15 for w in widths if w[1] == 1)                  # decode steps: one token per slot


def test_static_with_lora_draws_the_tokens_hf_draws(tiny_setups):
    from fastppo import lora
    from fastppo.config import LoraConfig

    policy, tok, batch = _policy_and_groups(tiny_setups("qwen2"))
    policy = lora.apply(policy, LoraConfig(rank=4), field="model.lora", classifier=False)
    with torch.no_grad():                        # B = 0 at initialisation: make the adapters change the logits
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rc = RolloutConfig(max_new_tokens=16, temperature=1.0, top_p=0.9)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3, vocab_size=len(tok),
              sample_ids=torch.arange(batch.input_ids.size(0)))
    engines = [e(policy, rc, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                 generation_batch_size=4) for e in (HFEngine, StaticEngine)]
    out = []
    for engine in engines:
        with engine.policy_loaded():
            out.append(engine.generate(batch, seed=3, sample_ids=kw["sample_ids"]))
    _assert_same(*out)
    with lora.adapters_disabled(policy):
        base = generate(policy, batch, rc, generation_batch_size=15, **kw)
    assert not torch.equal(base.sequences, out[0].sequences)             # the adapters were in play


def test_unserved_models_and_repetition_penalty_are_start_up_errors(tiny_setups):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    rc = RolloutConfig(engine="static")
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ConfigError, match="rollout.engine.*gpt_neox"):
        make_engine(model, rc, eos_id=1, pad_id=0, vocab_size=32, generation_batch_size=2)
    policy, tok, _ = _policy_and_groups(tiny_setups("llama"))
    policy.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ConfigError, match="rollout.engine.*flash_attention_2"):
            make_engine(policy, rc, eos_id=1, pad_id=0, vocab_size=32, generation_batch_size=2)
    finally:
        policy.config._attn_implementation = "sdpa"
    setup = tiny_setups("llama")
    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config(None, setup.overrides(**{"rollout.engine": "static", "rollout.repetition_penalty": 1.1}))


def test_grpo_static_in_two_processes_equals_hf_in_one(tiny_setups, tmp_path):
    """GRPO (groups of 2), one iteration: rollout.engine=static under FSDP2 with 2 processes (gloo, the policy
    all-gathered once for the rollout) samples what HF generate samples in 1 process: the same responses, hence
    the same scores, lengths and losses (rounding apart: tolerances of tests/test_distributed.py)."""
    from fastppo.train import train

    setup = tiny_setups("llama")

    def overrides(out, engine, micro):
        return setup.overrides(**{"run.output_dir": out, "run.iterations": 1, "run.save_every": 0,
                                  "run.export_at_end": False, "rollout.n_samples_per_prompt": 2,
                                  "rollout.max_new_tokens": 10, "rollout.top_p": 0.9, "rollout.engine": engine,
                                  "ppo.minibatch_size": 4, "ppo.micro_batch_size": micro})

    two = torchrun(["-m", "fastppo.cli", "train", "--preset", "grpo", *overrides(tmp_path / "two", "static", 1)],
                   cwd=tmp_path)
    assert two.returncode == 0, output(two)
    train(load_config(None, overrides(tmp_path / "one", "hf", 2), preset="grpo"))
    (m1,), (m2,) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for k in ("response/length_mean", "score/raw/mean", "loss/policy", "policy/entropy_new", "grad_norm/policy"):
        assert k in m1, k
        torch.testing.assert_close(torch.tensor(m2[k], dtype=torch.float64), torch.tensor(m1[k], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_an_environment_trajectory_is_the_same_with_both_engines(tiny_setups):
    """Three turns of `Countdown` (the observations between the turns, each turn a generate call with the
    trajectory so far as its prompt): the same trajectories, rewards and logprobs with static as with hf."""
    import json

    from fastppo.config import EnvConfig, RewardConfig
    from fastppo.envs import EnvRunner

    setup = tiny_setups("llama")
    policy, tok, _ = _policy_and_groups(setup)
    records = [json.loads(line) for line in setup.prompts.read_text().splitlines()][:4]
    rc = RolloutConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
    ec = EnvConfig(name="fastppo_testing.envs:Countdown", max_turns=3, workers=1)
    runner = EnvRunner(ec, RewardConfig(), tok, records, max_new_tokens=6, max_prompt_len=64, prompt_format="auto")
    out = []
    try:
        for engine in (HFEngine, StaticEngine):
            e = engine(policy, rc, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                       generation_batch_size=3)
            with e.policy_loaded():
                out.append(runner.run(e, [0, 1, 2, 3], seed=5, sample_ids=torch.arange(4)))
    finally:
        runner.close()
    a, b = out
    _assert_same(a, b)
    assert torch.equal(a.turns, b.turns) and a.turns.max() == 3
    assert torch.equal(a.step_rewards, b.step_rewards) and torch.equal(a.turn_index, b.turn_index)
