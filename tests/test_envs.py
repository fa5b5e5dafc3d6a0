"""Multi-turn rollouts against environments (fastppo.envs): token-exact trajectories, limits, rewards, bad
environments, ToolEnv, and a run through an environment against the single-turn run it must equal."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from fastppo.config import EnvConfig, RewardConfig, load_config
from fastppo.data import apply_chat_template
from fastppo.engine import Engine
from fastppo.envs import EnvError, EnvRunner, ToolEnv, TurnFormat, env_call, load_env_class, parse_tool_calls
from fastppo.rollout import Rollout
from fastppo_testing.tiny_models import make_tiny_setup
from fastppo_testing.trainer import read_metrics

# Chat templates in the style of Qwen2.5's (tool results as a user turn in <tool_response> tags) and Llama 3.1's
# (tool results in an ipython turn), with their special tokens; the BPE below is trained on text in that style.
QWEN_STYLE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{%- for m in messages %}"
    "{{ '<|start_header_id|>' + ('ipython' if m.role == 'tool' else m.role) + '<|end_header_id|>\n\n' + m.content "
    "+ '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
# What each template writes between an answer that ended with EOS and the next answer, for an observation `obs`.
BETWEEN = {
    "qwen": "\n<|im_start|>user\n<tool_response>\n{obs}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>ipython<|end_header_id|>\n\n{obs}<|eot_id|><|start_header_id|>assistant"
              "<|end_header_id|>\n\n",
}
SPECIALS = {"qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama3": ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"]}
EOS = {"qwen": "<|im_end|>", "llama3": "<|eot_id|>", "plain": "<|endoftext|>"}


def bpe_tokenizer(style: str):
    """A byte-level BPE (trained here, offline) with the style's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the tool says 42 and the answer is 42", "hello world, what is the weather today?",
              "<tool_response> left 2 </tool_response> assistant user system ipython", "go on, keep going"] * 20
    specials = SPECIALS.get(style, ["<|endoftext|>"])
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS[style], pad_token=specials[0])
    if style != "plain":
        tok.chat_template = QWEN_STYLE if style == "qwen" else LLAMA3_STYLE
    return tok


class ScriptedEngine(Engine):
    """Answers from a script: sample id -> the token ids of each of its turns (a turn ending with EOS ends with
    it). Each answer token's logprob is -(its id + 1) / 1000, so that the rollout's logprobs can be traced back."""

    def __init__(self, script: dict[int, list[list[int]]], eos_id: int, pad_id: int) -> None:
        self.script, self.eos_id, self.pad_id = script, eos_id, pad_id
        self.calls: dict[int, int] = {}
        self.prompts: list[list[int]] = []

    def policy_loaded(self):
        return contextlib.nullcontext()

    def generate(self, prompts, *, seed, sample_ids):
        answers = []
        for row, sid in enumerate(sample_ids.tolist()):
            self.prompts.append(prompts.input_ids[row][prompts.attention_mask[row].bool()].tolist())
            turn = self.calls.get(sid, 0)
            self.calls[sid] = turn + 1
            answers.append(self.script[sid][turn])
        B, R, P = len(answers), max(map(len, answers)), prompts.input_ids.size(1)
        responses = torch.full((B, R), self.pad_id)
        mask = torch.zeros(B, R, dtype=torch.bool)
        for i, a in enumerate(answers):
            responses[i, :len(a)] = torch.tensor(a)
            mask[i, :len(a)] = True
        logprobs = torch.where(mask, -(responses.float() + 1) / 1000, 0.0)
        return Rollout(sequences=torch.cat([prompts.input_ids, responses], 1),
                       attention_mask=torch.cat([prompts.attention_mask, mask.long()], 1), response_mask=mask,
                       lengths=mask.sum(1), ended=torch.tensor([a[-1] == self.eos_id for a in answers]),
                       prompt_width=P, logprobs=logprobs, entropy=torch.where(mask, 0.25, 0.0))


def char_ids(tok, text: str) -> list[int]:
    """The text one byte-level token per character: what a policy may sample, and what re-tokenizing the text
    would merge into fewer tokens."""
    return [tok.convert_tokens_to_ids(t) for c in text for t in tok.tokenize(c)]


def runner(tok, env: str = "fastppo_testing.envs:Countdown", *, prompt_format: str, records=None, **ec):
    ec.setdefault("observation_role", "tool")
    records = records or [{"prompt": "hello world"}, {"prompt": "what is the weather today?"}]
    return EnvRunner(EnvConfig(name=env, workers=2, **ec), RewardConfig(), tok, records, max_new_tokens=32,
                     max_prompt_len=64, prompt_format=prompt_format)


@pytest.mark.parametrize("style", ["qwen", "llama3", "plain"])
def test_a_trajectory_is_the_sampled_ids_and_the_observations_tokenized_once(style):
    tok = bpe_tokenizer(style)
    eos = tok.eos_token_id
    # Sample 0 answers three times (Countdown ends it); sample 1's second answer is cut by max_new_tokens (no EOS).
    script = {0: [char_ids(tok, "the answer") + [eos], char_ids(tok, "hello") + [eos], char_ids(tok, "42") + [eos]],
              1: [char_ids(tok, "go on") + [eos], char_ids(tok, "keep going"), char_ids(tok, "the") + [eos]]}
    engine = ScriptedEngine(script, eos, tok.pad_token_id)
    env = runner(tok, prompt_format="plain" if style == "plain" else "chat")
    try:
        ro = env.run(engine, [0, 1], seed=0, sample_ids=torch.tensor([0, 1]))
        metrics = env.metrics("cpu")
    finally:
        env.close()

    for row, record in enumerate(env.records):
        first = (tok(record["prompt"])["input_ids"] if style == "plain" else
                 apply_chat_template(tok, [{"role": "user", "content": record["prompt"]}], "test", True))
        expected, sampled, rewards = [], [], []
        for turn, answer in enumerate(script[row]):
            expected += answer
            sampled += [True] * len(answer)
            rewards += [0.0] * (len(answer) - 1) + [0.5 * (turn + 1)]
            if turn < 2:
                obs = f"left {2 - turn}"
                if style == "plain":
                    between = tok(obs, add_special_tokens=False)["input_ids"]
                else:
                    text = BETWEEN[style].format(obs=obs)
                    if answer[-1] != eos:               # an answer cut short: the template's EOS closes the turn
                        text = tok.eos_token + text
                    between = tok(text, add_special_tokens=False)["input_ids"]
                expected += between
                sampled += [False] * len(between)
                rewards += [0.0] * len(between)
        n = len(expected)
        seq = ro.sequences[row][ro.attention_mask[row].bool()].tolist()
        assert seq == first + expected                                     # exactly what was sampled, and observed
        assert ro.response_mask[row, :n].tolist() == sampled and not ro.response_mask[row, n:].any()
        answer_ids = torch.tensor(expected)[torch.tensor(sampled)]
        assert torch.equal(ro.logprobs[row][ro.response_mask[row]], -(answer_ids.float() + 1) / 1000)
        assert (ro.logprobs[row][~ro.response_mask[row]] == 0).all()       # observations have no rollout logprob
        assert ro.step_rewards[row, :n].tolist() == rewards
        assert int(ro.turns[row]) == 3 and not ro.truncated[row]
        # The trajectory's text would tokenize differently: re-tokenizing would have changed the trained ids.
        assert tok(tok.decode(expected), add_special_tokens=False)["input_ids"] != expected
    # What the engine was asked to continue: each turn's prompt is the trajectory so far.
    assert engine.prompts[2] == ro.sequences[0][ro.attention_mask[0].bool()].tolist()[
        :len(engine.prompts[2])]
    assert metrics["env/turns_mean"] == 3 and metrics["env/turns_max"] == 3
    assert metrics["env/step_reward_mean"] == pytest.approx(3.0) and metrics["env/steps_mean"] == 3
    obs_tokens = int((~ro.response_mask & ro.attention_mask[:, ro.prompt_width:].bool()).sum())
    assert metrics["env/tokens_observation_frac"] == pytest.approx(obs_tokens / int(ro.lengths.sum()))


def test_limits_truncate_and_set_the_truncation_reward():
    tok = bpe_tokenizer("plain")
    eos = tok.eos_token_id
    script = {i: [char_ids(tok, "go") + [eos]] * 4 for i in range(2)}
    env = runner(tok, "fastppo_testing.envs:Forever", prompt_format="plain", max_turns=3, truncation_reward=-1.0)
    try:
        ro = env.run(ScriptedEngine(script, eos, tok.pad_token_id), [0, 1], seed=0, sample_ids=torch.tensor([0, 1]))
        m = env.metrics("cpu")
    finally:
        env.close()
    assert ro.truncated.all() and ro.turns.tolist() == [3, 3] and m["env/truncated_frac"] == 1
    assert ro.step_rewards.sum(1).tolist() == [-1.0, -1.0]            # the truncation reward replaces the sum
    # The last step's observation is not appended: the trajectory ends on the policy's answer.
    last = ro.lengths - 1
    assert ro.response_mask[torch.arange(2), last].all()

    # env.max_tokens: the whole trajectory (first turn included) stays within it; the sum so far is kept.
    env = runner(tok, "fastppo_testing.envs:Forever", prompt_format="plain", max_turns=4, max_tokens=24)
    try:
        ro = env.run(ScriptedEngine(script, eos, tok.pad_token_id), [0, 1], seed=0, sample_ids=torch.tensor([0, 1]))
    finally:
        env.close()
    assert ro.truncated.all() and (ro.attention_mask.sum(1) <= 24).all()
    assert ro.step_rewards.sum(1).tolist() == ro.turns.float().tolist()   # 1.0 per step, no truncation reward


@pytest.mark.parametrize("name, message", [
    ("fastppo_testing.envs:Missing", "has no class 'Missing'"),
    ("fastppo_testing.envs:not_a_class", "is a int, not a class"),
    ("fastppo_testing.envs:NoStep", "has no method step(response)"),
    ("fastppo_testing.envs:StepTakesNothing", "StepTakesNothing.step(self) must take one argument"),
    ("no_such_module_here:Env", "no module named 'no_such_module_here'"),
])
def test_a_broken_environment_class_is_refused_at_start_up(name, message):
    with pytest.raises(EnvError, match="env.name") as err:
        load_env_class(name)
    assert message in str(err.value)


@pytest.mark.parametrize("name, message", [
    ("fastppo_testing.envs:StepReturnsText", "step returned 'fine'; it returns (observation: str | None"),
    ("fastppo_testing.envs:StepHangs", "timed out after 2.0s"),
    ("fastppo_testing.envs:StepRaises", "raised: ValueError: the grader is down"),
])
def test_a_failing_step_names_the_class_the_prompt_and_the_turn(name, message):
    tok = bpe_tokenizer("plain")
    eos = tok.eos_token_id
    script = {i: [char_ids(tok, "go") + [eos]] for i in range(2)}
    env = runner(tok, name, prompt_format="plain", timeout_s=2.0)
    try:
        with pytest.raises(EnvError) as err:
            env.run(ScriptedEngine(script, eos, tok.pad_token_id), [0, 1], seed=0, sample_ids=torch.tensor([0, 1]))
    finally:
        env.close()
    assert f"environment {name}.step on prompt 0, turn 0" in str(err.value) and message in str(err.value)
    assert "reward.function_errors=invalid" in str(err.value)


def test_with_function_errors_invalid_a_failing_step_ends_its_trajectory_with_the_invalid_score():
    tok = bpe_tokenizer("plain")
    eos = tok.eos_token_id
    script = {i: [char_ids(tok, "go") + [eos]] for i in range(2)}
    env = EnvRunner(EnvConfig(name="fastppo_testing.envs:StepRaises", workers=1),
                    RewardConfig(function_errors="invalid", invalid_score=-3.0), tok,
                    [{"prompt": "hello"}, {"prompt": "world"}], max_new_tokens=8, max_prompt_len=16,
                    prompt_format="plain")
    try:
        ro = env.run(ScriptedEngine(script, eos, tok.pad_token_id), [0, 1], seed=0, sample_ids=torch.tensor([0, 1]))
        m = env.metrics("cpu")
    finally:
        env.close()
    assert ro.step_rewards.sum(1).tolist() == [-3.0, -3.0] and m["env/errors"] == 2


def test_reset_returning_the_wrong_type_names_the_class():
    tok = bpe_tokenizer("plain")
    env = runner(tok, "fastppo_testing.envs:ResetReturnsNumber", prompt_format="plain")
    try:
        with pytest.raises(EnvError, match=r"ResetReturnsNumber.reset on prompt 0, turn 0 raised: TypeError: reset "
                                           r"returned int 3"):
            env.run(ScriptedEngine({}, tok.eos_token_id, tok.pad_token_id), [0, 1], seed=0,
                    sample_ids=torch.tensor([0, 1]))
    finally:
        env.close()


def test_a_template_without_the_observation_role_is_refused():
    tok = bpe_tokenizer("qwen")
    tok.chat_template = QWEN_STYLE.replace("{%- if m.role == 'tool' %}", "{%- if m.role == 'tool' %}{{ raise_exception("
                                           "'no tools') }}")
    fmt = TurnFormat(tok, "tool", chat=True)
    with pytest.raises(Exception, match="no tools"):
        fmt.observation("x", ended=True)


# ----------------------------------------------------------------------------
# ToolEnv
# ----------------------------------------------------------------------------

def test_tool_calls_are_read_in_both_documented_formats():
    qwen = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert parse_tool_calls(qwen) == [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    llama = '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    assert parse_tool_calls(llama) == [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    openai_style = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert parse_tool_calls(openai_style) == [{"name": "add", "arguments": {"a": 1}}]
    two = qwen + " then " + qwen
    assert len(parse_tool_calls(two)) == 2
    assert parse_tool_calls("the answer is 3") == [] and parse_tool_calls("{3}") == []
    assert parse_tool_calls('{"x": 1}') == []                        # JSON, but not a call: a final answer
    bad = parse_tool_calls("<tool_call>{name: add}</tool_call>")
    assert len(bad) == 1 and bad[0].startswith("the tool call is not JSON")
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[0].startswith('a tool call is {"name"')


def test_tool_env_runs_the_tools_and_counts_calls_and_errors():
    env = ToolEnv(["fastppo.demos.tools:add", "fastppo_testing.envs:slow_tool", "fastppo_testing.envs:failing_tool"],
                  system="tools:\n{tools}", timeout_s=0.5)
    first = env.reset({"prompt": "what is 2 + 3 ?"})
    assert first[0]["role"] == "system" and '"signature": "add(a: int, b: int) -> int"' in first[0]["content"]
    assert first[1] == {"role": "user", "content": "what is 2 + 3 ?"}
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    assert env.step(call) == ("5", None, False)
    obs, _, done = env.step('<tool_call>{"name": "slow_tool", "arguments": {"seconds": 5}}</tool_call>'
                            '<tool_call>{"name": "failing_tool", "arguments": {"x": 1}}</tool_call>'
                            '<tool_call>{"name": "mul", "arguments": {}}</tool_call>')
    assert obs.split("\n") == ["error: slow_tool timed out after 0.5s", "error: ZeroDivisionError: no",
                               "error: no tool named 'mul'; the tools are ['add', 'failing_tool', 'slow_tool']"]
    assert not done
    assert env.step("the answer is 5") == (None, None, True)
    assert env.metrics() == {"tool_calls": 4, "tool_errors": 3}
    with pytest.raises(EnvError, match="env.kwargs.tools"):
        ToolEnv(["fastppo.demos.tools:nothing"])
    with pytest.raises(KeyError, match="env.kwargs.prompt_field"):
        ToolEnv(["fastppo.demos.tools:add"]).reset({"question": "?"})


def test_an_environment_travels_between_calls_pickled():
    result, state, metrics = env_call("fastppo_testing.envs:Countdown", {"turns": 2}, None, "reset", {"prompt": "hi"})
    assert result == "hi" and metrics is None
    result, state, metrics = env_call("fastppo_testing.envs:Countdown", {}, state, "step", "answer")
    assert result == ("left 1", 0.5, False) and metrics == {"steps": 1}
    result, _, metrics = env_call("fastppo_testing.envs:Countdown", {}, state, "step", "answer")
    assert result == (None, 1.0, True) and metrics == {"steps": 2}


# ----------------------------------------------------------------------------
# Training through an environment
# ----------------------------------------------------------------------------

def tiny_with_plain_prompts(tmp_path):
    """The tiny models, and a prompt file of their plain-text prompts (the environments here read "prompt")."""
    setup = make_tiny_setup(tmp_path / "tiny", n_prompts=8)
    rows = [{"prompt": r["prompt"]} for r in map(json.loads, setup.prompts.read_text().splitlines()) if "prompt" in r]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return setup, prompts


def test_one_turn_through_an_environment_trains_as_the_single_turn_run(tmp_path):
    """An environment that scores its one answer as a reward function would: the same rollouts, scores,
    advantages and updates as the single-turn run with that function (the same operations on the same numbers:
    only the padding of the response differs, which packing removes)."""
    from fastppo.train import train

    setup, prompts = tiny_with_plain_prompts(tmp_path)
    common = setup.overrides(**{"model.reward_path": None, "data.prompt_path": prompts, "run.iterations": 2,
                                "rollout.n_samples_per_prompt": 2, "ppo.minibatch_size": 4,
                                "ppo.micro_batch_size": 2})
    runs = {}
    for name, extra in (("single", ["reward.functions=[{name: 'fastppo_testing.reward_fns:length'}]"]),
                        ("env", ["env.name=fastppo_testing.envs:ScoredOnce", "env.max_turns=1", "env.workers=1"])):
        out = tmp_path / name
        train(load_config(None, [*common, *extra, f"run.output_dir={out}"], preset="grpo"))
        runs[name] = read_metrics(out)
    for a, b in zip(runs["single"], runs["env"], strict=True):
        same = [k for k in a if k in b and isinstance(a[k], float) and not k.startswith(("time/", "throughput/",
                                                                                         "memory/"))]
        assert {"score/raw/mean", "loss/policy", "policy/entropy", "grad_norm/policy"} <= set(same)
        for key in same:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        assert b["env/turns_mean"] == 1 and b["env/step_reward_mean"] == pytest.approx(a["score/raw/mean"])


def test_the_documented_example_environment_plays(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "docs" / "environments.md").read_text()
    code = "# guess.py" + text.split("```python\n# guess.py")[1].split("```")[0]
    (tmp_path / "guess.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = load_env_class("guess:Guess")
    env = cls(cost=0.05)
    assert "Guess it" in env.reset({"seed": 3})
    low, high, turns = 1, 100, 0
    while True:                                               # bisection finds it within 7 guesses
        guess = (low + high) // 2
        obs, reward, done = env.step(f"{guess}")
        turns += 1
        if done:
            assert reward == 1.0 and turns <= 7
            break
        assert reward == -0.05
        low, high = (guess + 1, high) if obs == "Higher." else (low, guess - 1)
    assert env.metrics() == {"guesses": turns}


def test_tools_demo_runs_sft_then_grpo_through_tool_env(tmp_path, capsys):
    """`fastppo demo --task tools` on a tiny plan: every stage runs, the GRPO run goes through ToolEnv (its metrics
    logged), and the summary holds accuracy and tool use before and after, with transcripts."""
    from fastppo.demos.tools import ToolsPlan, run_tools_demo

    plan = ToolsPlan(n_sft=64, n_prompts=32, n_eval_prompts=16, sft_epochs=1.0, iterations=2,
                     prompts_per_iteration=4, samples_per_prompt=4, minibatch_size=16)
    summary = run_tools_demo(tmp_path / "demo", plan=plan, progress_bar=False)
    for stage in ("sft", "grpo"):
        r = summary[stage]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["tool_call_rate"] <= 1 and r["transcripts"]
        assert r["transcripts"][0]["transcript"].startswith("user : what is")
    records = read_metrics(tmp_path / "demo" / "grpo")
    assert len(records) == 2 and {"env/turns_mean", "env/tool_calls_mean", "env/tool_errors_frac"} <= set(records[-1])
    assert "called the tool" in capsys.readouterr().out


def test_ppo_max_with_step_rewards_resumes_bitwise(tmp_path):
    """PPO-max (critic, GAE over the step rewards, the reward model on the final answer) through a 3-turn
    environment: 2 + 2 iterations give the weights of 4 straight (an interrupted iteration replays its
    trajectories: the sampling noise is fixed per seed, turn and sample)."""
    from fastppo.checkpoint import read_weights
    from fastppo.train import train

    setup, prompts = tiny_with_plain_prompts(tmp_path)
    common = setup.overrides(**{"data.prompt_path": prompts, "run.iterations": 4, "run.save_every": 2,
                                "env.name": "fastppo_testing.envs:Countdown", "env.max_turns": 3,
                                "env.workers": 1})
    straight = train(load_config(None, [*common, f"run.output_dir={tmp_path / 'a'}"]))
    first = train(load_config(None, [*common, f"run.output_dir={tmp_path / 'b'}", "run.stop_after=2"]))
    assert first.interrupted
    resumed = train(load_config(None, [*common, f"run.output_dir={tmp_path / 'b'}", "run.resume=latest"]))
    a, b = read_weights(straight.checkpoint, "policy"), read_weights(resumed.checkpoint, "policy")
    for k in a:   # bitwise: the same code on the same inputs and shapes in one process
        assert torch.equal(a[k], b[k]), k
    ma = read_metrics(tmp_path / "a")
    assert ma[-1]["env/turns_mean"] > 1 and ma[-1]["env/step_reward_mean"] > 0 and "values/explained_variance" in ma[-1]
    assert ma[-1]["env/steps_mean"] == ma[-1]["env/turns_mean"]


def _env_run(tmp_path: Path, name: str, setup, prompts: Path, *extra: str) -> list[dict]:
    """A 2-iteration GRPO run through the 3-turn LongerIsBetter environment; its metrics."""
    from fastppo.train import train

    out = tmp_path / name
    train(load_config(None, [*_env_overrides(setup, prompts, out), *extra], preset="grpo"))
    return read_metrics(out)


def _env_overrides(setup, prompts: Path, out: Path, micro: int = 2) -> list[str]:
    return setup.overrides(**{"model.reward_path": None, "data.prompt_path": prompts, "run.iterations": 2,
                              "rollout.n_samples_per_prompt": 2, "ppo.minibatch_size": 4,
                              "ppo.micro_batch_size": micro, "env.name": "fastppo_testing.envs:LongerIsBetter",
                              "env.max_turns": 3, "env.workers": 1, "run.output_dir": out,
                              "run.export_at_end": False})


def _same_numbers(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    """The same run to rounding: every loss, score and statistic of every iteration (float32 sums of a few hundred
    terms in another order differ by ~n·2^-24 of their magnitude, below 1e-5 of it)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        keys = [k for k in ra if isinstance(ra[k], float) and not k.startswith(("time/", "throughput/", "memory/"))]
        assert {"loss/policy", "score/raw/mean", "env/turns_mean", "grad_norm/policy"} <= set(keys)
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-6), k


@pytest.mark.parametrize("variant, extra", [
    ("padded", ["ppo.packing=false"]),
    ("static engine", ["rollout.engine=static"]),
])
def test_a_multi_turn_run_is_the_same_padded_or_packed_and_with_either_engine(tmp_path, variant, extra):
    """Packing only removes padding, and the static engine draws the tokens `hf` draws: the same trajectories,
    scores and updates."""
    setup, prompts = tiny_with_plain_prompts(tmp_path)
    base = _env_run(tmp_path, "base", setup, prompts)
    assert base[-1]["env/turns_mean"] == 3 and base[-1]["loss/policy"] != 0.0
    _same_numbers(base, _env_run(tmp_path, "variant", setup, prompts, *extra))


def test_a_multi_turn_run_trains_lora_adapters_with_rollout_correction(tmp_path):
    """LoRA (the reference is the policy with its adapters off) and token-level rollout correction through an
    environment: the run trains (finite losses, the correction's metrics logged), and the adapters moved."""
    from fastppo.checkpoint import read_weights

    setup, prompts = tiny_with_plain_prompts(tmp_path)
    records = _env_run(tmp_path, "lora", setup, prompts, "model.lora.rank=4", "ppo.kl_loss_coef=0.05",
                       "correction.importance=token", "run.save_every=2")
    last = records[-1]
    assert last["env/turns_mean"] == 3 and "rollout/is_truncated_frac" in last and "loss/kl" in last
    assert all(math.isfinite(last[k]) for k in ("loss/policy", "loss/kl", "grad_norm/policy"))
    adapters = read_weights(tmp_path / "lora" / "checkpoints" / "iter_00000002", "policy")
    assert adapters and all("lora" in k for k in adapters)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapters.items())   # B starts at 0


def test_a_multi_turn_run_in_two_processes_equals_one(tmp_path):
    """FSDP2 over 2 processes (gloo, the real CLI under torchrun): each rank runs its groups' trajectories, and
    the first iteration (from equal weights) equals one process's; later iterations start from weights that
    agree within Adam's step bound (tests/test_distributed.py), so their statistics are compared loosely."""
    from fastppo.train import train
    from fastppo_testing.distributed import output, torchrun

    setup, prompts = tiny_with_plain_prompts(tmp_path)
    two = torchrun(["-m", "fastppo.cli", "train", "--preset", "grpo",
                    *_env_overrides(setup, prompts, tmp_path / "two", micro=1)], cwd=tmp_path)
    assert two.returncode == 0, output(two)
    train(load_config(None, _env_overrides(setup, prompts, tmp_path / "one"), preset="grpo"))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    _same_numbers(one[:1], two[:1])
    assert two[-1]["env/turns_mean"] == one[-1]["env/turns_mean"] == 3
